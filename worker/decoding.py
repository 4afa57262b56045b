"""The decode loop: rows stream through one batch on one resident copy of the weights.

What it does that `transformers.generate` over fixed batches does not (each can be switched off in
`DecodeOptions`, and each has a test showing it leaves greedy outputs unchanged):
- finished rows leave: a row that reaches EOS, a stop string or its token budget is dropped from
  the batch and from the KV cache at once, so it costs nothing more;
- refill: waiting rows are admitted as slots free up (once half the batch is free: fewer, larger
  prefills), so the batch stays near `capacity` rows per read of the weights until the work runs
  out, instead of draining to its longest row;
- shared prefix: the prompt prefix common to every row (the chat template's system header, a
  few-shot block) is computed once per variant and its KV entries are held once per variant, not
  once per row;
- similar lengths: rows are admitted longest prompt first, so each prefill pads little;
- logits for the last position only: the prefill never builds a [rows, tokens, vocab] tensor;
- on CPU, the output projection runs on a multiple of 8 rows (see the end of this docstring).

Base and adapter rows share the batch: each adapter's rows are one contiguous range, routed in
the LoRA layers (`lora_routing`), or PEFT's `adapter_names` where routing does not apply; a model
whose adapters no batch can mix (DoRA, LoRA on a mixture-of-experts expert) runs one pass per
variant instead. Which of these paths a call may take is decided once per call by
`fidelity.plan_decode`, which falls back to an exact path (and says why) wherever a fast one
cannot be proven equal to plain PEFT: no shared prefix under a short sliding window, and plain
one-prompt-at-a-time generation for an architecture outside the proven list.
KV layout (`_RowsLayer`): per decoder layer, the shared prefix once per variant, then the rows' own
columns in one buffer of `capacity` rows. All rows share one column index per cache position and
end at the newest column (rows admitted later are padded on the left, masked out; position ids
count only real tokens); columns no row uses any more are dropped. Decode steps, finished rows
and joining rows (prefilled straight into the buffer) all write in place: memory stays at what
the rows in flight need, with no copy of the cache per step.
On CPU the output projection runs on a multiple of 8 rows (`_pad_output_rows`): float32 BLAS
took 15.1 ms at 13 rows and 8.1 ms padded to 16 for the demo model's head (bench/rows_per_pass.py).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from contract.config import GenerationConfig

from . import lora_routing, plain
from .fidelity import DecodePlan, plan_decode
from .plain import ends_in_stop, generate_plain

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
    refill_fraction: float = 0.5
    #: Route mixed batches through `lora_routing` where the model allows it (else PEFT's `adapter_names`).
    route_lora: bool = True
    #: Compute logits for the last position of a prefill only.
    last_logits_only: bool = True
    #: On CPU, run the output projection on a multiple of 8 rows (faster there with float32 BLAS).
    pad_output_rows: bool = True


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
    the rows in flight, or rows just prefilled, about to join them. The mask's first `plen` columns
    are the shared prefix; the rest are the rows' own columns (`_RowsLayer`)."""

    def __init__(self, rows: list[int], cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor,
                 names: list[str] | None, logits: torch.Tensor | None, plen: int) -> None:
        self.rows, self.cache, self.mask, self.next_pos, self.names, self.logits, self.plen = (
            rows, cache, mask, next_pos, names, logits, plen)

    def __len__(self) -> int:
        return len(self.rows)

    def keep(self, slots: list[int]) -> None:
        """Keep only these slots, in this order; drop the row columns that no remaining row uses."""
        if slots == list(range(len(self.rows))):
            return
        index = torch.tensor(slots, device=self.mask.device)
        self.rows = [self.rows[s] for s in slots]
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        if self.logits is not None:
            self.logits = self.logits[index]
        for layer in _layers(self.cache):
            layer.batch_select_indices(index)
        if self.names is not None:
            self.names = [self.names[s] for s in slots]
        used = self.mask[:, self.plen:].any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        if first > 0:
            self.mask = torch.cat([self.mask[:, :self.plen], self.mask[:, self.plen + first:]], dim=1)
            for layer in _layers(self.cache):
                layer.trim(first)

    def group(self) -> None:
        """Order the rows by adapter, so that each adapter's rows are one contiguous range."""
        if self.names is not None:
            names = self.names
            self.keep(sorted(range(len(names)), key=lambda s: names[s]))

    def absorb(self, fresh: _Batch) -> None:
        """Append the rows of `fresh`, prefilled into this batch's cache (`_prefill(into=...)`); the
        shorter rows' columns are padded on the left."""
        p = self.plen
        width = max(self.mask.shape[1], fresh.mask.shape[1]) - p
        self.rows += fresh.rows
        self.mask = torch.cat([torch.cat([m[:, :p], _pad_left(m[:, p:], width)], dim=1)
                               for m in (self.mask, fresh.mask)])
        self.next_pos = torch.cat([self.next_pos, fresh.next_pos])
        if self.names is not None and fresh.names is not None:
            self.names += fresh.names
        assert self.logits is not None and fresh.logits is not None and fresh.cache is self.cache
        self.logits = torch.cat([self.logits, fresh.logits])
        for layer in _layers(self.cache):
            layer.commit()

    def step(self, model: Any, tokens: torch.Tensor, route: bool) -> None:
        """One decode step: append `tokens` [rows, 1] and compute the next logits."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self), 1))], dim=-1)
        out = _forward(model, self.names, route=route, input_ids=tokens, attention_mask=self.mask,
                       position_ids=self.next_pos[:, None], past_key_values=self.cache, use_cache=True)
        self.logits = out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1


class _Scratch:
    """Working memory for the caches of one decode call (the whole keys and values handed to
    attention, the rows being compacted), reused so that a decode step allocates nothing."""

    def __init__(self) -> None:
        self._flat: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of `shape` (contents undefined), valid until `slot` is taken again."""
        numel = 1
        for size in shape:
            numel *= size
        flat = self._flat.get(slot)
        if flat is None or flat.numel() < numel or flat.dtype != like.dtype or flat.device != like.device:
            flat = self._flat[slot] = like.new_empty(numel + numel // 4)  # room to grow a little
        return flat[:numel].view(shape)


class _RowsLayer(DynamicLayer):
    """One decoder layer's KV entries for a batch: the shared prefix held once per variant (row i
    reads variant `pick[i]`), then each row's own columns, in a buffer of `reserve` rows and some
    spare columns, so that a decode step writes its column in place, finished rows are compacted in
    place and joining rows are written in place: no step copies the layer's cache into a new tensor.

    `update` hands attention the whole [rows, heads, prefix + columns, dim] (the prefix copied in
    front, per variant, in `scratch`); to the model (mask sizes, positions) the layer is as long as
    that. Own columns are right-aligned: every row's newest entry is in the last column."""

    #: Columns allocated beyond those in use, so that only every SPARE-th step reallocates.
    SPARE = 4

    def __init__(self, prefix: tuple[torch.Tensor, torch.Tensor] | None = None, pick: Sequence[int] = (),
                 scratch: _Scratch | None = None, reserve: int = 0) -> None:
        super().__init__()
        self.prefix = prefix  # (keys, values), each [variants, heads, prefix, dim]
        self.pick = list(pick)
        self.scratch = scratch if scratch is not None else _Scratch()
        self.reserve = reserve
        self._k: torch.Tensor | None = None  # [reserved rows, heads, allocated columns, dim]
        self._v: torch.Tensor | None = None
        self._m = self._start = self._n = 0  # rows in use; first column and columns in use
        #: Rows being prefilled into this layer: (first row, end row, first column, end column,
        #: the batch's first column once they join, their variants); columns they have written.
        self._pending: tuple[int, int, int, int, int, list[int]] | None = None
        self._written = 0

    @property
    def plen(self) -> int:
        return 0 if self.prefix is None else int(self.prefix[0].shape[2])

    def _own(self, buffer: torch.Tensor) -> torch.Tensor:
        """The rows and columns in use of `buffer`."""
        return buffer[:self._m, :, self._start:self._start + self._n]

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        return self._k, self._v

    def _sync(self) -> None:
        """`keys`/`values`: views of the columns in use."""
        if self._k is not None and self._v is not None:
            self.keys, self.values = self._own(self._k), self._own(self._v)

    def _reallocate(self, rows: int, columns: int, like: torch.Tensor, at: int = 0) -> None:
        """New buffers of at least `rows` rows and `columns` (+ spare) columns, zeros but for the rows
        in use, copied in at column `at`."""
        shape = (max(rows, self.reserve), like.shape[1], columns + self.SPARE, like.shape[3])
        k, v = like.new_zeros(shape), like.new_zeros(shape)
        if self._k is not None and self._v is not None:
            k[:self._m, :, at:at + self._n], v[:self._m, :, at:at + self._n] = self._own(self._k), self._own(self._v)
        self._k, self._v, self._start = k, v, at

    def _move(self, at: int) -> None:
        """Move the rows in use to start at column `at`, in place."""
        for buffer in self._buffers():
            own = self._own(buffer)
            staged = self.scratch.take(0, tuple(own.shape), own)
            staged.copy_(own)
            buffer[:self._m, :, at:at + self._n] = staged
        self._start = at
        self._sync()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        t = key_states.shape[2]
        if self._pending is not None:  # rows joining the batch: written into their reserved place
            r0, r1, c0, c1, _start, pick = self._pending
            assert (r1 - r0, c1 - c0) == (key_states.shape[0], t)
            k, v = self._buffers()
            k[r0:r1, :, c0:c1] = key_states
            v[r0:r1, :, c0:c1] = value_states
            self._written = t
            runs = lora_routing.segments(pick)
            return self._whole(k[r0:r1, :, c0:c1], 0, runs), self._whole(v[r0:r1, :, c0:c1], 1, runs)
        if self._k is None:
            self.is_initialized, self.device = True, key_states.device
            self._m = key_states.shape[0]
            self.pick = self.pick or [0] * self._m
            self._reallocate(self._m, t, key_states)
        elif self._start + self._n + t > self._k.shape[2]:  # no column free on the right
            if self._n + t <= self._k.shape[2]:
                self._move(0)  # the trimmed columns on the left make room
            else:
                self._reallocate(self._m, self._n + t, self._k)
        k, v = self._buffers()
        end = self._start + self._n
        k[:self._m, :, end:end + t] = key_states
        v[:self._m, :, end:end + t] = value_states
        self._n += t
        self._sync()
        runs = lora_routing.segments(self.pick)
        return self._whole(self._own(k), 0, runs), self._whole(self._own(v), 1, runs)

    def _whole(self, own: torch.Tensor, which: int, runs: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """The prefix (each run of rows with its variant's) followed by the rows' own columns."""
        if self.prefix is None:
            return own
        prefix = self.prefix[which]
        p = prefix.shape[2]
        out = self.scratch.take(which, (own.shape[0], own.shape[1], p + own.shape[2], own.shape[3]), own)
        out[:, :, p:] = own
        for variant, start, end in runs:
            out[start:end, :, :p] = prefix[variant]
        return out

    def get_seq_length(self) -> int:
        if self._pending is not None:
            return self.plen + self._written
        return self.plen + self._n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep these rows, in this order, compacted in place."""
        if self._k is None or self._v is None:
            return
        m, end = len(indices), self._start + self._n
        for buffer in self._buffers():
            own = self._own(buffer)
            kept = self.scratch.take(0, (m, *own.shape[1:]), own)
            torch.index_select(own, 0, indices, out=kept)
            buffer[:m, :, self._start:end] = kept
        self.pick = [self.pick[i] for i in indices.tolist()]
        self._m = m
        self._sync()

    def trim(self, first: int) -> None:
        """Drop the first `first` own columns (no row uses them)."""
        self._start, self._n = self._start + first, self._n - first
        self._sync()

    def open(self, pick: list[int], columns: int) -> None:
        """Make room for `len(pick)` rows (variants `pick`) with `columns` own columns ending at this
        layer's last column, zeros on the left of the shorter rows; the next `update` writes theirs
        (their prefill), `commit` adds them to the rows in use."""
        assert self._pending is None
        k, _v = self._buffers()
        rows, width = self._m + len(pick), max(self._n, columns)
        end = self._start + self._n
        if rows > k.shape[0] or width > k.shape[2]:  # no room below or across: a new buffer
            self._reallocate(rows, width, k, at=width - self._n)
            end = width
        elif end < width:  # no room on the left: move right
            self._move(width - self._n)
            end = width
        start = end - width
        for buffer in self._buffers():
            buffer[:self._m, :, start:end - self._n] = 0
            buffer[self._m:rows, :, start:end - columns] = 0
        self._pending, self._written = (self._m, rows, end - columns, end, start, list(pick)), 0

    def commit(self) -> None:
        """The rows opened for are now in use."""
        assert self._pending is not None
        _r0, rows, _c0, end, start, pick = self._pending
        self.pick = self.pick + pick
        self._m, self._start, self._n, self._pending = rows, start, end - start, None
        self._sync()


#: Whether the output projections patched by `_pad_output_rows` pad their rows (inside `decode_rows`).
_PAD_ROWS: ContextVar[bool] = ContextVar("pad_output_rows", default=False)


def _padded_rows_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows % 8 == 0 or not _PAD_ROWS.get():
        return F.linear(x, self.weight, self.bias)
    padded = x.new_zeros((rows + 8 - rows % 8, x.shape[-1]))
    padded[:rows] = x.reshape(rows, x.shape[-1])
    return F.linear(padded, self.weight, self.bias)[:rows].reshape(*x.shape[:-1], self.weight.shape[0])


def _pad_output_rows(model: Any) -> None:
    """Let the model's output projection run on a multiple of 8 rows (zeros below the real ones)
    where `_PAD_ROWS` says so; elsewhere it is a plain `nn.Linear`."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and "forward" not in vars(head):
        head.forward = types.MethodType(_padded_rows_forward, head)  # type: ignore[method-assign]


def _rows_cache(layers: list[_RowsLayer] | None = None, scratch: _Scratch | None = None,
                reserve: int = 0) -> DynamicCache:
    """A cache of `_RowsLayer`s: these, or (no shared prefix) one made per decoder layer as it runs."""
    cache = DynamicCache()
    if layers:
        cache.layers = list[Any](layers)
        cache.layer_class_to_replicate = None
    else:
        cache.layers = []
        made: Any = functools.partial(_RowsLayer, scratch=scratch, reserve=reserve)
        cache.layer_class_to_replicate = made
    return cache


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


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    """`mask` [rows, columns] with zero columns on the left up to `width`."""
    missing = width - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1)


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
    plan: DecodePlan | None = None,
) -> list[list[int]]:
    """New tokens of each prompt (EOS included when hit), the prompt run through `adapter_names[i]`
    (PEFT's mixed batch; None: whatever the model is now). `tokenizer` is needed for stop strings.
    `plan`: the paths to take (`fidelity.plan_decode` of these arguments when not given)."""
    if gen.stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    if not prompts:
        return []
    names = list(adapter_names) if adapter_names is not None else None
    if plan is None:
        plan = plan_decode(model, prompts, gen, options, names)
    if plan.plain:
        return generate_plain(model, prompts, gen, names=names, eos_ids=eos_ids, pad_id=pad_id, device=device,
                              tokenizer=tokenizer)
    options = plan.options
    if names is not None and plan.mixing == "per_variant":
        return _pass_per_variant(model, prompts, gen, names, eos_ids=eos_ids, pad_id=pad_id, device=device,
                                 options=options, tokenizer=tokenizer)
    pad = options.pad_output_rows and device.type == "cpu"
    if pad:
        _pad_output_rows(model)
    token = _PAD_ROWS.set(pad)
    try:
        return _stream(model, prompts, gen, names, eos_ids=eos_ids, pad_id=pad_id, device=device, options=options,
                       tokenizer=tokenizer)
    finally:
        _PAD_ROWS.reset(token)


