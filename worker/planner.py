"""One chunk without SQL: which (example, variant) rows to generate, and their output records.

A chunk is planned as one `PlannedRow` per example x variant. The planning is pure (`plan_rows`,
`reuse_cached`, `build_records`: no model, no database), so each decision is unit-tested: a row is
skipped (already has an output), refused (empty prompt, prompt too long for the model), reused (the
generation cache knows its output), or generated. `run_chunk` drives it over a `ChunkGenerator`,
the few things it needs from a resident model (`worker.model_host.ModelHost` is the real one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from contract.artifacts import adapter_changed
from contract.config import DatasetConfig, GenerationConfig, InferenceConfig, ModelConfig, RunConfig
from contract.errors import FatalChunkError
from contract.scoring import score
from db.enums import FinishReason

from .cache_keys import CACHE_KEY_VERSION, ChunkKeys, cache_key  # noqa: F401 - their import path before
from .generated import GenResult, GenRow, ScoreResult, ScoreRow, StopFlag

if TYPE_CHECKING:
    from .engine.call import DecodeOptions
    from .engine.loglik import ScoreOptions
    from .model_host import ModelIdentity


@dataclass(frozen=True)
class ChunkExample:
    idx: int
    prompt: str  # generate: the prompt; choice: the context; perplexity: the document
    reference: str | None
    choices: tuple[str, ...] | None = None  # task choice: the answer choices
    answer: int | None = None  # task choice: the gold choice's index


@dataclass(frozen=True)
class VariantSpec:
    """`base` (no folder) or an adapter's variant name, folder and the hash of its files recorded at
    submission (None: not recorded, so not checked)."""

    name: str
    adapter_path: str | None
    adapter_hash: str | None = None


@dataclass(frozen=True)
class OutputRecord:
    example_idx: int
    variant: str
    output: str
    prediction: str | None
    correct: bool | None
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    base_model_hash: str
    adapter_hash: str | None
    cache_key: str | None = None
    reused_from: int | None = None  # the generation this output was copied from
    output_ids: list[int] | None = None  # every generated token (None: not generated, or copied from a row without)


@dataclass(frozen=True)
class Reusable:
    """An earlier output the generation cache holds for a key."""

    id: int
    output: str
    output_tokens: int
    finish_reason: str
    output_ids: tuple[int, ...] | None


#: Looks up cache keys: key -> the earlier output (keys it does not know are left out).
CacheLookup = Callable[[list[str]], Mapping[str, Reusable]]

class ChunkGenerator(Protocol):
    """What planning and generating a chunk needs from the resident model."""

    def load_base(self, model: ModelConfig) -> ModelIdentity:
        """Make the base model resident (unless it is already); its identity, for the cache keys."""
        ...

    def ensure_adapter(self, variant: str, folder: str) -> tuple[str, str]:
        """Make the adapter in `folder` resident: (its name in `GenRow.adapter`, its files' hash)."""
        ...

    def encode(self, prompts: Sequence[str], dataset: DatasetConfig) -> list[list[int]]:
        """Each rendered prompt's token ids, chat template and system prompt applied as `dataset` says."""
        ...

    def context_limit(self) -> int | None:
        """The longest sequence (prompt + output) the model takes; None when unknown."""
        ...

    def generate(self, rows: Sequence[GenRow], gen: GenerationConfig, inference: InferenceConfig, *,
                 variants: int, seed: int, options: DecodeOptions | None) -> tuple[list[GenResult], list[str]]:
        """One result per row, in order, and the engine's notes (each fallback taken, and why)."""
        ...

    def encode_pairs(self, contexts: Sequence[str], continuations: Sequence[Sequence[str]],
                     dataset: DatasetConfig) -> list[tuple[list[int], list[list[int]]]]:
        """Per context: (its token ids, each of its continuations' token ids), split as lm-evaluation-harness
        splits them; the chat template and system prompt applied to the context as `dataset` says."""
        ...

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's token ids as the harness encodes a perplexity document."""
        ...

    def prefix_token_id(self) -> int:
        """The token an empty context and a document's first window are scored after (BOS, else EOS)."""
        ...

    def score(self, rows: Sequence[ScoreRow], inference: InferenceConfig, *, variants: int,
              options: ScoreOptions | None) -> tuple[list[ScoreResult], list[str]]:
        """Each row's continuation log-probabilities, in order, and the engine's notes (each fallback taken)."""
        ...

    def device_name(self) -> str:
        """Where it generates: cpu, cuda:0, ..."""
        ...

    def exclusive(self) -> AbstractContextManager[object]:
        """Held while one chunk uses the model."""
        ...

    def load_summary(self) -> str:
        """Model loads so far, for the log."""
        ...

    #: Set when the worker shuts down: generation stops at its next decode step (ChunkInterrupted)
    stopping: StopFlag


class RowState(str, Enum):
    SKIP = "skip"  # already has an output: not in the chunk's records
    REFUSE = "refuse"  # cannot be generated: an empty output with the reason as finish_reason
    REUSE = "reuse"  # copied from an earlier output with the same cache key
    GENERATE = "generate"

    def __str__(self) -> str:
        return self.value


@dataclass
class PlannedRow:
    """One (example, variant) of the chunk, from plan to result."""

    example: ChunkExample
    variant: VariantSpec
    adapter: str | None = None  # the generator's adapter name; None: the base model
    adapter_hash: str | None = None
    input_ids: tuple[int, ...] = ()
    cache_key: str | None = None
    state: RowState = RowState.GENERATE
    result: GenResult | None = None
    reused_from: int | None = None


def check_adapter(variant: VariantSpec, found: str) -> None:
    """Refuse an adapter whose files are not the ones the run was submitted with (FatalChunkError):
    its rows would mix two adapter versions in one run, and another attempt would find the same files."""
    if variant.adapter_hash is None or found == variant.adapter_hash:
        return
    raise FatalChunkError(
        f"{adapter_changed(variant.name, variant.adapter_path, variant.adapter_hash, found)}; restore the "
        "adapter's files as they were and retry the run, or submit a new run to use the changed adapter")


def load_adapters(host: ChunkGenerator, variants: Sequence[VariantSpec]) -> dict[str, tuple[str | None, str | None]]:
    """Each variant's (generator adapter name, hash); (None, None) for the base. An adapter whose files
    changed since submission fails the chunk (`check_adapter`)."""
    adapters: dict[str, tuple[str | None, str | None]] = {}
    for v in variants:
        if v.adapter_path is None:
            adapters[v.name] = (None, None)
            continue
        name, found = host.ensure_adapter(v.name, v.adapter_path)
        check_adapter(v, found)
        adapters[v.name] = (name, found)
    return adapters


def plan_rows(examples: Sequence[ChunkExample], variants: Sequence[VariantSpec],
              skip: frozenset[tuple[int, str]]) -> list[PlannedRow]:
    """Every example x variant, examples first; those in `skip` (already done) marked so."""
    return [PlannedRow(ex, v, state=RowState.SKIP if (ex.idx, v.name) in skip else RowState.GENERATE)
            for ex in examples for v in variants]


def prompts_to_encode(rows: Sequence[PlannedRow]) -> list[ChunkExample]:
    """The examples some row still needs, each once, by index."""
    needed = {row.example.idx: row.example for row in rows if row.state is not RowState.SKIP}
    return [needed[idx] for idx in sorted(needed)]


def prepare_rows(rows: Sequence[PlannedRow], ids_of: Mapping[int, Sequence[int]],
                 adapters: Mapping[str, tuple[str | None, str | None]], identity: ModelIdentity,
                 config: RunConfig, max_positions: int | None) -> None:
    """Give each row to do its prompt ids, adapter and cache key, and refuse those that cannot be generated."""
    keys = ChunkKeys(identity, config.generation, path="mixed" if config.inference.use_peft_directly else "merged")
    for row in rows:
        if row.state is RowState.SKIP:
            continue
        row.adapter, row.adapter_hash = adapters[row.variant.name]
        row.input_ids = tuple(ids_of[row.example.idx])
        refused = unservable(row.example.prompt, len(row.input_ids), max_positions, config.generation)
        if refused is not None:
            row.state, row.result = RowState.REFUSE, refused
        else:
            row.cache_key = keys.key(row.adapter_hash, row.input_ids)


def unservable(prompt: str, prompt_tokens: int, max_positions: int | None, gen: GenerationConfig) -> GenResult | None:
    """Why a row cannot be generated (an empty prompt, a prompt too long for the model), or None."""
    if not prompt.strip():
        return GenResult("", 0, FinishReason.EMPTY_PROMPT)
    if max_positions is not None and prompt_tokens + gen.max_new_tokens > max_positions:
        return GenResult("", 0, FinishReason.PROMPT_TOO_LONG)
    return None


def keys_to_look_up(rows: Sequence[PlannedRow]) -> list[str]:
    return [row.cache_key for row in rows if row.state is RowState.GENERATE and row.cache_key]


def reuse_cached(rows: Sequence[PlannedRow], hits: Mapping[str, Reusable]) -> None:
    """Rows whose cache key has an earlier output take it instead of being generated."""
    for row in rows:
        hit = hits.get(row.cache_key) if row.state is RowState.GENERATE and row.cache_key else None
        if hit is not None:
            row.state, row.reused_from = RowState.REUSE, hit.id
            row.result = GenResult(hit.output, int(hit.output_tokens), hit.finish_reason, hit.output_ids)


def to_generate(rows: Sequence[PlannedRow]) -> list[PlannedRow]:
    return [row for row in rows if row.state is RowState.GENERATE]


def build_records(rows: Sequence[PlannedRow], config: RunConfig, base_hash: str) -> list[OutputRecord]:
    """The scored output record of every row not skipped, in plan order. A row that cannot be scored
    fails the chunk (FatalChunkError): scoring is deterministic, another attempt would fail the same way."""
    records = []
    for row in rows:
        if row.state is RowState.SKIP:
            continue
        result = row.result
        assert result is not None, f"row {row.example.idx} x {row.variant.name} has no result"
        try:
            scored = score(result.text, row.example.reference, config.scoring)
        except Exception as err:  # noqa: BLE001 - named and made fatal
            raise FatalChunkError(f"scoring example {row.example.idx} variant '{row.variant.name}': "
                                  f"{type(err).__name__}: {err}") from err
        records.append(OutputRecord(
            example_idx=row.example.idx,
            variant=row.variant.name,
            output=result.text,
            prediction=scored.prediction,
            correct=scored.correct,
            prompt_tokens=len(row.input_ids),
            output_tokens=result.output_tokens,
            finish_reason=result.finish_reason,
            base_model_hash=base_hash,
            adapter_hash=row.adapter_hash,
            cache_key=row.cache_key,
            reused_from=row.reused_from,
            output_ids=None if result.token_ids is None else list(result.token_ids),
        ))
    return records


def user_notes(notes: Sequence[str], adapters: Mapping[str, tuple[str | None, str | None]]) -> str | None:
    """The engine's notes, deduplicated, naming adapters as the user does; None when there are none."""
    for variant_name, (name, _hash) in adapters.items():
        if name is not None:
            notes = [note.replace(name, f"'{variant_name}'") for note in notes]
    return "; ".join(dict.fromkeys(notes)) or None


@dataclass(frozen=True)
class ChunkOutcome:
    records: list[OutputRecord]
    generate_seconds: float
    device: str | None = None  # where it was generated (cpu, cuda:0, ...)
    dtype: str | None = None  # the weights' dtype as resolved
    engine: str | None = None  # the exact fallbacks taken instead of the fast path, and why; None: none
    #: A log-likelihood task's scores (`worker.loglik_plan.ScoreRecord`), written with the records
    scores: Sequence[Any] = ()


def run_chunk(
    host: ChunkGenerator,
    config: RunConfig,
    examples: Sequence[ChunkExample],
    variants: Sequence[VariantSpec],
    *,
    skip: frozenset[tuple[int, str]] = frozenset(),
    seed: int = 0,
    cached: CacheLookup | None = None,
    options: DecodeOptions | None = None,
) -> ChunkOutcome:
    """Generate and score every (example, variant) of the chunk not in `skip`; outputs that `cached`
    already knows (same weights, prompt tokens and settings) are reused instead of generated.
    `options`: the decode engine's switches (default: every fast path the model allows).
    A log-likelihood task's chunk is scored instead (`worker.loglik_plan`)."""
    if config.loglik:
        from .loglik_plan import run_loglik_chunk

        return run_loglik_chunk(host, config, examples, variants, skip=skip)
    identity = host.load_base(config.model)
    adapters = load_adapters(host, variants)  # every chunk: the host hashes each adapter's files anew
    rows = plan_rows(examples, variants, skip)
    needed = prompts_to_encode(rows)
    if not needed:
        return ChunkOutcome([], 0.0)
    encoded = host.encode([ex.prompt for ex in needed], config.dataset)  # each prompt once for all its variants
    ids_of = {ex.idx: ids for ex, ids in zip(needed, encoded)}
    prepare_rows(rows, ids_of, adapters, identity, config, host.context_limit())
    keys = keys_to_look_up(rows)
    if cached is not None and keys:
        reuse_cached(rows, cached(keys))

    batch = to_generate(rows)
    notes: list[str] = []
    started = time.perf_counter()
    if batch:
        generated, notes = host.generate([GenRow(r.input_ids, r.adapter) for r in batch], config.generation,
                                         config.inference, variants=len(variants), seed=seed, options=options)
        if len(generated) != len(batch):
            raise RuntimeError(f"the generator returned {len(generated)} results for {len(batch)} rows")
        for row, result in zip(batch, generated):
            row.result = result
    elapsed = time.perf_counter() - started
    return ChunkOutcome(build_records(rows, config, identity.base_hash), elapsed, device=host.device_name(),
                        dtype=identity.dtype, engine=user_notes(notes, adapters))
