"""Decode-step attention that reads the shared prefix and the rows' own KV columns where they are.

With a shared prefix (`prefix.SharedPrefix`), a row's keys are its variant's prefix columns followed
by its own columns (`kv_cache.RowsLayer`). Handing attention one tensor of both means copying both
into a scratch buffer in every layer at every step, a copy that grows with the context. Instead, on a
decode step (one new token per row) the cache hands attention its own columns in place and the
prefix separately (`hand_off`), and `_attention` computes the two parts apart and merges them by their
log-sum-exp, as cascade attention does:

- own columns: one attention over every row's own columns, read in place (a strided view of the
  cache's buffer), under the batch's mask (left padding, the newest column always visible);
- prefix: per run of rows of one variant, the rows' queries folded into one query block against that
  variant's prefix, read once for the run instead of once per row;
- merged: out = o_own * exp(lse_own - lse) + o_prefix * exp(lse_prefix - lse), lse = logaddexp(...),
  which is softmax over all columns (the same sum, split in two).

On CPU in float32 (head_dim a multiple of 16), `cpu_attention`'s kernel does both parts in one pass
instead: per row and key/value head, the prefix columns and then the own columns under one online
softmax, each key and value read once for all the query heads that share it, at about the memory's
speed (torch's flash kernel took 1.5-2x as long, `bench/decode_attention.py`). Where it is not
available the parts go to torch's flash kernel as above.

Only the numbers' summation order changes, as between any two attention kernels; the fidelity tests
hold the engine to plain PEFT's greedy tokens with it. The prefix is visible to every row at every
step (causal, and `fidelity.plan_decode` shares no prefix under a sliding window shorter than the
rows), so its part takes no mask.

On CPU only: there the step's copy was the cost (memory bandwidth is what a CPU decode step is short
of); on a GPU the engine keeps the copy until the split is measured there (`scheduler`).

`in_place(model)` switches a model whose attention is `sdpa` to this function for one decode call;
anything not handed off (prefill, a model's other attention calls) goes to transformers' own `sdpa`
unchanged. Where the split cannot be computed (another attention option such as a soft cap or a
position bias, dropout, more than one query), the handed-off parts are assembled into one tensor and
given to `sdpa`: slower, the same as before. A hand-off that attention does not take is an error,
never a silently shorter context.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import cpu_attention
from .fidelity import base_config
from .lora_routing import Run

#: The attention implementation's name while `in_place` is on.
NAME = "lora_compare_in_place"

#: The CPU flash-attention kernel that also returns the log-sum-exp (None: not in this torch).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Handoff(NamedTuple):
    """One layer's keys and values for the attention call that follows its cache update."""

    keys: torch.Tensor  # the rows' own columns [rows, kv heads, own, head_dim], a view of the cache
    values: torch.Tensor  # as keys
    prefix_keys: torch.Tensor  # [variants, kv heads, prefix, head_dim]
    prefix_values: torch.Tensor  # as prefix_keys
    runs: tuple[Run, ...]  # runs of rows by prefix variant (`Run.value`: the variant's row of the prefix)


#: True while a decode call runs under `in_place` (a cache may then hand off).
_ACTIVE: ContextVar[bool] = ContextVar("in_place_attention", default=False)
#: The hand-off of the layer whose attention comes next; None when there is none.
_PENDING: ContextVar[Handoff | None] = ContextVar("in_place_handoff", default=None)

_registered = False


def _register() -> None:
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)  # the same masks as `sdpa`
        _registered = True


@contextmanager
def in_place(model: Any, enabled: bool = True) -> Iterator[bool]:
    """For the duration: `model`'s attention is `_attention` when it is `sdpa` (yields whether it is),
    so that its caches may hand off (`active`). Restored on exit, errors included."""
    config = base_config(model)
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    _register()
    config._attn_implementation = NAME
    active, pending = _ACTIVE.set(True), _PENDING.set(None)
    try:
        yield True
    finally:
        _PENDING.reset(pending)
        _ACTIVE.reset(active)
        config._attn_implementation = "sdpa"


def active() -> bool:
    """Whether the forward pass under way is under `in_place` (a cache may `hand_off`)."""
    return _ACTIVE.get()


