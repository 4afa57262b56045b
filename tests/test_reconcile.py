"""Rebuilding a lost queue from SQL (db/leases.py stale_queued/bump_queued, worker/lease.py
reconcile_once) on SQLite and PostgreSQL; the broker's queue depth is faked, the only boundary."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, session_factory
from db.leases import RECONCILE_AFTER_S, Stale, aware, db_now, expire_leases
from db.migrate import upgrade
from db.runs import NewExample, NewVariant, cancel_run, claim_chunk, complete_chunk, create_run, fail_chunk
from db.schema import Chunk, utcnow
from worker.lease import reconcile_once


def _run(sessions: sessionmaker[Session], *, n: int = 8, queue: str | None = "q-test") -> int:
    with sessions.begin() as session:
        run = create_run(
            session, name="t", config={"x": 1}, config_path=None, base_model="demo", dataset_path="d.jsonl",
            dataset_sha256="0" * 64, variants=[NewVariant("base", None, None)],
            examples=[NewExample(i, {"i": i}, f"p{i}", None) for i in range(n)], chunk_size=2, queue=queue,
        )
        return run.id


def _setup(url: str) -> tuple[Any, sessionmaker[Session]]:
    engine = make_engine(url)
    upgrade(engine)
    return engine, session_factory(engine)


def _age(sessions: sessionmaker[Session], run_id: int, seconds: float = 3 * RECONCILE_AFTER_S) -> None:
    """Make every chunk of the run look `queued` (or last requeued) `seconds` ago."""
    with sessions.begin() as session:
        session.execute(update(Chunk).where(Chunk.run_id == run_id)
                        .values(queued_at=utcnow() - timedelta(seconds=seconds)))


def _empty(queue: str) -> int:
    return 0


def _queued_at(sessions: sessionmaker[Session], run_id: int, chunk_id: int) -> Any:
    with sessions() as session:
        return aware(session.scalars(select(Chunk.queued_at).where(Chunk.run_id == run_id,
                                                                   Chunk.id == chunk_id)).one())


def test_only_long_queued_chunks_of_live_runs_on_an_empty_queue_are_sent_again(any_db_url: str) -> None:
    engine, sessions = _setup(any_db_url)
    run_id = _run(sessions)  # chunks 0..3, queue q-test
    fresh = _run(sessions)  # just submitted: its messages may still be on their way
    cancelled = _run(sessions)
    default = _run(sessions, n=2, queue=None)
    for rid in (run_id, cancelled, default):
        _age(sessions, rid)
    with sessions.begin() as session:
        assert claim_chunk(session, run_id, 0, worker="w1", max_attempts=3) is not None  # running
        assert claim_chunk(session, run_id, 1, worker="w1", max_attempts=3) is not None
        assert complete_chunk(session, run_id, 1, generate_seconds=1.0)  # done
        cancel_run(session, cancelled)
    sent: list[Stale] = []
    asked: list[str] = []

    def depth(queue: str) -> int:
        asked.append(queue)
        return 0

    got = reconcile_once(sessions, depth, sent.append)
    assert got == sent
    assert [(s.run_id, s.chunk_id) for s in sent] == [(run_id, 2), (run_id, 3), (default, 0)]
    assert sorted(asked) == ["lora-compare", "q-test"]  # once per queue, NULL -> the default queue
    before = utcnow() - timedelta(seconds=RECONCILE_AFTER_S)
    assert _queued_at(sessions, run_id, 2) > before  # bumped: not sent again before another threshold
    assert _queued_at(sessions, fresh, 0) > before
    assert reconcile_once(sessions, depth, sent.append) == []
    engine.dispose()


def test_a_queue_holding_messages_or_a_broker_that_cannot_count_sends_nothing(any_db_url: str) -> None:
    engine, sessions = _setup(any_db_url)
    run_id = _run(sessions)
    _age(sessions, run_id)
    old = _queued_at(sessions, run_id, 0)
    sent: list[Stale] = []
    assert reconcile_once(sessions, lambda q: 1, sent.append) == []  # a message waits: the queue is alive
    assert reconcile_once(sessions, lambda q: None, sent.append) == []  # not Redis: skipped
    assert sent == [] and _queued_at(sessions, run_id, 0) == old
    engine.dispose()


def test_a_failed_send_leaves_the_chunk_stale_for_the_next_sweep(any_db_url: str) -> None:
    engine, sessions = _setup(any_db_url)
    run_id = _run(sessions, n=2)
    _age(sessions, run_id)
    old = _queued_at(sessions, run_id, 0)

    def down(item: Stale) -> None:
        raise ConnectionError("broker down")

    try:
        reconcile_once(sessions, _empty, down)
    except ConnectionError:
        pass
    assert _queued_at(sessions, run_id, 0) == old  # the bump rolled back with the failed send
    sent: list[Stale] = []
    assert len(reconcile_once(sessions, _empty, sent.append)) == 1
    engine.dispose()


def test_two_sweepers_at_once_send_each_lost_message_exactly_once(any_db_url: str) -> None:
    engine, sessions = _setup(any_db_url)
    run_id = _run(sessions, n=16)  # 8 chunks
    _age(sessions, run_id)
    sent: list[tuple[int, int]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def send(item: Stale) -> None:
        with lock:
            sent.append((item.run_id, item.chunk_id))

    def sweeper() -> None:
        try:
            barrier.wait()
            reconcile_once(sessions, _empty, send)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(sent) == [(run_id, c) for c in range(8)]
    engine.dispose()


def test_every_requeue_restarts_the_queued_clock(any_db_url: str) -> None:
    engine, sessions = _setup(any_db_url)
    run_id = _run(sessions, n=4)
    _age(sessions, run_id)
    with sessions.begin() as session:
        assert claim_chunk(session, run_id, 0, worker="w1", max_attempts=3) is not None
        assert claim_chunk(session, run_id, 1, worker="w1", max_attempts=3) is not None
        assert fail_chunk(session, run_id, 0, error="oom", final=False)  # a retry: back to queued
        session.execute(update(Chunk).where(Chunk.run_id == run_id, Chunk.id == 1)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=60)))
    with sessions.begin() as session:
        assert [e.chunk_id for e in expire_leases(session)] == [1]  # a lease expiry: back to queued
        now = db_now(session)
    for chunk_id in (0, 1):
        assert _queued_at(sessions, run_id, chunk_id) > now - timedelta(seconds=RECONCILE_AFTER_S / 2)
    assert reconcile_once(sessions, _empty, lambda item: None) == []  # their messages are on their way
    engine.dispose()


def test_a_run_generated_in_process_is_left_to_that_process(any_db_url: str) -> None:
    """`run` / `retry --here` record EMBEDDED_QUEUE: no broker carries their chunks and a fleet host may
    lack their model, so neither sweep requeues nor re-sends them (a dead embedded run shows stalled)."""
    from db.enums import EMBEDDED_QUEUE
    from db.schema import Chunk as ChunkRow

    engine, sessions = _setup(any_db_url)
    embedded = _run(sessions, n=4, queue=EMBEDDED_QUEUE)
    _age(sessions, embedded)
    with sessions.begin() as session:
        assert claim_chunk(session, embedded, 0, worker="embedded:1", max_attempts=3) is not None
        session.execute(update(ChunkRow).where(ChunkRow.run_id == embedded, ChunkRow.id == 0)
                        .values(lease_expires_at=db_now(session) - timedelta(hours=1)))
    assert reconcile_once(sessions, _empty, lambda item: None) == []
    with sessions.begin() as session:
        assert expire_leases(session) == []
    with sessions() as session:
        assert session.scalars(select(ChunkRow.status).where(ChunkRow.run_id == embedded,
                                                             ChunkRow.id == 0)).one() == "running"
    engine.dispose()
