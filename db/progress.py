"""Progress of runs: chunks and rows done out of total, failures, throughput."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .enums import ChunkStatus, RunStatus
from .schema import Chunk, Generation, Run, Variant


@dataclass(frozen=True)
class FailedChunk:
    """A chunk that failed for good: after how many attempts, and the last error."""

    chunk: int
    attempts: int
    error: str | None


@dataclass(frozen=True)
class RunProgress:
    id: int
    name: str
    status: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    variants: list[str]
    chunks_total: int
    chunks: dict[str, int]  # status -> count
    rows_total: int
    rows_done: int
    rows_per_s: float | None
    rows_reused: int = 0  # outputs copied from earlier runs instead of generated
    failed_chunks: list[FailedChunk] = field(default_factory=list)
    #: Exact fallbacks chunks took instead of the engine's fast path, with why, and how many chunks did
    engine_notes: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.rows_done / self.rows_total if self.rows_total else 1.0

    @property
    def eta_s(self) -> float | None:
        if not self.rows_per_s or self.status not in (RunStatus.QUEUED, RunStatus.RUNNING):
            return None
        return (self.rows_total - self.rows_done) / self.rows_per_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("created_at", "started_at", "finished_at"):
            value = data[key]
            data[key] = _aware(value).isoformat() if value else None
        data["fraction"] = round(self.fraction, 4)
        data["eta_s"] = self.eta_s
        return data


def _aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes; everything we store is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def run_progress(session: Session, run_id: int) -> RunProgress | None:
    run = session.get(Run, run_id)
    if run is None:
        return None
    variants = list(
        session.scalars(select(Variant.name).where(Variant.run_id == run_id).order_by(Variant.position))
    )
    chunks = dict(
        session.execute(select(Chunk.status, func.count()).where(Chunk.run_id == run_id).group_by(Chunk.status)).all()
    )
    rows_done = session.scalar(select(func.count()).select_from(Generation).where(Generation.run_id == run_id)) or 0
    reused = session.scalar(select(func.count()).select_from(Generation).where(
        Generation.run_id == run_id, Generation.reused_from.is_not(None))) or 0
    failed = [
        FailedChunk(chunk=cid, attempts=attempts, error=error)
        for cid, attempts, error in session.execute(
            select(Chunk.id, Chunk.attempts, Chunk.error)
            .where(Chunk.run_id == run_id, Chunk.status == ChunkStatus.FAILED)
            .order_by(Chunk.id)
        )
    ]
    notes: dict[str, int] = {}
    for engine, count in session.execute(select(Chunk.engine, func.count()).where(
            Chunk.run_id == run_id, Chunk.engine.is_not(None)).group_by(Chunk.engine)):
        for note in str(engine).split("; "):
            notes[note] = notes.get(note, 0) + int(count)
    rate = None
    if run.started_at and rows_done:
        end = _aware(run.finished_at) if run.finished_at else datetime.now(timezone.utc)
        elapsed = (end - _aware(run.started_at)).total_seconds()
        rate = rows_done / elapsed if elapsed > 0 else None
    return RunProgress(
        id=run.id,
        name=run.name,
        status=run.status,
        created_at=run.created_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        error=run.error,
        variants=variants,
        chunks_total=run.n_chunks,
        chunks={str(k): int(v) for k, v in chunks.items()},
        rows_total=run.n_examples * len(variants),
        rows_done=int(rows_done),
        rows_per_s=rate,
        rows_reused=int(reused),
        failed_chunks=failed,
        engine_notes=notes,
    )


def recent_run_ids(session: Session, limit: int = 20) -> list[int]:
    return list(session.scalars(select(Run.id).order_by(Run.id.desc()).limit(limit)))
