"""Leases on claimed chunks: SQL is the source of truth for who works on what.

A claim takes a lease: the worker's name, a new fencing token (`chunks.lease_token`, incremented at
every claim) and an expiry `LEASE_S` ahead, which the holder's heartbeat renews every
`HEARTBEAT_S`. A `running` chunk under a live lease held by another worker cannot be claimed (a
duplicate or redelivered message is skipped); once the lease has expired it can be taken over. Every
write of the holder (outputs, done, failed) carries its token and is refused when the token has moved
on, so a worker presumed dead that wakes up writes nothing. Each worker sweeps for leases expired
more than `LEASE_GRACE_S` ago, puts those chunks back to `queued` (guarded by the token, so exactly
one sweeper does it) and sends a fresh message, without waiting for the broker's visibility timeout.

The same sweep rebuilds a lost queue (Redis restarted without its data): a chunk `queued` for more
than `RECONCILE_AFTER_S` (since `queued_at`, bumped at every requeue) while its run's queue on the
broker holds no message at all gets its message sent again (`stale_queued`, then `bump_queued`,
guarded so that of two sweepers exactly one does it). A spurious send costs a skipped duplicate.

Times come from the database's clock on PostgreSQL (workers' clocks may differ); SQLite is one host.
Every function takes a session and never commits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import ColumnElement, func, or_, select, text, update
from sqlalchemy.orm import Session

from .attempts import close_attempt
from .enums import EMBEDDED_QUEUE, AttemptOutcome, ChunkStatus, RunStatus
from .schema import Chunk, Run, utcnow

log = logging.getLogger(__name__)

#: Seconds a claim's lease lasts without a heartbeat: how long a dead worker's chunk stays claimed.
LEASE_S = 30.0
#: Seconds between two renewals of a lease by its holder's heartbeat (a third of the lease, so two
#: missed beats in a row still leave the lease alive).
HEARTBEAT_S = LEASE_S / 3
#: Seconds past its expiry before a lease is requeued by a sweep (absorbs a late heartbeat).
LEASE_GRACE_S = 5.0
#: Seconds between two sweeps for expired leases by each worker.
SWEEP_S = LEASE_S / 3
#: Seconds a chunk stays `queued` (since `queued_at`) before a sweep may send its message again, if
#: its run's queue is empty: two sweeps, longer than a retry's countdown and than a submit's sends.
RECONCILE_AFTER_S = 2 * SWEEP_S


@dataclass(frozen=True)
class Expired:
    """A chunk whose lease a sweep took back: it is `queued` again and needs a fresh message."""

    run_id: int
    chunk_id: int
    queue: str | None  # the run's queue; None: the default queue
    worker: str | None  # the holder presumed dead


def db_now(session: Session) -> datetime:
    """The database's current time (PostgreSQL), or this host's (SQLite), timezone-aware UTC."""
    if session.get_bind().dialect.name == "postgresql":
        now = session.scalar(select(func.now()))
        if isinstance(now, datetime):
            return aware(now)
    return utcnow()


def aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes; everything stored is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def lock_run(session: Session, run_id: int) -> Run | None:
    """Lock a run's row for the rest of the transaction and read it fresh.

    PostgreSQL: `SELECT ... FOR UPDATE`. SQLite ignores `FOR UPDATE` and its driver begins a
    transaction only at the first write, so a no-op write comes first: it takes the database's write
    lock now, and everything read after it in this transaction is current until commit.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(text("UPDATE runs SET id = id WHERE id = :r"), {"r": run_id})
    return session.get(Run, run_id, with_for_update=True, populate_existing=True)


def lease_is_live(chunk: Chunk, now: datetime) -> bool:
    return (chunk.status == ChunkStatus.RUNNING and chunk.lease_expires_at is not None
            and aware(chunk.lease_expires_at) > now)


