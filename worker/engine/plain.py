"""Plain transformers + PEFT generation, one prompt at a time: the reference every fast path is
held to, the exact fallback for a model the engine is not proven on, and what `verify` runs.

Each prompt goes alone through `model.generate` with only the run's settings (not the defaults of
the model's own generation config), the variant chosen the plain PEFT way: adapters disabled for the
base model, `set_adapter` for an adapter. Tokens are cut where the engine cuts them
(`DecodeRequest.cut`): after the first EOS, or at the step whose text completes a stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from . import lora_routing
from .request import DecodeRequest


@dataclass(frozen=True)
class PlainRow:
    """One prompt's plain generation."""

    tokens: list[int]  # the new tokens, EOS included when hit
    logits: list[torch.Tensor]  # per new token, the logits it was chosen from: each [vocab]


def variant(model: Any, name: str | None) -> Any:
    """The plain PEFT way to run `model` as variant `name` (None or `__base__`: adapters disabled)."""
    if name is None:
        return nullcontext()
    if name == lora_routing.BASE:
        return model.disable_adapter()
    model.set_adapter(name)
    return nullcontext()


@torch.inference_mode()
def generate_one(model: Any, ids: Sequence[int], request: DecodeRequest) -> PlainRow:
    """One prompt through `model` as it is (the caller picks the variant)."""
    from transformers import GenerationConfig as HFGenerationConfig

    gen = request.gen
    settings = HFGenerationConfig(
        max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
        temperature=gen.temperature if gen.do_sample else None, top_p=gen.top_p if gen.do_sample else None,
        top_k=None, eos_token_id=sorted(request.eos_ids) or None,
        pad_token_id=request.pad_id, output_logits=True, return_dict_in_generate=True,
    )
    inputs = torch.tensor([list(ids)], dtype=torch.long, device=request.device)  # [1, prompt]
    extra = {"stopping_criteria": _stopping(request.stop)} if request.stop is not None else {}
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=settings,
                         **extra)
    request.check_stop()  # ended by a shutdown, not by the row's own end: nothing of it is kept
    new = out.sequences[0, len(ids):].tolist()
    tokens = request.cut(new)
    return PlainRow(tokens, [step[0] for step in out.logits[:len(tokens)]])


def _stopping(stop: Callable[[], bool]) -> Any:
    """transformers' stopping criteria that end `generate` at the step where `stop()` turns true."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


def generate_plain(model: Any, prompts: Sequence[Sequence[int]], request: DecodeRequest,
                   names: Sequence[str] | None) -> list[list[int]]:
    """Every prompt alone, through `names[i]` (None: the model as it is), grouped by variant."""
    tokens: list[list[int]] = [[] for _ in prompts]
    groups: dict[str | None, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(names[i] if names is not None else None, []).append(i)
    for name, rows in groups.items():
        with variant(model, name):
            for i in rows:
                request.check_stop()
                tokens[i] = generate_one(model, prompts[i], request).tokens
    return tokens
