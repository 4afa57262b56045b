"""The history of a chunk's attempts (`chunk_attempts`): every claim, who made it, how it ended.

Each transition of a chunk writes its attempt row in the same transaction as the chunk's change, with
one small statement: a claim inserts the row (`running`, numbered after the chunk's last, never reset
by `retry`); completion closes it `done`; a recorded error `failed`; a lease taken back by a sweep or
a takeover claim `worker_lost`, with the note; `retry` while it ran `cancelled`. A refusal (a message
this worker cannot read) is an attempt recorded already closed. The row to close is the one of the
claim's lease token, so a stale holder (whose writes are refused before they get here) closes nothing.

`give_up_reason` says why a chunk used up its attempts, naming repeated worker deaths; `run_history`
and `describe` are what `status` shows. Every function takes a session and never commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, func, insert, select, update
from sqlalchemy.orm import Session

from .enums import UNCOUNTED_OUTCOMES, AttemptOutcome
from .schema import MAX_ERROR_CHARS, Chunk, ChunkAttempt, utcnow

#: At most this many chunks' histories are read for `status` (the lowest chunk ids).
MAX_HISTORY_CHUNKS = 100
#: Workers named in one summary, at most.
_MAX_NAMED = 5

_LABELS: dict[str, str] = {  # str enum members: looked up by their values
    AttemptOutcome.RUNNING: "running",
    AttemptOutcome.DONE: "done",
    AttemptOutcome.FAILED: "failed",
    AttemptOutcome.WORKER_LOST: "worker lost",
    AttemptOutcome.REFUSED: "refused",
    AttemptOutcome.CANCELLED: "cancelled",
    AttemptOutcome.HANDED_BACK: "handed back",
}


@dataclass(frozen=True)
class Attempt:
    """One row of `chunk_attempts`, as read back."""

    n: int
    worker: str | None
    lease_token: int | None
    outcome: str
    started_at: datetime | None
    ended_at: datetime | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "worker": self.worker, "lease_token": self.lease_token, "outcome": self.outcome,
                "started_at": _iso(self.started_at), "ended_at": _iso(self.ended_at), "error": self.error}


#: `Attempt`'s fields, read as plain columns (never ORM objects, which a session could hold stale after the
#: UPDATEs above)
_COLUMNS = (ChunkAttempt.n, ChunkAttempt.worker, ChunkAttempt.lease_token, ChunkAttempt.outcome,
            ChunkAttempt.started_at, ChunkAttempt.ended_at, ChunkAttempt.error)


def _now(session: Session) -> Any:
    """The database's clock inside the statement on PostgreSQL (no round trip); this host's on SQLite."""
    return func.now() if session.get_bind().dialect.name == "postgresql" else utcnow()


def _cap(error: str | None) -> str | None:
    return error[:MAX_ERROR_CHARS] if error else None


def _next_n(run_id: int, chunk_id: int) -> Any:
    """The chunk's next attempt number, computed inside the INSERT (the chunk row is locked meanwhile)."""
    return (select(func.coalesce(func.max(ChunkAttempt.n), 0) + 1)
            .where(ChunkAttempt.run_id == run_id, ChunkAttempt.chunk_id == chunk_id).scalar_subquery())


def open_attempt(session: Session, chunk: Chunk, now: datetime) -> None:
    """Record the claim just made on the (locked) chunk: its worker and lease token, `running`."""
    session.execute(insert(ChunkAttempt).values(
        run_id=chunk.run_id, chunk_id=chunk.id, n=_next_n(chunk.run_id, chunk.id), worker=chunk.worker,
        lease_token=chunk.lease_token, started_at=now, outcome=AttemptOutcome.RUNNING))


def record_attempt(session: Session, chunk: Chunk, outcome: AttemptOutcome, *, worker: str | None,
                   error: str | None) -> None:
    """Record an attempt that ended as it began (a refusal): no lease, started and ended now."""
    now = _now(session)
    session.execute(insert(ChunkAttempt).values(
        run_id=chunk.run_id, chunk_id=chunk.id, n=_next_n(chunk.run_id, chunk.id), worker=worker,
        lease_token=None, started_at=now, ended_at=now, outcome=outcome, error=_cap(error)))


def close_attempt(session: Session, run_id: int, chunk_id: int, outcome: AttemptOutcome, *, token: int | None,
                  error: str | None = None, now: datetime | None = None) -> None:
    """End the chunk's `running` attempt of lease `token` (every running one when `token` is None)."""
    where: list[ColumnElement[bool]] = [ChunkAttempt.run_id == run_id, ChunkAttempt.chunk_id == chunk_id,
                                        ChunkAttempt.outcome == AttemptOutcome.RUNNING]
    if token is not None:
        where.append(ChunkAttempt.lease_token == token)
    session.execute(update(ChunkAttempt).where(*where)
                    .values(outcome=outcome, ended_at=now if now is not None else _now(session), error=_cap(error))
                    .execution_options(synchronize_session=False))


def close_running_attempts(session: Session, run_id: int, outcome: AttemptOutcome, error: str) -> None:
    """End every `running` attempt of the run's chunks at once (`retry` requeueing chunks that ran)."""
    session.execute(update(ChunkAttempt)
                    .where(ChunkAttempt.run_id == run_id, ChunkAttempt.outcome == AttemptOutcome.RUNNING)
                    .values(outcome=outcome, ended_at=_now(session), error=_cap(error))
                    .execution_options(synchronize_session=False))