def take_lease(chunk: Chunk, worker: str, now: datetime) -> int:
    """Give the (locked) chunk a new lease for `worker`; returns the new fencing token."""
    chunk.lease_token = (chunk.lease_token or 0) + 1
    chunk.worker = worker
    chunk.lease_expires_at = now + timedelta(seconds=LEASE_S)
    chunk.heartbeat_at = now
    return chunk.lease_token


def takeover_note(chunk: Chunk, worker: str, now: datetime) -> str:
    """The line recorded on a `running` chunk whose lease `worker` takes: expired, or its own (restarted)."""
    if lease_is_live(chunk, now):  # only its holder may take a live lease: the same worker, restarted
        return f"worker {chunk.worker} restarted; its earlier claim (token {chunk.lease_token}) is taken over"
    expired = aware(chunk.lease_expires_at).isoformat(timespec="seconds") if chunk.lease_expires_at else "?"
    return (f"worker {chunk.worker} presumed dead: its lease (token {chunk.lease_token}) expired at {expired}; "
            f"taken over by {worker}")


def hold_lease(session: Session, run_id: int, chunk_id: int, token: int) -> Chunk | None:
    """Lock the run, then the chunk; the chunk when `token` still holds its lease, else None (logged).

    Call it in the transaction that writes a holder's outputs or state, before it commits (and before
    any write of the run's or the chunk's state): the locks last until commit, so no new claim can slip
    in between the check and the commit. Rows inserted earlier in the transaction are unseen until then.
    """
    run = lock_run(session, run_id)
    # Referenced until the session closes: the identity map holds objects weakly, and the caller's
    # `session.get(Run, run_id)` later in this transaction then finds it, locked and current, instead
    # of reading it again (complete_chunk: one statement less per chunk).
    session.info.setdefault("held_runs", []).append(run)
    chunk = session.get(Chunk, (run_id, chunk_id), with_for_update=True, populate_existing=True)
    if chunk is None or chunk.lease_token != token or chunk.status != ChunkStatus.RUNNING:
        log.warning("run %s chunk %s: lease token %s no longer holds the chunk (now token %s, %s, worker %s); "
                    "nothing written", run_id, chunk_id, token, getattr(chunk, "lease_token", None),
                    getattr(chunk, "status", "gone"), getattr(chunk, "worker", None))
        return None
    return chunk


def renew_lease(session: Session, run_id: int, chunk_id: int, token: int) -> bool:
    """The heartbeat: push the lease's expiry `LEASE_S` ahead; False when `token` lost the lease."""
    now = db_now(session)
    result = session.execute(
        update(Chunk)
        .where(Chunk.run_id == run_id, Chunk.id == chunk_id, Chunk.lease_token == token,
               Chunk.status == ChunkStatus.RUNNING)
        .values(lease_expires_at=now + timedelta(seconds=LEASE_S), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def expire_leases(session: Session, *, grace_s: float = LEASE_GRACE_S, limit: int = 100) -> list[Expired]:
    """Put `running` chunks whose lease expired more than `grace_s` ago back to `queued`.

    Each is guarded by its token and status, so of two sweepers exactly one takes a chunk; the token
    moves on at once, so the presumed-dead holder's writes are refused from here; its attempt ends
    `worker_lost` (db.attempts). The next claim counts a new attempt. Returns what was taken back:
    the caller sends their messages.
    """
    now = db_now(session)
    cutoff = now - timedelta(seconds=grace_s)
    found = session.execute(
        select(Chunk.run_id, Chunk.id, Chunk.lease_token)
        .join(Run, Run.id == Chunk.run_id)
        .where(Chunk.status == ChunkStatus.RUNNING, Chunk.lease_expires_at.is_not(None),
               Chunk.lease_expires_at < cutoff, _not_embedded())
        .order_by(Chunk.run_id, Chunk.id)
        .limit(limit)
    ).all()
    taken: list[Expired] = []
    for run_id, chunk_id, token in found:
        run = lock_run(session, run_id)  # the run before the chunk, as every transition does
        chunk = session.get(Chunk, (run_id, chunk_id), with_for_update=True, populate_existing=True)
        if run is None or chunk is None or chunk.lease_token != token or chunk.status != ChunkStatus.RUNNING:
            continue  # another sweeper or a claim got there first
        if chunk.lease_expires_at is None or aware(chunk.lease_expires_at) >= cutoff:
            continue  # renewed meanwhile
        note = f"worker {chunk.worker} presumed dead: its lease (token {token}) expired at " \
               f"{aware(chunk.lease_expires_at).isoformat(timespec='seconds')}; requeued"
        log.warning("run %s chunk %s: %s", run_id, chunk_id, note)
        taken.append(Expired(run_id, chunk_id, run.queue, chunk.worker))
        close_attempt(session, run_id, chunk_id, AttemptOutcome.WORKER_LOST, token=token, error=note, now=now)
        chunk.status = ChunkStatus.QUEUED
        chunk.lease_token = (token or 0) + 1
        chunk.lease_expires_at = None
        chunk.queued_at = now
        chunk.error = note
        session.flush()
    return taken


@dataclass(frozen=True)
class Stale:
    """A chunk `queued` for longer than the reconciliation threshold: its message may be lost."""

    run_id: int
    chunk_id: int
    queue: str | None  # the run's queue; None: the default queue


def _not_embedded() -> ColumnElement[bool]:
    """Runs whose chunks a broker carries (not generated in the process that recorded them)."""
    return or_(Run.queue.is_(None), Run.queue != EMBEDDED_QUEUE)


def _stale(session: Session, older_than_s: float) -> list[ColumnElement[bool]]:
    cutoff = db_now(session) - timedelta(seconds=older_than_s)
    return [Run.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]), Chunk.status == ChunkStatus.QUEUED,
            Chunk.queued_at < cutoff, _not_embedded()]


