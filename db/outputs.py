"""Writing generations idempotently and reading outputs back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypedDict

from sqlalchemy import and_, case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from .enums import BASE_VARIANT, FinishReason
from .schema import Example, Generation, Variant

_UNIQUE = ["run_id", "example_idx", "variant"]


@dataclass(frozen=True)
class NewGeneration:
    """One output to store: a run's example through one variant."""

    run_id: int
    example_idx: int
    variant: str
    chunk_id: int
    output: str
    prediction: str | None
    correct: bool | None
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # a `FinishReason` value
    base_model_hash: str
    adapter_hash: str | None  # None for base rows
    worker: str | None = None
    cache_key: str | None = None  # None when sampling, or when the row was not generated
    reused_from: int | None = None  # the generation this output was copied from
    output_ids: list[int] | None = None  # the generated token ids (EOS included when hit)


@dataclass(frozen=True)
class CachedOutput:
    """An earlier generated output (not itself a copy) that a cache key already has."""

    id: int
    output: str
    output_tokens: int
    finish_reason: FinishReason
    output_ids: list[int] | None  # None: a row from before migration 0004, or one copied from such a row


@dataclass(frozen=True)
class VariantSummary:
    """One variant of a run: rows, rows with a score, rows correct, and how often it differs from base."""

    variant: str
    rows: int
    scored: int
    correct: int
    accuracy: float | None  # None: no row has a reference
    differs_from_base: int | None  # None for base itself
    mean_output_tokens: float | None


class VariantCell(TypedDict):
    """One variant's output of one example, in a side-by-side record."""

    output: str
    prediction: str | None
    correct: bool | None
    finish_reason: str
    output_tokens: int


class SideBySide(TypedDict):
    """One example with every variant's output. A dict (the JSON shape `lora-compare results` prints)."""

    example_idx: int
    prompt: str
    reference: str | None
    variants: dict[str, VariantCell]  # variant name -> its cell


def insert_generations(session: Session, rows: Sequence[NewGeneration]) -> int:
    """Insert rows, ignoring any whose (run, example, variant) already exists. Returns rows inserted.

    A redelivered chunk therefore never duplicates an output.
    """
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    table: Any = Generation.__table__
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(table).on_conflict_do_nothing(index_elements=_UNIQUE)
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=_UNIQUE)
    else:  # pragma: no cover - only the two supported backends
        raise NotImplementedError(f"insert-or-ignore is not implemented for {dialect}")
    # RETURNING lists only the rows actually inserted (rowcount is unreliable for batched inserts).
    result = session.connection().execute(stmt.returning(table.c.id), [_values(row) for row in rows])
    return len(result.all())


def _values(row: NewGeneration) -> dict[str, Any]:
    return {f.name: getattr(row, f.name) for f in fields(NewGeneration)}  # shallow: no copy of output_ids


def done_pairs(session: Session, run_id: int, start_idx: int, end_idx: int) -> set[tuple[int, str]]:
    """The (example_idx, variant) pairs that already have an output in [start_idx, end_idx)."""
    stmt = select(Generation.example_idx, Generation.variant).where(
        Generation.run_id == run_id, Generation.example_idx >= start_idx, Generation.example_idx < end_idx
    )
    return {(idx, variant) for idx, variant in session.execute(stmt)}


def variant_summary(session: Session, run_id: int) -> list[VariantSummary]:
    """Per variant: rows, rows with a score, rows correct, accuracy, and rows whose output differs from base."""
    base = aliased(Generation)
    stmt = (
        select(
            Generation.variant,
            func.count(),
            func.count(Generation.correct),
            func.sum(case((Generation.correct.is_(True), 1), else_=0)),
            func.sum(case((and_(base.output.is_not(None), base.output != Generation.output), 1), else_=0)),
            func.avg(Generation.output_tokens),
        )
        .outerjoin(
            base,
            and_(
                base.run_id == Generation.run_id,
                base.example_idx == Generation.example_idx,
                base.variant == BASE_VARIANT,
            ),
        )
        .where(Generation.run_id == run_id)
        .group_by(Generation.variant)
    )
    stats = {row[0]: row[1:] for row in session.execute(stmt)}
    order = session.scalars(select(Variant.name).where(Variant.run_id == run_id).order_by(Variant.position))
    summary = []
    for name in order:
        rows, scored, correct, differ, mean_tokens = stats.get(name, (0, 0, 0, 0, None))
        summary.append(
            VariantSummary(
                variant=name,
                rows=int(rows),
                scored=int(scored),
                correct=int(correct or 0),
                accuracy=(int(correct or 0) / scored) if scored else None,
                differs_from_base=None if name == BASE_VARIANT else int(differ or 0),
                mean_output_tokens=float(mean_tokens) if mean_tokens is not None else None,
            )
        )
    return summary


def side_by_side(session: Session, run_id: int) -> list[SideBySide]:
    """One record per example: prompt, reference and, per variant, output, prediction, correct."""
    stmt = (
        select(Example.idx, Example.prompt, Example.reference, Generation.variant, Generation.output,
               Generation.prediction, Generation.correct, Generation.finish_reason, Generation.output_tokens)
        .join(Generation, (Generation.run_id == Example.run_id) & (Generation.example_idx == Example.idx))
        .where(Example.run_id == run_id)
        .order_by(Example.idx)
    )
    records: dict[int, SideBySide] = {}
    for idx, prompt, reference, variant, output, prediction, correct, finish_reason, tokens in session.execute(stmt):
        record = records.setdefault(
            idx, SideBySide(example_idx=idx, prompt=prompt, reference=reference, variants={})
        )
        record["variants"][variant] = VariantCell(
            output=output,
            prediction=prediction,
            correct=None if correct is None else bool(correct),
            finish_reason=finish_reason,
            output_tokens=tokens,
        )
    return list(records.values())


def cached_outputs(session: Session, keys: Sequence[str]) -> dict[str, CachedOutput]:
    """For each cache key already generated (not itself a copy), one such output."""
    found: dict[str, CachedOutput] = {}
    unique = sorted(set(keys))
    for start in range(0, len(unique), 500):  # bounded IN lists
        stmt = (
            select(Generation.id, Generation.cache_key, Generation.output, Generation.output_tokens,
                   Generation.finish_reason, Generation.output_ids)
            .where(Generation.cache_key.in_(unique[start:start + 500]), Generation.reused_from.is_(None))
            .order_by(Generation.id)
        )
        for gid, key, output, tokens, reason, ids in session.execute(stmt):
            found.setdefault(str(key), CachedOutput(id=int(gid), output=output, output_tokens=int(tokens),
                                                    finish_reason=FinishReason(reason), output_ids=ids))
    return found
