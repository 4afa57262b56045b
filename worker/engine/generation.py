"""Batched generation of base and adapter rows on one resident copy of the base weights.

Two strategies, chosen by `inference.use_peft_directly`:
- mixed (true): up to `batch_size` prompts with every variant of each are in the batch at once, so
  one read of the weights serves (adapters + 1) rows per prompt; PEFT's `adapter_names` applies each
  row's adapter (`__base__` for none) inside the one forward pass.
- merged (false): the base rows run with adapters disabled; then each adapter is merged into the
  weights for its own pass (up to `batch_size` rows at once) and the original weights are copied
  back exactly afterwards.
Both stream rows through `scheduler.decode_rows` (refill, shared prefix, finished rows leave).
These are the engine's entry points for the chunk code (`worker.chunk`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from contract.config import GenerationConfig
from db.enums import FinishReason

from ..generated import GenResult, GenRow  # noqa: F401 - GenRow: re-exported, its import path before
from . import lora_routing
from .call import DecodeOptions
from .fidelity import plan_decode
from .request import DecodeRequest
from .scheduler import decode_rows

log = logging.getLogger(__name__)


def eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The token ids that end a row: the generation config's EOS ids and the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def finish(
    tokenizer: PreTrainedTokenizerBase, new_tokens: Sequence[int], *, eos_ids: set[int], stop: Sequence[str]
) -> GenResult:
    """Cut one row's generated tokens at EOS or the first stop string; say why it ended."""
    tokens = list(new_tokens)
    ended_by_eos = False
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            tokens, ended_by_eos = tokens[:i], True
            break
    text = str(tokenizer.decode(tokens, skip_special_tokens=True))
    cut = min((pos for pos in (text.find(s) for s in stop) if pos >= 0), default=-1)
    generated = tuple(new_tokens)
    if cut >= 0:
        return GenResult(text[:cut], len(tokens), FinishReason.STOP, generated)
    return GenResult(text, len(tokens), FinishReason.EOS if ended_by_eos else FinishReason.LENGTH, generated)


@dataclass(frozen=True)
class Batching:
    """The keyword arguments of `generate_mixed` and `generate_separate`: how rows are batched.

    `batch_size`: prompts in flight (mixed: each with all its `variants`, default the distinct
    adapters among the rows); `options`: the decode options (their capacity is set from these);
    `notes` collects the exact fallbacks taken instead of a fast path (see `fidelity`);
    `layers_of(adapter)`: the LoRA layers an adapter changes (merged passes only); `stop()`: asked
    once per decode step whether to stop (true: `ChunkInterrupted` is raised, see `DecodeRequest`).
    """

    batch_size: int
    device: torch.device
    variants: int | None = None
    options: DecodeOptions | None = None
    notes: list[str] | None = None
    layers_of: Callable[[str], Sequence[Any]] | None = None
    stop: Callable[[], bool] | None = None

    def decode_options(self, capacity: int) -> DecodeOptions:
        if self.options is None:
            return DecodeOptions(capacity=capacity)
        return replace(self.options, capacity=capacity)

    def note(self, note: str) -> None:
        if self.notes is not None and note not in self.notes:
            self.notes.append(note)


def _generate(model: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[GenRow], gen: GenerationConfig,
              how: Batching, capacity: int) -> list[GenResult]:
    """`rows` through `decode_rows`, at most `capacity` at once: mixed (each row through its adapter)
    when `how.variants` is set, else through the model as it is."""
    ends = eos_ids(model, tokenizer)
    names = [r.adapter or lora_routing.BASE for r in rows] if how.variants is not None else None
    chosen = how.decode_options(capacity)
    prompts = [r.input_ids for r in rows]
    plan = plan_decode(model, prompts, gen, chosen, names)
    for note in plan.notes:
        log.warning("exact fallback: %s", note)
        how.note(note)
    request = DecodeRequest(gen, ends, tokenizer.pad_token_id, how.device, tokenizer, stop=how.stop)
    new = decode_rows(model, prompts, request, options=chosen, adapter_names=names, plan=plan)
    return [finish(tokenizer, row, eos_ids=ends, stop=gen.stop) for row in new]


