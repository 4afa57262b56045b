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
    built from its parts (a dict's JSON is its items' JSON in order, joined by the separators)."""

    def __init__(self, model: ModelIdentity, gen: GenerationConfig, *, path: str) -> None:
        self.sampling = gen.do_sample
        head = {"v": CACHE_KEY_VERSION, "base": model.base_hash, "tokenizer": model.tokenizer_hash,
                "dtype": model.dtype, "device": model.device, "eos": list(model.eos_ids), "path": path}
        self._head = json.dumps(head, separators=_COMPACT)[:-1] + ',"adapter":'
        self._tail = (f',"max_new_tokens":{json.dumps(gen.max_new_tokens)},'
                      f'"stop":{json.dumps(list(gen.stop), separators=_COMPACT)}}}')
        self._ids: dict[tuple[int, ...], str] = {}

    def key(self, adapter_hash: str | None, input_ids: tuple[int, ...]) -> str | None:
        if self.sampling:
            return None
        ids = self._ids.get(input_ids)
        if ids is None:
            ids = self._ids[input_ids] = json.dumps(list(input_ids), separators=_COMPACT)
        text = f'{self._head}{json.dumps(adapter_hash)},"ids":{ids}{self._tail}'
        return hashlib.sha256(text.encode()).hexdigest()
