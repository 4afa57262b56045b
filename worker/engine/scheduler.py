"""The decode loop: rows stream through one batch on one resident copy of the weights.

What it does that `transformers.generate` over fixed batches does not (each can be switched off in
`DecodeOptions`):
- finished rows leave: a row that reaches EOS, a stop string or its token budget is dropped from
  the batch and from the KV cache at once, so it costs nothing more;
- refill: waiting rows are admitted as slots free up (once half the batch is free: fewer, larger
  prefills), so the batch stays near `capacity` rows per read of the weights until the work runs
  out, instead of draining to its longest row;
- shared prefix (`prefix.SharedPrefix`): the prompt prefix common to every row is computed once per
  variant and its KV entries are held once per variant, not once per row;
- in-place attention (`attention`): a decode step's attention reads the prefix and each row's own
  columns where they are, the prefix once per run of rows of a variant, so that no step copies the
  cache;
- similar lengths: rows are admitted longest prompt first, so each prefill pads little;
- logits for the last position only: the prefill never builds a [rows, tokens, vocab] tensor; at a
  refill the rows in flight take their next tokens before the prefill and the joining rows right
  after it, so their [rows, vocab] logits are freed, not concatenated and reordered (a run's memory
  peaks at the refills: bench/README.md, memory);
- on CPU, the output projection runs on a multiple of 8 rows (`cpu_head`), float32 linear layers
  run through oneDNN rather than MKL's GEMM where that was timed faster on the machine
  (`cpu_linear`), the in-place attention is one C kernel
  (`cpu_attention`), and the loop runs on one thread while other work has the cores (`contention`);
- on CPU, the C heap gives a step's large tensors pages of their own, and hands back its free pages
  after each prefill (`worker.heap`), so that what a run keeps resident depends less on where freed
  blocks fell in the heap;
- one host-device sync per decode step: the sampled tokens, read back once (`tolist`); the next
  step's input is taken from them on the device, and which rows remain is known on the host;
- a shutdown stops it at the next step: `DecodeRequest.check_stop` reads a Python flag and raises
  `ChunkInterrupted` (what was generated is dropped; the chunk goes back to the queue).

Base and adapter rows share the batch (each adapter's rows one contiguous range, routed by
`lora_routing`, or PEFT's `adapter_names`), or run one pass per variant where no batch can mix them,
as `fidelity.plan_decode` decides once per call; it also picks plain generation (`plain`) where the
fast path is not proven.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .. import heap
from . import attention, contention, cpu_linear, plain, steps
from .batch import Batch
from .call import DecodeCall, DecodeOptions
from .cpu_head import padding_rows
from .fidelity import DecodePlan, plan_decode
from .kv_cache import RowsLayer, cache_layers, rows_cache
from .prefix import SharedPrefix, common_prefix
from .request import DecodeRequest


@torch.inference_mode()
def decode_rows(model: Any, prompts: Sequence[Sequence[int]], request: DecodeRequest, *, options: DecodeOptions,
                adapter_names: Sequence[str] | None = None, plan: DecodePlan | None = None) -> list[list[int]]:
    """New tokens of each prompt (EOS included when hit), the prompt run through `adapter_names[i]`
    (PEFT's mixed batch; None: whatever the model is now). `plan`: the paths to take
    (`fidelity.plan_decode` of these arguments when not given)."""
    if not prompts:
        return []
    names = list(adapter_names) if adapter_names is not None else None
    if plan is None:
        plan = plan_decode(model, prompts, request.gen, options, names)
    if plan.plain:
        return plain.generate_plain(model, prompts, request, names)
    call = DecodeCall(model, prompts, request, names, plan.options, plan)
    if names is not None and plan.mixing == "per_variant":
        return _pass_per_variant(call)
    cpu = call.device.type == "cpu"
    if cpu:
        heap.apply()  # a step's large tensors go back to the system when freed (`worker.heap`)
    padded = call.options.pad_output_rows and cpu
    with padding_rows(model, padded), \
            cpu_linear.onednn(model, cpu and cpu_linear.wanted(model, call.options.onednn_linear,
                                                               call.options.capacity, padded)), \
            attention.in_place(model, call.options.in_place_attention and cpu), \
            contention.governed(call.options.govern_threads and cpu):
        return _stream(call)


def _stream(call: DecodeCall) -> list[list[int]]:
    """`decode_rows`' loop: rows stream through one batch."""
    prompts, names, options = call.prompts, call.names, call.options
    tokens: list[list[int]] = [[] for _ in prompts]
    shared = common_prefix(prompts) if options.share_prefix else 0
    if shared >= options.min_prefix:
        call.prefix = SharedPrefix(call, prompts[0][:shared], sorted(set(names)) if names is not None else None)

    # Longest prompts first (stable: a prompt's variants stay together), so a prefill pads little.
    waiting = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    capacity = max(1, options.capacity)
    threshold = max(1, int(capacity * options.refill_fraction)) if options.refill else capacity
    batch: Batch | None = None
    trim = options.trim_heap and call.device.type == "cpu"
    observer = steps.observer  # None unless a benchmark records the steps (`steps.observe`)
    stepped: tuple[int, int] | None = None  # (rows, context) of the forward pass since the last sync
    synced = 0.0
    while waiting or batch is not None:
        call.request.check_stop()  # once per step: a Python flag, no device sync
        free = capacity - (len(batch) if batch is not None else 0)
        prefilled = False
        if waiting and (batch is None or free >= min(threshold, len(waiting))):
            prefilled = True
            if batch is not None:  # the rows in flight sample first: their logits are freed before the prefill
                batch.choose(call.sampling)
            admitted, waiting = waiting[:free], waiting[free:]
            # The first rows of a batch reserve its capacity in the cache, so that rows joining later
            # are written in place.
            fresh = _prefill(call, admitted, reserve=min(capacity, len(waiting) + len(admitted)), into=batch)
            fresh.choose(call.sampling)
            if trim:
                heap.trim()  # the prefill's intermediates, freed inside the C heap, go back to the system
            if batch is None:
                batch = fresh
            else:
                batch.absorb(fresh)
            del fresh
            batch.group()
        assert batch is not None
        batch.choose(call.sampling)  # [rows], on the device; the logits are dropped (`step` computes the next)
        chosen, batch.chosen = batch.chosen, None
        assert chosen is not None
        keep: list[int] = []
        sampled = chosen.tolist()  # the step's one sync
        contention.step()
        if observer is not None:  # sync to sync: the forward pass, this sampling and any prefill between
            if stepped is not None:
                observer(steps.DecodeStep(stepped[0], stepped[1], prefilled, steps.clock() - synced))
            stepped, synced = None, steps.clock()  # the observer's own time is left out
        for slot, (row, token) in enumerate(zip(batch.rows, sampled)):
            tokens[row].append(token)
            if not call.request.finished(tokens[row]):
                keep.append(slot)
        if not keep:
            batch = None
            continue
        index = batch.keep(keep)
        batch.step(call, (chosen if index is None else chosen.index_select(0, index))[:, None])
        if observer is not None:
            stepped = (len(batch), int(batch.mask.shape[1]))
    return tokens


def _pass_per_variant(call: DecodeCall) -> list[list[int]]:
    """One pass per variant (adapters disabled for the base rows, else that adapter active), for a
    model whose adapters cannot share a batch; each pass keeps its share of the capacity."""
    assert call.names is not None
    names = call.names
    variants = sorted(set(names))
    per_pass = replace(call.options, capacity=max(1, call.options.capacity // len(variants)))
    tokens: list[list[int]] = [[] for _ in call.prompts]
    for name in variants:
        rows = [i for i, row_name in enumerate(names) if row_name == name]
        with plain.variant(call.model, name):
            done = decode_rows(call.model, [call.prompts[i] for i in rows], call.request, options=per_pass)
        for i, new in zip(rows, done):
            tokens[i] = new
    return tokens


def _prefill(call: DecodeCall, rows: list[int], reserve: int = 0, into: Batch | None = None) -> Batch:
    """Run the prompts of `rows` (after the shared prefix) as one left-padded batch; return them as a
    batch with their next-token logits. Their KV entries go into a new cache (reserving `reserve`
    rows), or straight into the cache of the batch `into`, which they are about to join."""
    names, prefix = call.names, call.prefix
    if names is not None:
        rows = sorted(rows, key=lambda r: names[r])  # stable: each adapter's rows are one contiguous range
    start = prefix.length if prefix is not None else 0
    tails = [list(call.prompts[r][start:]) for r in rows]
    width = max(len(t) for t in tails)
    ids = torch.full((len(rows), width), call.request.pad_id, dtype=torch.long)  # [rows, width]
    tail_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [rows, width], 1 = real token
    for i, tail in enumerate(tails):
        ids[i, width - len(tail):] = torch.tensor(tail, dtype=torch.long)
        tail_mask[i, width - len(tail):] = 1
    ids, tail_mask = ids.to(call.device), tail_mask.to(call.device)
    positions = start + (tail_mask.cumsum(dim=-1) - 1).clamp(min=0)  # [rows, width]; pads are masked anyway
    row_names = [names[r] for r in rows] if names is not None else None
    pick = [prefix.index[n] for n in row_names] if prefix is not None and row_names is not None else [0] * len(rows)
    # No row ever holds more columns than the longest prompt after the prefix and its token budget.
    limit = max(len(p) for p in call.prompts) - start + call.request.gen.max_new_tokens
    if into is not None:
        cache = into.cache
        for layer in cache_layers(cache):
            layer.open(pick, width)
    elif prefix is not None:
        cache = rows_cache([RowsLayer(layer, pick, call.scratch, reserve, limit) for layer in prefix.layers])
    else:
        cache = rows_cache(scratch=call.scratch, reserve=reserve, limit=limit)
    mask = torch.cat([tail_mask.new_ones((len(rows), start)), tail_mask], dim=-1)  # [rows, prefix + width]
    out = call.forward(row_names, input_ids=ids, attention_mask=mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, **call.prefill_kwargs)
    return Batch(rows=list(rows), cache=cache, mask=mask, next_pos=positions[:, -1] + 1, names=row_names,
                 logits=out.logits[:, -1, :], plen=start, lengths=[len(t) for t in tails])
