"""Generation cache keys: what determines a greedy output, hashed.

`cache_key` says what goes into a key; `ChunkKeys` computes the same keys for the rows of one chunk
with the parts they share (model, settings, each prompt's tokens) serialized once, so a thousand rows
cost a thousand hashes, not a thousand JSON documents built from scratch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from contract.config import GenerationConfig

if TYPE_CHECKING:
    from .model_host import ModelIdentity

#: Bumped whenever what goes into a cache key changes, so that older keys never match.
CACHE_KEY_VERSION = 2
_COMPACT = (",", ":")


def cache_key(model: ModelIdentity, adapter_hash: str | None, input_ids: Sequence[int], gen: GenerationConfig,
              *, path: str) -> str | None:
    """What determines a greedy output: the base weights and config, the tokenizer files and generation
    config (EOS ids), the dtype as resolved, the device type, the generation `path` (`mixed`: one copy of
    the weights with adapters applied per row; `merged`: each adapter merged in; not bit-identical), the
    adapter, the exact prompt tokens and the settings. None when sampling (a sampled output is not reused)."""
    if gen.do_sample:
        return None
    payload = {"v": CACHE_KEY_VERSION, "base": model.base_hash, "tokenizer": model.tokenizer_hash,
               "dtype": model.dtype, "device": model.device, "eos": list(model.eos_ids), "path": path,
               "adapter": adapter_hash, "ids": list(input_ids), "max_new_tokens": gen.max_new_tokens,
               "stop": list(gen.stop)}
    return hashlib.sha256(json.dumps(payload, separators=_COMPACT).encode()).hexdigest()


class ChunkKeys:
    """`cache_key(model, adapter_hash, ids, gen, path=path)` for many rows: the same JSON text, hashed,
    built from its parts (a dict's JSON is its items' JSON in order, joined by the separators).

    The text is hashed in two pieces, which SHA-256 allows (hashing `a + b` is hashing `a`, then `b`):
    everything up to the prompt's ids, once per adapter (then copied for each row), and the ids with
    the settings after them, serialized once per prompt."""

    def __init__(self, model: ModelIdentity, gen: GenerationConfig, *, path: str) -> None:
        self.sampling = gen.do_sample
        head = {"v": CACHE_KEY_VERSION, "base": model.base_hash, "tokenizer": model.tokenizer_hash,
                "dtype": model.dtype, "device": model.device, "eos": list(model.eos_ids), "path": path}
        self._head = json.dumps(head, separators=_COMPACT)[:-1] + ',"adapter":'
        self._tail = (f',"max_new_tokens":{json.dumps(gen.max_new_tokens)},'
                      f'"stop":{json.dumps(list(gen.stop), separators=_COMPACT)}}}').encode()
        self._adapters: dict[str | None, hashlib._Hash] = {}  # adapter hash -> the hash of the text up to the ids
        self._ids: dict[tuple[int, ...], bytes] = {}  # prompt ids -> the rest of the text

    def key(self, adapter_hash: str | None, input_ids: tuple[int, ...]) -> str | None:
        if self.sampling:
            return None
        start = self._adapters.get(adapter_hash)
        if start is None:
            start = self._adapters[adapter_hash] = hashlib.sha256(
                f'{self._head}{json.dumps(adapter_hash)},"ids":'.encode())
        rest = self._ids.get(input_ids)
        if rest is None:
            rest = self._ids[input_ids] = json.dumps(list(input_ids), separators=_COMPACT).encode() + self._tail
        digest = start.copy()
        digest.update(rest)
        return digest.hexdigest()
