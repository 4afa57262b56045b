"""What the decode engine is given and gives back: plain records, free of any model library, so the chunk
path (`worker.planner`, `worker.chunk`, `worker.tasks`) imports without torch. `worker.engine.generation`
re-exports them (their import path before they moved here)."""

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
    """One context and the continuations scored after it, through one adapter (None: the base model)."""

    context_ids: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    adapter: str | None


@dataclass(frozen=True)
class ScoreResult:
    logprobs: tuple[float, ...]  # per continuation: the sum of its tokens' log-probabilities
    greedy: tuple[bool, ...]  # per continuation: every token is the argmax


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