def hand_off(handoff: Handoff) -> None:
    """Give the next attention call `handoff` (its `keys` / `values` are what the cache returns)."""
    if _PENDING.get() is not None:
        raise RuntimeError("in-place attention: a layer's hand-off was not taken by its attention call")
    _PENDING.set(handoff)


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface (`dropout`, `scaling` and the rest in `kwargs`): `sdpa`, but
    for a handed-off layer, the split attention."""
    handoff = _PENDING.get()
    if handoff is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _PENDING.set(None)
    if key is not handoff.keys or value is not handoff.values:
        raise RuntimeError("in-place attention: the keys given to attention are not the cache's hand-off")
    plain_options = all(kwargs.get(k) is None for k in ("softcap", "position_bias", "s_aux", "sinks"))
    if plain_options and not kwargs.get("dropout") and query.shape[2] == 1 \
            and _mask_ok(attention_mask, query, handoff):
        scaling = kwargs.get("scaling")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = split_attention(query, handoff, attention_mask, scale)  # [rows, heads, 1, head_dim]
        return out.transpose(1, 2).contiguous(), None
    keys, values = assemble(handoff)
    return sdpa_attention_forward(module, query, keys, values, attention_mask, **kwargs)


def _mask_ok(mask: torch.Tensor | None, query: torch.Tensor, handoff: Handoff) -> bool:
    """A mask the split reads: none, or [rows or 1, 1, 1, prefix + own] (boolean or additive)."""
    if mask is None:
        return True
    width = handoff.prefix_keys.shape[2] + handoff.keys.shape[2]
    return mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == width \
        and mask.shape[0] in (1, query.shape[0])


def assemble(handoff: Handoff) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole keys and values [rows, kv heads, prefix + own, head_dim], copied (the slow way)."""
    out = []
    for own, prefix in ((handoff.keys, handoff.prefix_keys), (handoff.values, handoff.prefix_values)):
        p = prefix.shape[2]
        whole = own.new_empty((own.shape[0], own.shape[1], p + own.shape[2], own.shape[3]))
        whole[:, :, p:] = own
        for run in handoff.runs:
            whole[run.start:run.end, :, :p] = prefix[run.value]
        out.append(whole)
    return out[0], out[1]


def _additive(mask: torch.Tensor | None, columns: int, like: torch.Tensor) -> torch.Tensor | None:
    """The last `columns` columns of `mask` as an additive float mask (0 or -inf); None: no mask."""
    if mask is None:
        return None
    own = mask[..., -columns:]
    if own.dtype == torch.bool:
        return torch.zeros(own.shape, dtype=like.dtype, device=like.device).masked_fill_(~own, float("-inf"))
    return own.to(like.dtype)


def split_attention(query: torch.Tensor, handoff: Handoff, mask: torch.Tensor | None,
                    scale: float, kernel: bool = True) -> torch.Tensor:
    """Attention of one query per row [rows, heads, 1, head_dim] over the prefix and the own columns of
    `handoff`: [rows, heads, 1, head_dim]. On CPU in float32, `cpu_attention`'s kernel where it is
    available (`kernel`); otherwise the two parts computed apart and merged."""
    own_mask = _additive(mask, handoff.keys.shape[2], query)
    if kernel:
        if own_mask is not None and own_mask.stride(-1) != 1:
            own_mask = own_mask.contiguous()
        out = cpu_attention.attend(query, handoff, own_mask, scale)
        if out is not None:
            return out
    rows, heads, _, dim = query.shape
    kv_heads = handoff.keys.shape[1]
    groups = heads // kv_heads
    q = query.reshape(rows, kv_heads, groups, dim)  # a row's heads sharing a kv head, as its queries
    own_out, own_lse = _part(q, handoff.keys, handoff.values, own_mask, scale)  # [rows, kv, g, d], [rows, kv, g]
    if handoff.prefix_keys.shape[2] == 0:  # no prefix columns (torch's flash kernel fails on none)
        return own_out.reshape(rows, heads, 1, dim)
    pre_out, pre_lse = torch.empty_like(own_out), torch.empty_like(own_lse)
    for run in handoff.runs:
        n = run.end - run.start
        # the run's queries as one block per kv head: [1, kv heads, rows x groups, head_dim]
        block = q[run.start:run.end].transpose(0, 1).reshape(1, kv_heads, n * groups, dim)
        out, lse = _part(block, handoff.prefix_keys[run.value:run.value + 1],
                         handoff.prefix_values[run.value:run.value + 1], None, scale)
        pre_out[run.start:run.end] = out.reshape(kv_heads, n, groups, dim).transpose(0, 1)
        pre_lse[run.start:run.end] = lse.reshape(kv_heads, n, groups).transpose(0, 1)
    total = torch.logaddexp(own_lse, pre_lse)  # float32
    merged = own_out.float() * torch.exp(own_lse - total).unsqueeze(-1) \
        + pre_out.float() * torch.exp(pre_lse - total).unsqueeze(-1)
    return merged.to(query.dtype).reshape(rows, heads, 1, dim)


def _part(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention [batch, kv heads, queries, head_dim] and its log-sum-exp [batch, kv heads, queries]."""
    if _FLASH_CPU is not None and query.device.type == "cpu" and query.dtype in _FLASH_DTYPES:
        out, lse = _FLASH_CPU(query, keys, values, 0.0, False, attn_mask=mask, scale=scale)
        return out, lse
    return reference_part(query, keys, values, mask, scale)


def reference_part(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`_part` in plain operations (any device and dtype): scores in float32, softmax by log-sum-exp."""
    scores = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), values.float())
    return out.to(query.dtype), lse