def chunk_attempts(session: Session, run_id: int, chunk_id: int) -> list[Attempt]:
    """Every attempt at a chunk, in order."""
    return [Attempt(*row) for row in session.execute(
        select(*_COLUMNS).where(ChunkAttempt.run_id == run_id, ChunkAttempt.chunk_id == chunk_id)
        .order_by(ChunkAttempt.n))]


def give_up_reason(session: Session, chunk: Chunk) -> str:
    """Why a chunk used up its attempts: the causes of its counted attempts since the last `retry`.

    Worker deaths in most of them (two or more) are named as such: the chunk may crash its worker.
    """
    used = chunk.attempts
    with session.no_autoflush:  # the chunk's pending changes are flushed once, with its final state
        history = chunk_attempts(session, chunk.run_id, chunk.id)
    counted = [a for a in history if a.outcome not in UNCOUNTED_OUTCOMES]
    counted = counted[-used:] if used > 0 else []
    head = f"gave up after {used} attempts"
    last_error = f"; last error: {chunk.error}" if chunk.error else ""
    if not counted:  # attempts made before the history was kept (migration 0007)
        return head + last_error
    lost = [a for a in counted if a.outcome == AttemptOutcome.WORKER_LOST]
    if len(lost) >= 2 and 2 * len(lost) > len(counted):
        when = lost[-1].ended_at
        at = f"; the last presumed dead at {_iso(when, 'seconds')}" if when else ""
        reason = (f"{head}: the worker died {len(lost)} times while running this chunk "
                  f"({_workers(lost, named=True)}{at}) - it may crash its worker (out of memory?)")
        others = [a for a in counted if a.outcome != AttemptOutcome.WORKER_LOST]
        if others:
            reason += f"; also {describe(others, workers=False, counts=True)}"
            errors = [a.error for a in others if a.error]
            if errors:
                reason += f"; last other error: {errors[-1]}"
        return reason
    return f"{head} ({describe(counted, workers=False, counts=True)}){last_error}"


def describe(attempts: Sequence[Attempt], *, workers: bool = True, counts: bool = False) -> str:
    """`worker lost x3 (w1, w2, w3), done (w4)`: the causes in order of first appearance, with their
    counts (above 1, or all with `counts`) and their workers (with `workers`)."""
    groups: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        groups.setdefault(attempt.outcome, []).append(attempt)
    parts = []
    for outcome, group in groups.items():
        part = _LABELS.get(outcome, outcome) + (f" x{len(group)}" if counts or len(group) > 1 else "")
        parts.append(part + (f" ({_workers(group)})" if workers else ""))
    return ", ".join(parts)


@dataclass(frozen=True)
class ChunkHistory:
    """The attempts of a chunk that failed or was tried again, for `status`."""

    chunk: int
    status: str
    attempts: list[Attempt]

    @property
    def summary(self) -> str:
        return describe(self.attempts)

    def to_json(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "status": self.status, "summary": self.summary,
                "attempts": [a.to_json() for a in self.attempts]}


def run_history(session: Session, run_id: int, *, limit: int = MAX_HISTORY_CHUNKS) -> list[ChunkHistory]:
    """The attempts of the run's chunks that have one not `done` nor `running` (a failure, a lost worker,
    a refusal, a requeue while it ran): the first `limit` such chunks, by id. A run without incidents
    costs one indexed scan of its attempt rows."""
    troubled = (select(ChunkAttempt.chunk_id).distinct()
                .where(ChunkAttempt.run_id == run_id,
                       ChunkAttempt.outcome.not_in([AttemptOutcome.DONE, AttemptOutcome.RUNNING]))
                .order_by(ChunkAttempt.chunk_id).limit(limit))
    found = session.execute(
        select(ChunkAttempt.chunk_id, Chunk.status, *_COLUMNS)
        .join(Chunk, (Chunk.run_id == ChunkAttempt.run_id) & (Chunk.id == ChunkAttempt.chunk_id))
        .where(ChunkAttempt.run_id == run_id, ChunkAttempt.chunk_id.in_(troubled.scalar_subquery()))
        .order_by(ChunkAttempt.chunk_id, ChunkAttempt.n)).all()
    histories: dict[int, ChunkHistory] = {}
    for row in found:
        history = histories.setdefault(row[0], ChunkHistory(row[0], str(row[1]), []))
        history.attempts.append(Attempt(*row[2:]))
    return list(histories.values())


def _workers(attempts: Sequence[Attempt], *, named: bool = False) -> str:
    """`w1, w2` (each once, in order); `named`: `workers w1, w2` or `worker w1`."""
    names = list(dict.fromkeys(a.worker or "?" for a in attempts))
    shown = ", ".join(names[:_MAX_NAMED])
    more = f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else ""
    return (f"worker{'s' if len(names) > 1 else ''} " if named else "") + shown + more


def _iso(moment: datetime | None, timespec: str = "auto") -> str | None:
    if moment is None:
        return None
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
    return aware.isoformat(timespec=timespec)
