"""The decode loop: rows stream through one batch on one resident copy of the weights.

What it does that `transformers.generate` over fixed batches does not (each can be switched off in
`DecodeOptions`, and each has a test showing it leaves greedy outputs unchanged):
- finished rows leave: a row that reaches EOS, a stop string or its token budget is dropped from
  the batch and from the KV cache at once, so it costs nothing more;
- refill: waiting rows are admitted as slots free up, so the batch stays near `capacity` rows per
  read of the weights until the work runs out, instead of draining to its longest row;
- shared prefix: the prompt prefix common to every row (the chat template's system header, a
  few-shot block) is computed once per variant and its KV entries are copied to each row admitted;
- similar lengths: rows are admitted longest prompt first, so each prefill pads little;
- logits for the last position only: the prefill never builds a [rows, tokens, vocab] tensor.

Base and adapter rows share the batch: each adapter's rows are one contiguous range, routed in
the LoRA layers (`lora_routing`), or PEFT's `adapter_names` where routing does not apply; a model
with a LoRA variant PEFT cannot mix (DoRA) runs one pass per variant instead.
KV layout: all rows share one column index per cache position and end at the newest column (rows
admitted later are padded on the left); a row's padding (before its prompt, and between the shared
prefix and the rest of its prompt) is masked out, and its position ids count only its real tokens.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import DynamicCache

from producer.config import GenerationConfig

from . import lora_routing

# transformers 5.x renames `past_key_values` to `cache` (before 5.40); older releases only know the
# old name, which we keep so that the whole supported range works, without the warning in every run.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class DecodeOptions:
    """How rows are scheduled. `capacity`: the most rows in the batch at once."""

    capacity: int
    refill: bool = True
    share_prefix: bool = True
    #: A common prefix shorter than this is not worth a separate pass.
    min_prefix: int = 4
    #: Admit waiting rows once this share of the batch is free (fewer, larger prefills).
    refill_fraction: float = 0.25
    #: Route mixed batches through `lora_routing` where the model allows it (else PEFT's `adapter_names`).
    route_lora: bool = True
    #: Compute logits for the last position of a prefill only.
    last_logits_only: bool = True


def _sample(logits: torch.Tensor, gen: GenerationConfig) -> torch.Tensor:
    """Next token per row from logits [rows, vocab]: argmax, or temperature + top-p sampling."""
    if not gen.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / gen.temperature, dim=-1)  # [rows, vocab]
    if gen.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > gen.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1).squeeze(-1)


def common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix shared by every prompt, leaving each at least one token of its own."""
    if not prompts:
        return 0
    first, shortest = prompts[0], min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


