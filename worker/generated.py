"""What the decode and scoring engines are given and give back: plain records, free of any model library,
so the chunk path (`worker.planner`, `worker.chunk`, `worker.tasks`) imports without torch.
`worker.engine.generation` re-exports the generation records (their import path before they moved here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenRow:
    """One row to generate: a tokenized prompt through one adapter (None: the base model)."""

    input_ids: tuple[int, ...]
    adapter: str | None


@dataclass(frozen=True)
class GenResult:
    text: str
    output_tokens: int
    finish_reason: str  # a FinishReason: eos | stop | length (or, never generated, empty_prompt | prompt_too_long)
    token_ids: tuple[int, ...] | None = None  # every generated token, EOS included when hit; None: not known


@dataclass(frozen=True)
class ScoreRow:
    """One context and the continuations scored after it, through one adapter (None: the base model).

    Invariants: `context_ids` holds at least one token (an empty context is the prefix token, as the
    harness does); every continuation holds at least one token."""

    context_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    adapter: str | None


@dataclass(frozen=True)
class ScoreResult:
    """A `ScoreRow`'s scores, one entry per continuation, in order."""

    logprobs: tuple[float, ...]  # per continuation: the sum of its tokens' log-probabilities (summed in float64)
    greedy: tuple[bool, ...]  # per continuation: every token is the argmax of the logits it was scored from


class StopFlag:
    """Set when the worker is asked to stop; read by the decode loop once per step. A plain attribute,
    not a `threading.Event`: it is set from a signal handler in the main thread, which must never wait
    for a lock the thread it interrupted may hold."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set