def _stream(model: Any, prompts: Sequence[Sequence[int]], gen: GenerationConfig, names: list[str] | None, *,
            eos_ids: set[int], pad_id: int, device: torch.device, options: DecodeOptions,
            tokenizer: Any) -> list[list[int]]:
    """`decode_rows`' loop: rows stream through one batch."""
    tokens: list[list[int]] = [[] for _ in prompts]
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
    batch: _Batch | None = None
    scratch = _Scratch()
    while waiting or batch is not None:
        free = capacity - (len(batch) if batch is not None else 0)
        if waiting and (batch is None or free >= min(threshold, len(waiting))):
            admitted, waiting = waiting[:free], waiting[free:]
            # The first rows of a batch reserve its capacity in the cache, so that rows joining later
            # are written in place.
            fresh = _prefill(model, prompts, admitted, names, prefix, pad_id, device, extra, scratch,
                             reserve=min(capacity, len(waiting) + len(admitted)), into=batch)
            if batch is None:
                batch = fresh
            else:
                batch.absorb(fresh)
            batch.group()
        assert batch is not None
        assert batch.logits is not None
        chosen = _sample(batch.logits, gen).tolist()
        batch.logits = None  # used: `step` computes the next ones
        keep: list[int] = []
        for slot, (row, token) in enumerate(zip(batch.rows, chosen)):
            tokens[row].append(token)
            if token in eos_ids or len(tokens[row]) >= gen.max_new_tokens:
                continue
            if gen.stop and ends_in_stop(tokenizer, tokens[row], gen.stop):
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
    for name in variants:
        rows = [i for i, row_name in enumerate(names) if row_name == name]
        with plain.variant(model, name):
            done = decode_rows(model, [prompts[i] for i in rows], gen, eos_ids=eos_ids, pad_id=pad_id, device=device,
                               options=per_pass, tokenizer=tokenizer)
        for i, new in zip(rows, done):
            tokens[i] = new
    return tokens


