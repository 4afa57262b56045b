"""The prompt prefix shared by every row of a decode call, computed once per variant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .kv_cache import cache_layers

if TYPE_CHECKING:
    from .call import DecodeCall


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by every prompt, leaving each at least one token of its own."""
    if not prompts:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


class SharedPrefix:
    """KV entries of the shared prompt prefix, one row per variant, computed once.

    Invariants: `layers[l]` holds decoder layer l's (keys, values) of the prefix tokens, row `index[v]`
    for variant v (row 0 only when the call has no adapter names); every row of the call starts with
    these `length` tokens, and its own tokens take positions from `length` on.
    """

    def __init__(self, call: DecodeCall, tokens: Sequence[int], variants: list[str] | None) -> None:
        n = len(variants) if variants is not None else 1
        ids = torch.tensor([list(tokens)] * n, dtype=torch.long, device=call.device)  # [variants, prefix]
        cache = DynamicCache()
        call.forward(variants, input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                     use_cache=True, **call.prefill_kwargs)
        self.length = len(tokens)
        self.index = {name: i for i, name in enumerate(variants or [])}
        #: per decoder layer: (keys, values), each [variants, heads, prefix, head_dim]
        self.layers = [(layer.keys, layer.values) for layer in cache_layers(cache)]
