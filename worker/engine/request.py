"""What a decode call generates and where its rows end: shared by the engine and the plain path."""

from __future__ import annotations

from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from typing import Any

import torch

from contract.config import GenerationConfig
from contract.errors import ChunkInterrupted

from .sampling import SamplingParams


def stop_window(stop: Sequence[str]) -> int:
    """How many trailing tokens can hold a stop string that the last token completed."""
    return max((len(s) for s in stop), default=0) + 2


def ends_in_stop(tokenizer: Any, tokens: Sequence[int], stop: Sequence[str]) -> bool:
    """Whether the text of the last tokens contains a stop string (checked after every step)."""
    tail = tokenizer.decode(list(tokens[-stop_window(stop):]), skip_special_tokens=True)
    return any(s in tail for s in stop)


@dataclass(frozen=True)
class DecodeRequest:
    """The settings every row of a decode call shares: how tokens are chosen (`gen`), which tokens end
    a row, the padding token, the device, the tokenizer (for stop strings), and `stop`: asked once
    per decode step whether the worker is shutting down (a Python flag, no device sync).

    Invariants: a row ends right after the token that is in `eos_ids`, reaches `gen.max_new_tokens`,
    or completes a stop string (its text, decoded by `tokenizer`, then holds one), and that token is
    kept; stop strings are refused without a tokenizer.
    """

    gen: GenerationConfig
    eos_ids: Set[int]
    pad_id: int
    device: torch.device
    tokenizer: Any = None
    stop: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        if self.gen.stop and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams.from_config(self.gen)

    def check_stop(self) -> None:
        """Raise ChunkInterrupted when `stop` says the worker is shutting down (checked every step)."""
        if self.stop is not None and self.stop():
            raise ChunkInterrupted("the worker is shutting down: generation stopped")

    def finished(self, tokens: Sequence[int]) -> bool:
        """Whether a row whose new tokens are `tokens` (at least one) ends here."""
        if tokens[-1] in self.eos_ids or len(tokens) >= self.gen.max_new_tokens:
            return True
        return bool(self.gen.stop) and ends_in_stop(self.tokenizer, tokens, self.gen.stop)

    def cut(self, tokens: Sequence[int]) -> list[int]:
        """`tokens` up to where the engine would have ended the row (EOS or a completed stop string)."""
        out: list[int] = []
        for token in tokens:
            out.append(token)
            if token in self.eos_ids or (self.gen.stop and ends_in_stop(self.tokenizer, out, self.gen.stop)):
                break
        return out
