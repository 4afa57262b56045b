"""Batched generation of base and adapter rows on one resident copy of the base weights.

Two strategies, chosen by `inference.use_peft_directly`:
- mixed (true): rows of every variant share batches; PEFT's `adapter_names` applies each row's
  adapter (`__base__` for none) inside one forward pass. Rows are sorted by prompt length so a
  batch holds prompts of similar length (little padding), and the variants of one prompt sit
  side by side.
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
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from producer.config import GenerationConfig

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


class StopOnStrings(StoppingCriteria):
    """Ends a row once its generated text contains a stop string.

    Decodes only the last few tokens of each row per step (a stop string completed at this step
    lies within them), which costs far less than transformers' own `stop_strings`, whose set-up
    scans the whole vocabulary on every `generate` call.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], prompt_width: int) -> None:
        self.tokenizer, self.stops, self.prompt_width = tokenizer, list(stops), prompt_width
        self.window = max(len(s) for s in stops) + 2  # tokens: each holds at least one character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # input_ids: [batch, prompt_width + generated so far]
        start = max(self.prompt_width, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        done = [any(stop in tail for stop in self.stops) for tail in tails]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _generate_kwargs(gen: GenerationConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "do_sample": gen.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if gen.do_sample:
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p)
    else:  # silence the model's own sampling defaults
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@torch.inference_mode()
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
    kwargs = _generate_kwargs(gen, tokenizer)
    if gen.stop:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopOnStrings(tokenizer, gen.stop, ids.shape[1])])
    if mixed:
        kwargs["adapter_names"] = [r.adapter or PEFT_BASE for r in rows]
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)  # [batch, width + new]
    new = out[:, ids.shape[1] :].tolist()
    eos_ids = _eos_ids(model, tokenizer)
    return [finish(tokenizer, row, eos_ids=eos_ids, stop=gen.stop) for row in new]


def generate_mixed(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[GenRow],
    gen: GenerationConfig,
    *,
    batch_size: int,
    device: torch.device,
) -> list[GenResult]:
    """All rows, base and adapters together, in length-sorted batches of `batch_size` rows."""
    results: list[GenResult | None] = [None] * len(rows)
    for batch in _batches(length_order(rows), batch_size):
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
