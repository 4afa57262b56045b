"""Batched generation of base and adapter rows on one resident copy of the base weights.

Two strategies, chosen by `inference.use_peft_directly`:
- mixed (true): up to `batch_size` prompts with every variant of each are in the batch at once, so
  one read of the weights serves (adapters + 1) rows per prompt; PEFT's `adapter_names` applies each
  row's adapter (`__base__` for none) inside the one forward pass.
- merged (false): the base rows run with adapters disabled; then each adapter is merged into the
  weights for its own pass (up to `batch_size` rows at once) and the original weights are copied
  back exactly afterwards.
Both stream rows through `decoding.decode_rows` (refill, shared prefix, finished rows leave).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from producer.config import GenerationConfig

from . import lora_routing
from .decoding import DecodeOptions, decode_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenRow:
    """One row to generate: a tokenized prompt through one adapter (None: the base model)."""

    input_ids: tuple[int, ...]
    adapter: str | None


@dataclass(frozen=True)
class GenResult:
    text: str
    output_tokens: int
    finish_reason: str  # eos | stop | length


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
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
    if cut >= 0:
        return GenResult(text[:cut], len(tokens), "stop")
    return GenResult(text, len(tokens), "eos" if ended_by_eos else "length")


def _generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[GenRow],
    gen: GenerationConfig,
    *,
    mixed: bool,
    capacity: int,
    device: torch.device,
    options: DecodeOptions | None = None,
) -> list[GenResult]:
    eos_ids = _eos_ids(model, tokenizer)
    names = [r.adapter or lora_routing.BASE for r in rows] if mixed else None
    chosen = replace(options, capacity=capacity) if options is not None else DecodeOptions(capacity=capacity)
    new = decode_rows(model, [r.input_ids for r in rows], gen, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id,
                      device=device, options=chosen, adapter_names=names, tokenizer=tokenizer)
    return [finish(tokenizer, row, eos_ids=eos_ids, stop=gen.stop) for row in new]


def generate_mixed(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[GenRow],
    gen: GenerationConfig,
    *,
    batch_size: int,
    device: torch.device,
    variants: int | None = None,
    options: DecodeOptions | None = None,
) -> list[GenResult]:
    """All rows, base and adapters together: up to `batch_size` prompts' worth of rows, each prompt
    with all its `variants` (default: the distinct adapters among `rows`), in the batch at once. A
    run whose base rows come from the cache thus still fills the batch with adapter rows."""
    variants = variants or len({r.adapter for r in rows}) or 1
    return _generate(model, tokenizer, rows, gen, mixed=True, capacity=batch_size * variants, device=device,
                     options=options)


@contextmanager
def merged(host_layers: Sequence[Any], adapter: str) -> Iterator[None]:
    """Merge `adapter` into the base weights for the block, then restore the originals bit for bit."""
    originals = [layer.get_base_layer().weight.detach().clone() for layer in host_layers]
    for layer in host_layers:
        layer.merge(adapter_names=[adapter])
    try:
        yield
    finally:
        for layer, weight in zip(host_layers, originals):
            layer.unmerge()
            layer.get_base_layer().weight.data.copy_(weight)


def generate_separate(
    peft_model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[GenRow],
    gen: GenerationConfig,
    *,
    batch_size: int,
    device: torch.device,
    layers_of: Any,
    options: DecodeOptions | None = None,
) -> list[GenResult]:
    """One pass per variant: base with adapters disabled, then each adapter merged in turn.

    `layers_of(adapter)` gives the LoRA layers an adapter changes.
    """
    results: list[GenResult | None] = [None] * len(rows)
    by_variant: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        by_variant.setdefault(row.adapter, []).append(i)
    for adapter, indices in by_variant.items():
        if adapter is None:
            context: Any = peft_model.disable_adapter()
        else:
            peft_model.set_adapter(adapter)  # layers this adapter does not touch then add nothing
            context = merged(layers_of(adapter), adapter)
        with context:
            outs = _generate(peft_model, tokenizer, [rows[i] for i in indices], gen, mixed=False,
                             capacity=batch_size, device=device, options=options)
        for i, result in zip(indices, outs):
            results[i] = result
    return [r for r in results if r is not None]
