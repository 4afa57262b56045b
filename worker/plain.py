"""Plain transformers + PEFT generation, one prompt at a time: the reference every fast path is
held to, the exact fallback for a model the engine is not proven on, and what `verify` runs.

Each prompt goes alone through `model.generate` with only the run's settings (not the defaults of
the model's own generation config), the variant chosen the plain PEFT way: adapters disabled for the
base model, `set_adapter` for an adapter. Tokens are cut where the engine cuts them: after the first
EOS, or at the step whose text completes a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from contract.config import GenerationConfig

from . import lora_routing


@dataclass(frozen=True)
class PlainRow:
    tokens: list[int]  # the new tokens, EOS included when hit
    logits: list[torch.Tensor]  # per new token, the logits it was chosen from: each [vocab]


def stop_window(stop: Sequence[str]) -> int:
    """How many trailing tokens can hold a stop string that the last token completed."""
    return max((len(s) for s in stop), default=0) + 2


def ends_in_stop(tokenizer: Any, tokens: Sequence[int], stop: Sequence[str]) -> bool:
    """Whether the text of the last tokens contains a stop string (checked after every step)."""
    tail = tokenizer.decode(list(tokens[-stop_window(stop):]), skip_special_tokens=True)
    return any(s in tail for s in stop)


def cut(tokens: Sequence[int], *, eos_ids: set[int], stop: Sequence[str], tokenizer: Any) -> list[int]:
    """The tokens the engine would have generated: up to the first EOS or completed stop string."""
    out: list[int] = []
    for token in tokens:
        out.append(token)
        if token in eos_ids or (stop and ends_in_stop(tokenizer, out, stop)):
            break
    return out


def variant(model: Any, name: str | None) -> Any:
    """The plain PEFT way to run `model` as variant `name` (None or `__base__`: adapters disabled)."""
    if name is None:
        return nullcontext()
    if name == lora_routing.BASE:
        return model.disable_adapter()
    model.set_adapter(name)
    return nullcontext()


@torch.inference_mode()
def generate_one(model: Any, ids: Sequence[int], gen: GenerationConfig, *, eos_ids: set[int], pad_id: int,
                 device: torch.device, tokenizer: Any) -> PlainRow:
    """One prompt through `model` as it is (the caller picks the variant)."""
    from transformers import GenerationConfig as HFGenerationConfig

    settings = HFGenerationConfig(
        max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
        temperature=gen.temperature if gen.do_sample else None, top_p=gen.top_p if gen.do_sample else None,
        top_k=None, eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True,
    )
    inputs = torch.tensor([list(ids)], dtype=torch.long, device=device)  # [1, prompt]
    out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), generation_config=settings)
    new = out.sequences[0, len(ids):].tolist()
    tokens = cut(new, eos_ids=eos_ids, stop=gen.stop, tokenizer=tokenizer)
    return PlainRow(tokens, [step[0] for step in out.logits[:len(tokens)]])


def generate_plain(model: Any, prompts: Sequence[Sequence[int]], gen: GenerationConfig, *,
                   names: Sequence[str] | None, eos_ids: set[int], pad_id: int, device: torch.device,
                   tokenizer: Any) -> list[list[int]]:
    """Every prompt alone, through `names[i]` (None: the model as it is), grouped by variant."""
    tokens: list[list[int]] = [[] for _ in prompts]
    groups: dict[str | None, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(names[i] if names is not None else None, []).append(i)
    for name, rows in groups.items():
        with variant(model, name):
            for i in rows:
                tokens[i] = generate_one(model, prompts[i], gen, eos_ids=eos_ids, pad_id=pad_id, device=device,
                                         tokenizer=tokenizer).tokens
    return tokens