def _prefill(model: Any, prompts: Sequence[Sequence[int]], rows: list[int], names: list[str] | None,
             prefix: _Prefix | None, pad_id: int, device: torch.device, extra: dict[str, Any], scratch: _Scratch,
             reserve: int = 0, into: _Batch | None = None) -> _Batch:
    """Run the prompts of `rows` (after the shared prefix) as one left-padded batch; return them as a
    batch with their next-token logits. Their KV entries go into a new cache (reserving `reserve`
    rows), or straight into the cache of the batch `into`, which they are about to join."""
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
    pick = [prefix.index[n] for n in row_names] if prefix is not None and row_names is not None else [0] * len(rows)
    if into is not None:
        cache = into.cache
        for layer in _layers(cache):
            layer.open(pick, width)
    elif prefix is not None:
        cache = _rows_cache([_RowsLayer(layer, pick, scratch, reserve) for layer in prefix.layers])
    else:
        cache = _rows_cache(scratch=scratch, reserve=reserve)
    mask = torch.cat([tail_mask.new_ones((len(rows), start)), tail_mask], dim=-1)  # [rows, prefix + width]
    out = _forward(model, row_names, input_ids=ids, attention_mask=mask, position_ids=positions,
                   past_key_values=cache, use_cache=True, **extra)
    return _Batch(list(rows), cache, mask, positions[:, -1] + 1, row_names, out.logits[:, -1, :], start)