def _last_logits_kwargs(model: Any) -> dict[str, int]:
    """`logits_to_keep=1` where the model's forward takes it (every causal LM in transformers >= 4.50)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(inner.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


class _Batch:
    """Rows with their KV cache, attention mask, next position, adapter names and next-token logits:
    the rows in flight, or rows just prefilled, about to join them."""

    def __init__(self, rows: list[int], cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor,
                 names: list[str] | None, logits: torch.Tensor) -> None:
        self.rows, self.cache, self.mask, self.next_pos, self.names, self.logits = (
            rows, cache, mask, next_pos, names, logits)

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, slots: list[int]) -> None:
        """Keep only these slots, in this order; drop cache columns that no remaining row uses."""
        if slots == list(range(len(self.rows))):
            return
        index = torch.tensor(slots, device=self.mask.device)
        self.rows = [self.rows[s] for s in slots]
        self.mask, self.next_pos, self.logits = self.mask[index], self.next_pos[index], self.logits[index]
        self.cache.batch_select_indices(index)
        if self.names is not None:
            self.names = [self.names[s] for s in slots]
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def group(self) -> None:
        """Order the rows by adapter, so that each adapter's rows are one contiguous range."""
        if self.names is not None:
            names = self.names
            self.keep(sorted(range(len(names)), key=lambda s: names[s]))

    def absorb(self, fresh: _Batch) -> None:
        """Append the rows of `fresh`, the shorter cache padded on the left."""
        width = max(self.mask.shape[1], fresh.mask.shape[1])
        self.rows += fresh.rows
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(fresh.mask, width)])
        self.next_pos = torch.cat([self.next_pos, fresh.next_pos])
        if self.names is not None and fresh.names is not None:
            self.names += fresh.names
        self.logits = torch.cat([self.logits, fresh.logits])
        for mine, theirs in zip(_layers(self.cache), _layers(fresh.cache)):
            mine.keys = torch.cat([_pad_left(mine.keys, width, dim=2), _pad_left(theirs.keys, width, dim=2)])
            mine.values = torch.cat([_pad_left(mine.values, width, dim=2), _pad_left(theirs.values, width, dim=2)])

    def step(self, model: Any, tokens: torch.Tensor, route: bool) -> None:
        """One decode step: append `tokens` [rows, 1] and compute the next logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=-1)
        out = _forward(model, self.names, route=route, input_ids=tokens, attention_mask=self.mask,
                       position_ids=self.next_pos[:, None], past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1


def _forward(model: Any, names: list[str] | None, *, route: bool = True, **inputs: Any) -> Any:
    """One forward pass; row i through adapter `names[i]` (routed in our LoRA layers, or PEFT's
    `adapter_names` where the model's layers cannot be routed or `route` is off)."""
    if names is None:
        return model(**inputs)
    if route and lora_routing.routable(model):
        with lora_routing.route(names):
            return model(**inputs)
    return model(**inputs, adapter_names=names)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer entries (each with `keys` and `values` [rows, heads, columns, dim])."""
    return list(cache.layers)


def _pad_left(t: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class _Prefix:
    """KV entries of the shared prompt prefix, one row per variant, computed once."""

    def __init__(self, model: Any, tokens: Sequence[int], variants: list[str] | None, device: torch.device,
                 extra: dict[str, Any]) -> None:
        n = len(variants) if variants is not None else 1
        ids = torch.tensor([list(tokens)] * n, dtype=torch.long, device=device)  # [variants, prefix]
        cache = DynamicCache()
        _forward(model, variants, input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                 use_cache=True, **extra)
        self.length = len(tokens)
        self.index = {name: i for i, name in enumerate(variants or [])}
        self.layers = [(layer.keys, layer.values) for layer in _layers(cache)]  # each [variants, heads, prefix, dim]

    def cache_for(self, names: list[str] | None, rows: int, device: torch.device) -> DynamicCache:
        pick = torch.tensor([self.index[n] for n in names] if names is not None else [0] * rows, device=device)
        cache = DynamicCache()
        for i, (keys, values) in enumerate(self.layers):
            cache.update(keys.index_select(0, pick), values.index_select(0, pick), i)
        return cache


@torch.inference_mode()
def decode_rows(
    model: Any,
    prompts: Sequence[Sequence[int]],
    gen: GenerationConfig,
    *,
    eos_ids: set[int],
    pad_id: int,
    device: torch.device,
    options: DecodeOptions,
    adapter_names: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> list[list[int]]:
    """New tokens of each prompt (EOS included when hit), the prompt run through `adapter_names[i]`
    (PEFT's mixed batch; None: whatever the model is now). `tokenizer` is needed for stop strings."""
    if gen.stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    tokens: list[list[int]] = [[] for _ in prompts]
    if not prompts:
        return tokens
    names = list(adapter_names) if adapter_names is not None else None
    if names is not None and not (options.route_lora and lora_routing.routable(model)) \
            and lora_routing.has_variant(model):
        return _pass_per_variant(model, prompts, gen, names, eos_ids=eos_ids, pad_id=pad_id, device=device,
                                 options=options, tokenizer=tokenizer)
    extra: dict[str, Any] = {"route": options.route_lora}  # for every forward pass
    if options.last_logits_only:
        extra.update(_last_logits_kwargs(model))
    prefix: _Prefix | None = None
    shared = common_prefix(prompts) if options.share_prefix else 0
    if shared >= options.min_prefix:
        variants = sorted(set(names)) if names is not None else None
        prefix = _Prefix(model, prompts[0][:shared], variants, device, extra)

    # Longest prompts first (stable: a prompt's variants stay together), so a prefill pads little.
    waiting = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    capacity = max(1, options.capacity)
    threshold = max(1, int(capacity * options.refill_fraction)) if options.refill else capacity
    window = max((len(s) for s in gen.stop), default=0) + 2  # tokens that can hold a just-completed stop string
    batch: _Batch | None = None
    while waiting or batch is not None:
        free = capacity - (len(batch) if batch is not None else 0)
        if waiting and (batch is None or free >= min(threshold, len(waiting))):
            admitted, waiting = waiting[:free], waiting[free:]
            fresh = _prefill(model, prompts, admitted, names, prefix, pad_id, device, extra)
            if batch is None:
                batch = fresh
            else:
                batch.absorb(fresh)
            batch.group()
        assert batch is not None
        chosen = _sample(batch.logits, gen).tolist()
        keep: list[int] = []
        for slot, (row, token) in enumerate(zip(batch.rows, chosen)):
            tokens[row].append(token)
            if token in eos_ids or len(tokens[row]) >= gen.max_new_tokens:
                continue
            if gen.stop:
                tail = tokenizer.decode(tokens[row][-window:], skip_special_tokens=True)
                if any(stop in tail for stop in gen.stop):
                    continue
            keep.append(slot)
        if not keep:
            batch = None
            continue
        batch.keep(keep)
        batch.step(model, torch.tensor([[tokens[row][-1]] for row in batch.rows], device=device),
                   options.route_lora)
    return tokens


def _pass_per_variant(model: Any, prompts: Sequence[Sequence[int]], gen: GenerationConfig, names: list[str], *,
                      eos_ids: set[int], pad_id: int, device: torch.device, options: DecodeOptions,
                      tokenizer: Any) -> list[list[int]]:
    """One pass per variant (adapters disabled for the base rows, else that adapter active), for a
    model whose adapters cannot share a batch; each pass keeps its share of the capacity."""
    variants = sorted(set(names))
    per_pass = replace(options, capacity=max(1, options.capacity // len(variants)))
    tokens: list[list[int]] = [[] for _ in prompts]
    for variant in variants:
        rows = [i for i, name in enumerate(names) if name == variant]
        if variant == lora_routing.BASE:
            context: Any = model.disable_adapter()
        else:
            model.set_adapter(variant)
            context = nullcontext()
        with context:
            done = decode_rows(model, [prompts[i] for i in rows], gen, eos_ids=eos_ids, pad_id=pad_id, device=device,
                               options=per_pass, tokenizer=tokenizer)
        for i, new in zip(rows, done):
            tokens[i] = new
    return tokens


def _prefill(model: Any, prompts: Sequence[Sequence[int]], rows: list[int], names: list[str] | None,
             prefix: _Prefix | None, pad_id: int, device: torch.device, extra: dict[str, Any]) -> _Batch:
    """Run the prompts of `rows` (after the shared prefix, whose KV entries are copied in) as one
    left-padded batch; return them as a batch with their next-token logits."""
    if names is not None:
        rows = sorted(rows, key=lambda r: names[r])  # stable: each adapter's rows are one contiguous range
    start = prefix.length if prefix is not None else 0
    tails = [list(prompts[r][start:]) for r in rows]
    width = max(len(t) for t in tails)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [rows, width]
    tail_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [rows, width], 1 = real token
    for i, tail in enumerate(tails):
        ids[i, width - len(tail):] = torch.tensor(tail, dtype=torch.long)
        tail_mask[i, width - len(tail):] = 1
    ids, tail_mask = ids.to(device), tail_mask.to(device)
    positions = start + (tail_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [rows, width]; pads are masked anyway
    row_names = [names[r] for r in rows] if names is not None else None
    if prefix is not None:
        cache = prefix.cache_for(row_names, len(rows), device)
        mask = torch.cat([tail_mask.new_ones((len(rows), start)), tail_mask], dim=-1)  # [rows, prefix + width]
    else:
        cache, mask = DynamicCache(), tail_mask
    out = _forward(model, row_names, input_ids=ids, attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, **extra)
    return _Batch(list(rows), cache, mask, positions[:, -1] + 1, row_names, out.logits[:, -1, :])
