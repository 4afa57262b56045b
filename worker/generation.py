"""Batched generation of base and adapter rows on one resident copy of the base weights.

Two strategies, chosen by `inference.use_peft_directly`:
- mixed (true): a batch holds `batch_size` prompts with every variant of each, so one read of the
  weights serves (adapters + 1) rows per prompt; PEFT's `adapter_names` applies each row's adapter
  (`__base__` for none) inside the one forward pass. Prompts are sorted by length so a batch holds
  prompts of similar length (little padding).
- merged (false): the base rows run with adapters disabled; then each adapter is merged into the
  weights for its own pass and the original weights are copied back exactly afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from producer.config import GenerationConfig

from .decoding import decode

log = logging.getLogger(__name__)

#: PEFT's name for "no adapter" in a mixed batch.
PEFT_BASE = "__base__"


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


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def length_order(rows: Sequence[GenRow]) -> list[int]:
    """Row indices, longest prompt first (stable), so each batch has prompts of similar length."""
    return sorted(range(len(rows)), key=lambda i: -len(rows[i].input_ids))


def _left_pad(rows: Sequence[GenRow], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [batch, width]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [batch, width], 1 = real token
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, width - n :] = torch.tensor(row.input_ids, dtype=torch.long)
        mask[i, width - n :] = 1
    return ids.to(device), mask.to(device)


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


def _generate_batch(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[GenRow],
    gen: GenerationConfig,
    *,
    mixed: bool,
    device: torch.device,
) -> list[GenResult]:
    ids, mask = _left_pad(rows, tokenizer.pad_token_id, device)
    eos_ids = _eos_ids(model, tokenizer)
    names = [r.adapter or PEFT_BASE for r in rows] if mixed else None
    new = decode(model, tokenizer, ids, mask, gen, eos_ids=eos_ids, adapter_names=names)
    return [finish(tokenizer, row, eos_ids=eos_ids, stop=gen.stop) for row in new]


def prompt_batches(rows: Sequence[GenRow], prompts_per_batch: int) -> list[list[int]]:
    """Row indices in batches of `prompts_per_batch` prompts, each with all its rows (variants),
    longest prompts first."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in length_order(rows):
        groups.setdefault(rows[i].input_ids, []).append(i)
    ordered = list(groups.values())
    return [[i for group in ordered[start:start + prompts_per_batch] for i in group]
            for start in range(0, len(ordered), prompts_per_batch)]


def generate_mixed(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[GenRow],
    gen: GenerationConfig,
    *,
    batch_size: int,
    device: torch.device,
) -> list[GenResult]:
    """All rows, base and adapters together: batches of `batch_size` prompts x their variants."""
    results: list[GenResult | None] = [None] * len(rows)
    for batch in prompt_batches(rows, batch_size):
        for i, result in zip(batch, _generate_batch(model, tokenizer, [rows[i] for i in batch], gen, mixed=True,
                                                       device=device)):
            results[i] = result
    return [r for r in results if r is not None]


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
) -> list[GenResult]:
    """One pass per variant: base with adapters disabled, then each adapter merged in turn.

    `layers_of(adapter)` gives the LoRA layers an adapter changes.
    """
    results: list[GenResult | None] = [None] * len(rows)
    by_variant: dict[str | None, list[int]] = {}
    for i, row in enumerate(rows):
        by_variant.setdefault(row.adapter, []).append(i)
    for adapter, indices in by_variant.items():
        ordered = sorted(indices, key=lambda i: -len(rows[i].input_ids))
        if adapter is None:
            context: Any = peft_model.disable_adapter()
        else:
            peft_model.set_adapter(adapter)  # layers this adapter does not touch then add nothing
            context = merged(layers_of(adapter), adapter)
        with context:
            for batch in _batches(ordered, batch_size):
                outs = _generate_batch(peft_model, tokenizer, [rows[i] for i in batch], gen, mixed=False,
                                       device=device)
                for i, result in zip(batch, outs):
                    results[i] = result
    return [r for r in results if r is not None]
