"""The next token of each row, from its logits: argmax, or temperature + top-p (nucleus) sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from contract.config import GenerationConfig


@dataclass(frozen=True)
class SamplingParams:
    """How a token is chosen from logits.

    Invariants: `do_sample` False is greedy (the argmax; `temperature` and `top_p` are ignored);
    otherwise `temperature` > 0 divides the logits and `top_p` in (0, 1] keeps the smallest set of most
    likely tokens whose probabilities reach it (1.0: every token), renormalised.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = False

    @classmethod
    def from_config(cls, gen: GenerationConfig) -> SamplingParams:
        return cls(temperature=gen.temperature, top_p=gen.top_p, do_sample=gen.do_sample)


def sample(logits: torch.Tensor, *, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row [rows] (int64, on the logits' device) from `logits` [rows, vocab]. Draws from
    `generator` (default: torch's global one, which a run seeds per chunk). Forces no host-device sync."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # [rows, vocab]
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # each [rows, vocab]
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
