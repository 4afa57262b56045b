"""What `lora-compare verify` reads and records: where a run's chunks ran, which of its rows can be
regenerated, the stored rows of a sample, and one verification record per variant.

Every function takes a session and never commits: the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from .enums import NOT_GENERATED, ChunkStatus
from .schema import Chunk, Example, Generation, Verification


@dataclass(frozen=True)
class ChunkSetting:
    """Where one done chunk was generated (None: not recorded, a chunk from before migration 0004)."""

    chunk_id: int
    device: str | None
    dtype: str | None
    examples: int


@dataclass(frozen=True)
class StoredRow:
    """One stored output, as far as verifying it needs."""

    example_idx: int
    variant: str
    output: str
    output_ids: list[int] | None  # None: not stored (older rows, rows copied from such rows)
    prompt_tokens: int
    base_model_hash: str


def done_chunk_settings(session: Session, run_id: int) -> list[ChunkSetting]:
    stmt = (
        select(Chunk.id, Chunk.device, Chunk.dtype, Chunk.end_idx - Chunk.start_idx)
        .where(Chunk.run_id == run_id, Chunk.status == ChunkStatus.DONE)
        .order_by(Chunk.id)
    )
    return [ChunkSetting(int(cid), device, dtype, int(n)) for cid, device, dtype, n in session.execute(stmt)]


def verifiable_examples(session: Session, run_id: int, *, chunk_ids: Sequence[int], variants: int) -> list[int]:
    """Examples of these chunks that have a generated row for each of the run's `variants`."""
    if not chunk_ids:
        return []
    stmt = (
        select(Generation.example_idx)
        .where(Generation.run_id == run_id, Generation.chunk_id.in_(list(chunk_ids)),
               Generation.finish_reason.not_in(NOT_GENERATED))
        .group_by(Generation.example_idx)
        .having(func.count() == variants)
        .order_by(Generation.example_idx)
    )
    return [int(idx) for idx in session.scalars(stmt)]


def stored_rows(session: Session, run_id: int, example_idxs: Sequence[int]) -> list[StoredRow]:
    stmt = (
        select(Generation.example_idx, Generation.variant, Generation.output, Generation.output_ids,
               Generation.prompt_tokens, Generation.base_model_hash)
        .where(Generation.run_id == run_id, Generation.example_idx.in_(list(example_idxs)))
        .order_by(Generation.example_idx, Generation.variant)
    )
    return [StoredRow(int(idx), variant, output, None if ids is None else [int(t) for t in ids], int(tokens), digest)
            for idx, variant, output, ids, tokens, digest in session.execute(stmt)]


def example_prompts(session: Session, run_id: int, example_idxs: Sequence[int]) -> dict[int, str]:
    """example_idx -> the rendered prompt stored with the example."""
    stmt = select(Example.idx, Example.prompt).where(Example.run_id == run_id, Example.idx.in_(list(example_idxs)))
    return {int(idx): prompt for idx, prompt in session.execute(stmt)}


def add_verification(session: Session, *, run_id: int, variant: str, sampled: int, agreed: int, device: str,
                     dtype: str, details: list[dict[str, Any]]) -> Verification:
    """Record one variant's result of one `verify` call; `details`: one object per disagreement."""
    row = Verification(run_id=run_id, variant=variant, sampled=sampled, agreed=agreed, device=device, dtype=dtype,
                       details=details)
    session.add(row)
    session.flush()
    return row


def latest_verifications(session: Session, run_id: int) -> dict[str, Verification]:
    """Variant -> its most recent verification; empty when there is none (or the database predates them)."""
    if not inspect(session.connection()).has_table(Verification.__tablename__):
        return {}
    stmt = select(Verification).where(Verification.run_id == run_id).order_by(Verification.id)
    return {row.variant: row for row in session.scalars(stmt)}  # later ids overwrite earlier ones