def generate_mixed(model: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[GenRow], gen: GenerationConfig,
                   **batching: Any) -> list[GenResult]:
    """All rows, base and adapters together: up to `batch_size` prompts' worth of rows, each prompt
    with all its `variants` (default: the distinct adapters among `rows`), in the batch at once. A
    run whose base rows come from the cache thus still fills the batch with adapter rows.
    `batching`: the fields of `Batching` (batch_size, device, variants, options, notes, stop)."""
    how = Batching(**batching)
    how = replace(how, variants=how.variants or len({r.adapter for r in rows}) or 1)
    assert how.variants is not None
    return _generate(model, tokenizer, rows, gen, how, how.batch_size * how.variants)


def unmergeable(peft_model: Any, layers: Sequence[Any], adapter: str) -> str | None:
    """Why merging `adapter` into these layers would not give the unmerged adapter's outputs, or None:
    a layer whose weight is tied to another module (a tied LM head and embedding: merging changes
    both), or `lora_bias` on a layer without a bias of its own (PEFT cannot merge it)."""
    uses: dict[int, int] = {}
    for _name, param in peft_model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for layer in layers:
        base = layer.get_base_layer()
        if uses.get(id(base.weight), 0) > 1:
            return f"its LoRA on a weight tied to another module ({type(base).__name__}) cannot be merged alone"
        if getattr(layer, "lora_bias", {}).get(adapter) and getattr(base, "bias", None) is None:
            return "its lora_bias sits on a layer without a bias, which PEFT cannot merge"
    return None


@contextmanager
def merged(peft_model: Any, layers: Sequence[Any], adapter: str) -> Iterator[str | None]:
    """Merge `adapter` into the base weights for the block, then restore the originals (weights and
    biases) bit for bit. Yields None, or why the adapter runs unmerged instead (weights untouched)."""
    reason = unmergeable(peft_model, layers, adapter)
    if reason is not None:
        yield reason
        return
    originals = [{name: p.detach().clone() for name, p in layer.get_base_layer().named_parameters(recurse=False)}
                 for layer in layers]
    try:
        for layer in layers:
            layer.merge(adapter_names=[adapter])
        yield None
    finally:
        for layer, saved in zip(layers, originals):
            while layer.merged:
                layer.unmerge()
            for name, param in layer.get_base_layer().named_parameters(recurse=False):
                param.data.copy_(saved[name])


def generate_separate(peft_model: Any, tokenizer: PreTrainedTokenizerBase, rows: Sequence[GenRow],
                      gen: GenerationConfig, **batching: Any) -> list[GenResult]:
    """One pass per variant: base with adapters disabled, then each adapter merged in turn.
    `batching`: the fields of `Batching` (batch_size, device, layers_of, options, notes, stop);
    `layers_of(adapter)` gives the LoRA layers an adapter changes."""
    how = replace(Batching(**batching), variants=None)
    assert how.layers_of is not None, "merged passes need layers_of"
    results: list[GenResult | None] = [None] * len(rows)
    by_variant: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        by_variant.setdefault(row.adapter, []).append(i)
    for adapter, indices in by_variant.items():
        if adapter is None:
            context: Any = peft_model.disable_adapter()
        else:
            peft_model.set_adapter(adapter)  # layers this adapter does not touch then add nothing
            context = merged(peft_model, how.layers_of(adapter), adapter)
        with context as unmerged:
            if unmerged is not None and how.notes is not None:
                log.warning("exact fallback: adapter %s runs unmerged: %s", adapter, unmerged)
                how.notes.append(f"adapter {adapter} runs unmerged in merged mode: {unmerged}")
            outs = _generate(peft_model, tokenizer, [rows[i] for i in indices], gen, how, how.batch_size)
        for i, result in zip(indices, outs):
            results[i] = result
    return [r for r in results if r is not None]