def stale_queues(session: Session, *, older_than_s: float = RECONCILE_AFTER_S) -> set[str | None]:
    """The queues (runs' `queue`; None: the default) that `stale_queued` would find chunks of: one row
    a queue, so a sweep asks the broker about them before reading any chunk."""
    found = session.scalars(select(Run.queue).distinct().join(Chunk, Chunk.run_id == Run.id)
                            .where(*_stale(session, older_than_s)))
    return set(found)


def stale_queued(session: Session, *, older_than_s: float = RECONCILE_AFTER_S, limit: int = 1000,
                 queues: set[str | None] | None = None) -> list[Stale]:
    """The `queued` chunks of `queued` or `running` runs whose `queued_at` is over `older_than_s` ago
    (of runs on `queues` only, when given)."""
    where = _stale(session, older_than_s)
    if queues is not None:
        named = [q for q in queues if q is not None]
        where.append(or_(Run.queue.in_(named), Run.queue.is_(None)) if None in queues else Run.queue.in_(named))
    found = session.execute(
        select(Chunk.run_id, Chunk.id, Run.queue)
        .join(Run, Run.id == Chunk.run_id)
        .where(*where)
        .order_by(Chunk.run_id, Chunk.id)
        .limit(limit)
    ).all()
    return [Stale(run_id, chunk_id, queue) for run_id, chunk_id, queue in found]


def bump_queued(session: Session, item: Stale, *, older_than_s: float = RECONCILE_AFTER_S) -> bool:
    """Set a stale chunk's `queued_at` to now, if it is still `queued` (in a live run) and stale;
    True when this call did it. Of two sweepers, the second finds `queued_at` fresh (on PostgreSQL it
    waits for the first's commit, then re-reads the row), so exactly one sends the message again."""
    now = db_now(session)
    live_runs = select(Run.id).where(Run.status.in_([RunStatus.QUEUED, RunStatus.RUNNING]))
    result = session.execute(
        update(Chunk)
        .where(Chunk.run_id == item.run_id, Chunk.id == item.chunk_id, Chunk.status == ChunkStatus.QUEUED,
               Chunk.queued_at < now - timedelta(seconds=older_than_s), Chunk.run_id.in_(live_runs))
        .values(queued_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
