"""A `worker.planner.ChunkGenerator` without a model: prompts encode to one id per character, and each
row generates `<adapter>|<prompt ids>` as text, so a test can tell which rows were generated, how.
Scored rows get `fake_score`: log-probabilities computed from their token ids and adapter."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from contract.config import DatasetConfig, GenerationConfig, InferenceConfig, ModelConfig
from worker.engine.generation import GenResult, GenRow
from worker.generated import ScoreResult, ScoreRow, StopFlag
from worker.model_host import ModelIdentity

IDENTITY = ModelIdentity(base_hash="b" * 64, tokenizer_hash="t" * 64, dtype="float32", device="cpu", eos_ids=(2,))


def fake_adapter_hash(variant: str) -> str:
    """The hash the fake reports for a variant's adapter files (unless `FakeGenerator.adapter_hashes` says)."""
    return f"hash-{variant}".ljust(64, "0")


def fake_text(row: GenRow) -> str:
    return f"{row.adapter or 'base'}|{','.join(map(str, row.input_ids))}"


#: The fake's prefix token (an empty context's, a document's first window's).
FAKE_PREFIX = 1


def fake_score(row: ScoreRow) -> ScoreResult:
    """Deterministic scores: a continuation's log-probability falls with its length and its ids, and
    an adapter shifts it by its name's length; one-token continuations count as greedy."""
    shift = len(row.adapter or "")
    logprobs = tuple(-(len(c) + (sum(c) + sum(row.context_ids)) % 11 + shift) / 4 for c in row.continuations)
    return ScoreResult(logprobs, tuple(len(c) == 1 for c in row.continuations))


@dataclass
class FakeGenerator:
    """Records what it is asked; `fail` (an exception) is raised by `generate` when set; `adapter_hashes`
    (variant -> hash) stands for adapter files changed on disk."""

    max_positions: int | None = None
    fail: BaseException | None = None
    identity: ModelIdentity = IDENTITY
    encoded: list[list[str]] = field(default_factory=list)  # prompts of each encode call
    generated: list[list[GenRow]] = field(default_factory=list)  # rows of each generate call
    scored: list[list[ScoreRow]] = field(default_factory=list)  # rows of each score call
    notes: list[str] = field(default_factory=list)
    adapter_hashes: dict[str, str] = field(default_factory=dict)
    lock: Any = field(default_factory=threading.RLock)
    stopping: StopFlag = field(default_factory=StopFlag)

    def load_base(self, model: ModelConfig) -> ModelIdentity:
        return self.identity

    def ensure_adapter(self, variant: str, folder: str) -> tuple[str, str]:
        return f"peft-{variant}", self.adapter_hashes.get(variant, fake_adapter_hash(variant))

    def encode(self, prompts: Sequence[str], dataset: DatasetConfig) -> list[list[int]]:
        self.encoded.append(list(prompts))
        system = dataset.system_prompt or ""
        return [[ord(c) for c in system + p] for p in prompts]

    def context_limit(self) -> int | None:
        return self.max_positions

    def generate(self, rows: Sequence[GenRow], gen: GenerationConfig, inference: InferenceConfig, *,
                 variants: int, seed: int, options: Any) -> tuple[list[GenResult], list[str]]:
        self.generated.append(list(rows))
        if self.fail is not None:
            raise self.fail
        results = [GenResult(fake_text(r), len(r.input_ids) % 7 + 1, "eos", (5, 6, 2)) for r in rows]
        return results, list(self.notes)

    def encode_pairs(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
                     dataset: DatasetConfig) -> list[tuple[list[int], list[list[int]]]]:
        self.encoded.append(list(contexts))
        system = dataset.system_prompt or ""
        return [([ord(c) for c in system + context] or [FAKE_PREFIX], [[ord(c) for c in cont] for cont in conts])
                for context, conts in zip(contexts, continuations, strict=True)]

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        self.encoded.append(list(texts))
        return [[ord(c) for c in text] for text in texts]

    def prefix_token_id(self) -> int:
        return FAKE_PREFIX

    def score(self, rows: Sequence[ScoreRow], inference: InferenceConfig, *, variants: int,
              options: Any) -> tuple[list[ScoreResult], list[str]]:
        self.scored.append(list(rows))
        if self.fail is not None:
            raise self.fail
        return [fake_score(r) for r in rows], list(self.notes)

    def device_name(self) -> str:
        return "cpu"

    def exclusive(self) -> AbstractContextManager[object]:
        return self.lock  # type: ignore[no-any-return]

    def load_summary(self) -> str:
        return "fake"
