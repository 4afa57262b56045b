"""Progress of runs: chunks and rows done out of total, failures, throughput, and what is stuck.

Truthful while workers die or messages are lost: a `running` chunk whose lease expired (or whose
holder has not beaten within a lease period) is reported stalled, not running; the rate of an
unfinished run is measured over its recent rows only, and it has no ETA while nothing progresses
(no chunk under a live lease, or no row written for a while). "Now" is the database's clock.
Generations' `created_at` comes from each worker's clock: the windows are wide (a minute or more),
so a worker's small skew does not matter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .attempts import ChunkHistory, run_history
from .enums import ChunkStatus, RunStatus
from .leases import LEASE_S, db_now
from .schema import Chunk, Generation, Run, Variant


@dataclass(frozen=True)
class FailedChunk:
    """A chunk that failed for good: after how many attempts, and the last error (the causes of each
    attempt: `RunProgress.chunk_attempts`)."""

    chunk: int
    attempts: int
    error: str | None


#: Seconds of recent rows the rate of an unfinished run is measured over, at least (longer when its
#: chunks take longer: four times their mean duration, as rows land a chunk at a time).
RATE_WINDOW_S = 300.0
#: Seconds without a new row after which an unfinished run has no ETA, at least: two lease periods
#: (longer when its chunks take longer: twice their mean duration).
STALL_S = 2 * LEASE_S
_ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)


@dataclass(frozen=True)
class StalledChunk:
    """A `running` chunk whose holder went silent: its lease expired, or no heartbeat for a lease period."""

    chunk: int
    worker: str | None
    silent_s: float | None  # seconds since the holder's last heartbeat (or its claim)
    lease_expires_at: datetime | None


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
    #: The database's clock when this was read
    as_of: datetime | None = None
    #: `running` chunks under a live lease; `queued` chunks waiting for a worker, the oldest for how long
    chunks_running: int = 0
    chunks_waiting: int = 0
    waiting_s: float | None = None
    #: `running` chunks whose holder is presumed dead (counted in `chunks["running"]`, not in `chunks_running`)
    stalled_chunks: list[StalledChunk] = field(default_factory=list)
    #: The newest generated (not reused) row, and seconds since (None: none yet)
    last_row_at: datetime | None = None
    idle_s: float | None = None
    #: Seconds without a row after which the run counts as stalled, and the window rows/s is measured over
    #: (None: a finished run's average from start to end)
    stall_after_s: float = STALL_S
    rate_window_s: float | None = None
    #: The broker queue the run's chunks go to (None: the default queue; `(embedded)`: none)
    queue: str | None = None
    #: The attempts of each chunk that failed or was tried again (a lost worker, an error, a refusal),
    #: lowest ids first, at most `db.attempts.MAX_HISTORY_CHUNKS` chunks
    chunk_attempts: list[ChunkHistory] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in _ACTIVE

    @property
    def progressing(self) -> bool:
        """Rows are being written: a chunk runs under a live lease and a row came recently."""
        return (self.active and self.chunks_running > 0 and self.idle_s is not None
                and self.idle_s <= self.stall_after_s)

    @property
    def stalled(self) -> bool:
        """Unfinished and nothing written for longer than `stall_after_s` (or never, since as long)."""
        return self.active and self.idle_s is not None and self.idle_s > self.stall_after_s

    @property
    def fraction(self) -> float:
        return self.rows_done / self.rows_total if self.rows_total else 1.0

    @property
    def eta_s(self) -> float | None:
        if not self.rows_per_s or not self.progressing:
            return None
        return (self.rows_total - self.rows_done) / self.rows_per_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("created_at", "started_at", "finished_at", "as_of", "last_row_at"):
            data[key] = _iso(data[key])
        for stalled in data["stalled_chunks"]:
            stalled["lease_expires_at"] = _iso(stalled["lease_expires_at"])
        data["chunk_attempts"] = [history.to_json() for history in self.chunk_attempts]
        data["fraction"] = round(self.fraction, 4)
        data["eta_s"] = self.eta_s
        data["progressing"] = self.progressing
        data["stalled"] = self.stalled
        return data


def _iso(value: datetime | None) -> str | None:
    return _aware(value).isoformat() if value else None


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
    now = db_now(session)
    live, stalled = _running(session, run_id, now)
    waiting, oldest = session.execute(select(func.count(), func.min(Chunk.queued_at)).where(
        Chunk.run_id == run_id, Chunk.status == ChunkStatus.QUEUED)).one()
    chunk_s = _mean_chunk_s(session, run_id)
    stall_after = max(STALL_S, 2 * chunk_s)
    window = max(RATE_WINDOW_S, 4 * chunk_s)
    generated = (Generation.run_id == run_id, Generation.reused_from.is_(None))
    last_row = session.scalar(select(func.max(Generation.created_at)).where(*generated))
    rate: float | None = None
    rate_window: float | None = None
    if run.status not in _ACTIVE:  # finished: the average from start to end
        if run.started_at and rows_done:
            end = _aware(run.finished_at) if run.finished_at else now
            elapsed = (end - _aware(run.started_at)).total_seconds()
            rate = rows_done / elapsed if elapsed > 0 else None
    elif run.started_at is not None:  # unfinished: recent rows only, since the start at most
        rate_window = window
        since = max(now - timedelta(seconds=window), _aware(run.started_at))
        span = (now - since).total_seconds()
        recent = session.scalar(select(func.count()).select_from(Generation).where(
            *generated, Generation.created_at >= since)) or 0
        rate = recent / span if recent and span >= 1.0 else None
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
        as_of=now,
        chunks_running=live,
        chunks_waiting=int(waiting or 0),
        waiting_s=_since(now, oldest),
        stalled_chunks=stalled,
        last_row_at=last_row,
        idle_s=_since(now, last_row),
        stall_after_s=stall_after,
        rate_window_s=rate_window,
        queue=run.queue,
        chunk_attempts=run_history(session, run_id),
    )


def _since(now: datetime, moment: datetime | None) -> float | None:
    return max(0.0, (now - _aware(moment)).total_seconds()) if moment is not None else None


def _running(session: Session, run_id: int, now: datetime) -> tuple[int, list[StalledChunk]]:
    """`running` chunks under a live lease (counted), and those whose holder is presumed dead."""
    live = 0
    stalled = []
    for cid, worker, expires, beat, started in session.execute(
            select(Chunk.id, Chunk.worker, Chunk.lease_expires_at, Chunk.heartbeat_at, Chunk.started_at)
            .where(Chunk.run_id == run_id, Chunk.status == ChunkStatus.RUNNING).order_by(Chunk.id)):
        silent = _since(now, beat or started)
        if (expires is not None and _aware(expires) <= now) or (beat is not None and (silent or 0.0) > LEASE_S):
            stalled.append(StalledChunk(chunk=cid, worker=worker, silent_s=silent, lease_expires_at=expires))
        else:  # a live lease, or a claim from before leases (migration 0006): taken at its word
            live += 1
    return live, stalled


def _mean_chunk_s(session: Session, run_id: int, last: int = 50) -> float:
    """Mean seconds from claim to done of the run's last `last` done chunks (one worker's clock each); 0: none."""
    spans = [(_aware(end) - _aware(start)).total_seconds() for start, end in session.execute(
        select(Chunk.started_at, Chunk.finished_at)
        .where(Chunk.run_id == run_id, Chunk.status == ChunkStatus.DONE, Chunk.started_at.is_not(None),
               Chunk.finished_at.is_not(None))
        .order_by(Chunk.finished_at.desc()).limit(last)) if start is not None and end is not None]
    return max(0.0, sum(spans) / len(spans)) if spans else 0.0


def recent_run_ids(session: Session, limit: int = 20) -> list[int]:
    return list(session.scalars(select(Run.id).order_by(Run.id.desc()).limit(limit)))
