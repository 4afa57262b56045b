"""Run and chunk records and their state transitions.

Every function takes a session and never commits: the caller owns the transaction. Transitions that
decide a run's final state lock the run row first (`FOR UPDATE` on PostgreSQL; SQLite serialises
writers anyway), so two workers finishing the last two chunks at once cannot both miss the end.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from .attempts import close_attempt, close_running_attempts, give_up_reason, open_attempt, record_attempt
from .enums import AttemptOutcome, ChunkStatus, RunStatus
from .leases import db_now, hold_lease, lease_is_live, lock_run, take_lease, takeover_note
from .register import NewExample, NewVariant, chunk_bounds, create_run  # noqa: F401 - their import path before
from .schema import MAX_ERROR_CHARS, Chunk, Example, Run, Variant, utcnow  # MAX_ERROR_CHARS: db.runs' too

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkClaim:
    """What a worker needs to process a chunk it has claimed."""

    run_id: int
    chunk_id: int
    attempt: int
    start_idx: int
    end_idx: int
    token: int  # the lease's fencing token: every write of this claim carries it (db.leases)


def get_run(session: Session, run_id: int) -> Run | None:
    return session.get(Run, run_id)


def delete_run(session: Session, run_id: int) -> None:
    """Remove a run and, by the foreign keys' cascades, everything recorded under it (a run whose
    messages could not be sent, removed by the same `submit`)."""
    session.execute(delete(Run).where(Run.id == run_id))


def run_variants(session: Session, run_id: int) -> list[Variant]:
    return list(session.scalars(select(Variant).where(Variant.run_id == run_id).order_by(Variant.position)))


def chunk_prompts(session: Session, run_id: int, chunk_id: int
                  ) -> list[tuple[int, str, str | None, list[str] | None, int | None]]:
    """(idx, prompt, reference, choices, answer_index) of each example of a chunk, by index: what a worker
    needs of them, read as plain rows (no ORM objects, no dataset row decoded)."""
    stmt = (select(Example.idx, Example.prompt, Example.reference, Example.choices, Example.answer_index)
            .where(Example.run_id == run_id, Example.chunk_id == chunk_id).order_by(Example.idx))
    return [tuple(row) for row in session.execute(stmt)]  # type: ignore[misc]


def chunk_ids(session: Session, run_id: int, statuses: Iterable[ChunkStatus]) -> list[int]:
    stmt = select(Chunk.id).where(Chunk.run_id == run_id, Chunk.status.in_(list(statuses))).order_by(Chunk.id)
    return list(session.scalars(stmt))


_lock_run = lock_run


def claim_chunk(
    session: Session, run_id: int, chunk_id: int, *, worker: str, max_attempts: int
) -> ChunkClaim | None:
    """Mark a chunk `running` under a new lease for `worker` and count the attempt; None when there
    is nothing to do.

    Nothing to do: the chunk is already done, failed or cancelled (a redelivered message), it is
    `running` under a live lease held by another worker (a duplicate message: the holder finishes it,
    or its lease expires and is swept), or it has used up its attempts (then it is failed here, with
    that reason). A `running` chunk whose lease expired is taken over: the holder is presumed dead.
    """
    run = _lock_run(session, run_id)
    chunk = session.get(Chunk, (run_id, chunk_id), with_for_update=True, populate_existing=True)
    if run is None or chunk is None or chunk.status in (ChunkStatus.DONE, ChunkStatus.FAILED, ChunkStatus.CANCELLED):
        return None
    if run.status == RunStatus.CANCELLED:
        return None
    now = db_now(session)
    if lease_is_live(chunk, now) and chunk.worker != worker:
        log.info("run %s chunk %s: running under a live lease of %s (token %s); this message is skipped",
                 run_id, chunk_id, chunk.worker, chunk.lease_token)
        return None
    if chunk.status == ChunkStatus.RUNNING and chunk.lease_expires_at is not None:
        # The holder's lease expired (or this same worker restarted): it is presumed dead.
        note = takeover_note(chunk, worker, now)[:MAX_ERROR_CHARS]
        log.warning("run %s chunk %s: %s", run_id, chunk_id, note)
        # (the attempt rows are written before the chunk's attributes change, or after all of them:
        # autoflush would otherwise split the chunk's UPDATE in two)
        close_attempt(session, run_id, chunk_id, AttemptOutcome.WORKER_LOST, token=chunk.lease_token,
                      error=note, now=now)
        chunk.error = note
    if chunk.attempts >= max_attempts:
        _finish_chunk(session, run, chunk, ChunkStatus.FAILED, error=give_up_reason(session, chunk))
        return None
    chunk.attempts += 1
    chunk.status = ChunkStatus.RUNNING
    token = take_lease(chunk, worker, now)
    chunk.started_at = utcnow()
    if run.status == RunStatus.QUEUED:
        run.status = RunStatus.RUNNING
        run.started_at = run.started_at or utcnow()
    open_attempt(session, chunk, now)
    return ChunkClaim(run_id, chunk_id, chunk.attempts, chunk.start_idx, chunk.end_idx, token)


def complete_chunk(session: Session, run_id: int, chunk_id: int, *, generate_seconds: float | None,
                   device: str | None = None, dtype: str | None = None, engine: str | None = None,
                   token: int | None = None, held: Chunk | None = None) -> bool:
    """Mark a chunk done, with where it ran (`device`, `dtype`) and any exact fallback it took (`engine`).

    With `token` (a claim's), refused (False, nothing written) unless that token still holds the lease.
    `held`: the chunk as `hold_lease` returned it earlier in this transaction (the run and the chunk are
    locked until commit, and the chunk was read fresh then: it is not locked and read again).
    """
    chunk: Chunk | None = held
    if held is not None:
        run = session.get(Run, run_id)
    else:
        if token is not None and hold_lease(session, run_id, chunk_id, token) is None:
            return False
        run = _lock_run(session, run_id)
        chunk = session.get(Chunk, (run_id, chunk_id), with_for_update=True, populate_existing=True)
    if run is None or chunk is None:
        return False
    if chunk.status == ChunkStatus.RUNNING:
        close_attempt(session, run_id, chunk_id, AttemptOutcome.DONE, token=chunk.lease_token)
    chunk.lease_expires_at = None
    chunk.generate_seconds = generate_seconds
    chunk.device, chunk.dtype, chunk.engine = device, dtype, engine
    _finish_chunk(session, run, chunk, ChunkStatus.DONE, error=None)
    return True


def fail_chunk(session: Session, run_id: int, chunk_id: int, *, error: str, final: bool,
               token: int | None = None, refused_by: str | None = None) -> bool:
    """Record a chunk's error; `final` fails it, otherwise it goes back to `queued` for another try.

    With `token` (a claim's), refused (False, nothing written) unless that token still holds the lease.
    `refused_by`: a worker that could not serve the chunk at all, without claiming it; its attempt is
    recorded `refused` (not counted in `attempts`).
    """
    if token is not None and hold_lease(session, run_id, chunk_id, token) is None:
        return False
    run = _lock_run(session, run_id)
    chunk = session.get(Chunk, (run_id, chunk_id), with_for_update=True, populate_existing=True)
    if run is None or chunk is None or chunk.status in (ChunkStatus.DONE, ChunkStatus.CANCELLED):
        return False
    if refused_by is None:
        if chunk.status == ChunkStatus.RUNNING:
            close_attempt(session, run_id, chunk_id, AttemptOutcome.FAILED, token=chunk.lease_token, error=error)
    else:
        if chunk.status == ChunkStatus.RUNNING:  # another worker's claim, ended by this refusal
            close_attempt(session, run_id, chunk_id, AttemptOutcome.CANCELLED, token=chunk.lease_token,
                          error=f"the chunk was failed meanwhile: refused by {refused_by}")
        record_attempt(session, chunk, AttemptOutcome.REFUSED, worker=refused_by, error=error)
    chunk.lease_expires_at = None
    if final:
        _finish_chunk(session, run, chunk, ChunkStatus.FAILED, error=error)
    else:
        chunk.status = ChunkStatus.QUEUED
        chunk.queued_at = db_now(session)  # its message comes back after the retry's countdown
        chunk.error = error[:MAX_ERROR_CHARS]
    return True


def hand_back_chunk(session: Session, run_id: int, chunk_id: int, token: int, note: str) -> bool:
    """Give a claimed chunk back to the queue, uncounted: its worker is shutting down, not failing.

    Under the claim's `token` (False, nothing written, once another claim holds the chunk): back to
    `queued` (`queued_at` now, so the sweeps' reconciliation sends its message again if the caller's
    send is lost), the lease released and its token moved on, the attempt this claim counted taken
    back (`attempts` counts only attempts that could have failed), `note` as the chunk's error line.
    Outputs already written stay. The caller sends the chunk's fresh message after commit (a chunk of
    a run cancelled meanwhile is `cancelled` instead, as its queued chunks were: the message is skipped).
    """
    chunk = hold_lease(session, run_id, chunk_id, token)
    if chunk is None:
        return False
    close_attempt(session, run_id, chunk_id, AttemptOutcome.HANDED_BACK, token=token, error=note)
    run = session.get(Run, run_id)  # locked by hold_lease
    cancelled = run is not None and run.status == RunStatus.CANCELLED
    chunk.status = ChunkStatus.CANCELLED if cancelled else ChunkStatus.QUEUED
    if cancelled:
        chunk.finished_at = utcnow()
    chunk.attempts = max(0, chunk.attempts - 1)
    chunk.lease_token = token + 1
    chunk.lease_expires_at = None
    chunk.queued_at = db_now(session)
    chunk.error = note[:MAX_ERROR_CHARS]
    return True


def _finish_chunk(session: Session, run: Run, chunk: Chunk, status: ChunkStatus, *, error: str | None) -> None:
    chunk.status = status
    chunk.finished_at = utcnow()
    chunk.error = error[:MAX_ERROR_CHARS] if error else None
    session.flush()
    settle_run(session, run)


def settle_run(session: Session, run: Run) -> None:
    """Give the run its final state once no chunk is queued or running."""
    counts = dict(
        session.execute(
            select(Chunk.status, func.count()).where(Chunk.run_id == run.id).group_by(Chunk.status)
        ).all()
    )
    if counts.get(ChunkStatus.QUEUED, 0) or counts.get(ChunkStatus.RUNNING, 0) or run.status == RunStatus.CANCELLED:
        return
    run.finished_at = utcnow()
    failed = chunk_ids(session, run.id, [ChunkStatus.FAILED])
    if failed:
        first = session.scalar(
            select(Chunk.error).where(Chunk.run_id == run.id, Chunk.id == failed[0])
        )
        run.status = RunStatus.FAILED
        run.error = f"chunk(s) {', '.join(map(str, failed))} failed: {first}"[:MAX_ERROR_CHARS]
    else:
        run.status = RunStatus.COMPLETED
        run.error = None


def cancel_run(session: Session, run_id: int) -> int:
    """Cancel the queued chunks of a run; returns how many. Running chunks finish their work."""
    run = _lock_run(session, run_id)
    if run is None:
        return 0
    result = session.execute(
        update(Chunk)
        .where(Chunk.run_id == run_id, Chunk.status == ChunkStatus.QUEUED)
        .values(status=ChunkStatus.CANCELLED, finished_at=utcnow())
    )
    if run.status in (RunStatus.QUEUED, RunStatus.RUNNING):
        run.status = RunStatus.CANCELLED
        run.finished_at = utcnow()
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def requeue_run(session: Session, run_id: int, *, queue: str | None = None) -> list[int]:
    """Put every chunk that is not done back to `queued` with fresh attempts; returns their ids.

    Their history (`chunk_attempts`) stays: new attempts are numbered after it; a chunk's attempt that
    was still running ends `cancelled`.

    `queue`: where their messages now go (recorded on the run for the lease sweep).
    """
    run = _lock_run(session, run_id)
    if run is None:
        return []
    if queue is not None:
        run.queue = queue
    ids = chunk_ids(session, run_id, [ChunkStatus.QUEUED, ChunkStatus.FAILED, ChunkStatus.CANCELLED,
                                      ChunkStatus.RUNNING])
    if ids:
        close_running_attempts(session, run_id, AttemptOutcome.CANCELLED, "requeued by retry while it ran")
        session.execute(
            update(Chunk)
            .where(Chunk.run_id == run_id, Chunk.id.in_(ids))
            .values(status=ChunkStatus.QUEUED, attempts=0, error=None, finished_at=None,
                    queued_at=db_now(session))
        )
        run.status = RunStatus.QUEUED if not run.started_at else RunStatus.RUNNING
        run.error = None
        run.finished_at = None
    return ids
