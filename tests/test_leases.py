"""Chunk leases and fencing tokens (db/leases.py, worker/lease.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from db.engine import make_engine, session_factory
from db.leases import LEASE_S, Expired, aware, expire_leases, renew_lease
from db.migrate import upgrade
from db.outputs import NewGeneration
from db.runs import NewExample, NewVariant, claim_chunk, complete_chunk, create_run, fail_chunk
from db.schema import Chunk, Generation, utcnow
from worker.chunk import _write_outputs
from worker.lease import Heartbeat, sweep_once
from worker.planner import ChunkOutcome


def _setup(url: str, *, n: int = 4, queue: str | None = "q-test") -> tuple[Any, sessionmaker[Session], int]:
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        run = create_run(
            session, name="t", config={"x": 1}, config_path=None, base_model="demo", dataset_path="d.jsonl",
            dataset_sha256="0" * 64, variants=[NewVariant("base", None, None)],
            examples=[NewExample(i, {"i": i}, f"p{i}", None) for i in range(n)], chunk_size=2, queue=queue,
        )
        return engine, sessions, run.id


def _claim(sessions: sessionmaker[Session], run_id: int, chunk_id: int, worker: str) -> Any:
    with sessions.begin() as session:
        return claim_chunk(session, run_id, chunk_id, worker=worker, max_attempts=3)


def _expire(sessions: sessionmaker[Session], run_id: int, chunk_id: int, seconds_ago: float = 60) -> None:
    """What a dead holder leaves: a lease that nobody renewed."""
    with sessions.begin() as session:
        session.execute(update(Chunk).where(Chunk.run_id == run_id, Chunk.id == chunk_id)
                        .values(lease_expires_at=utcnow() - timedelta(seconds=seconds_ago)))


def _chunk(sessions: sessionmaker[Session], run_id: int, chunk_id: int) -> Chunk:
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, chunk_id))
        assert chunk is not None
        return chunk


def _gen(run_id: int, idx: int, worker: str) -> NewGeneration:
    return NewGeneration(run_id=run_id, example_idx=idx, variant="base", chunk_id=idx // 2, output="o",
                         prediction="o", correct=None, prompt_tokens=1, output_tokens=1, finish_reason="eos",
                         base_model_hash="b" * 64, adapter_hash=None, worker=worker)


def test_a_claim_under_a_live_lease_of_another_worker_is_refused(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    first = _claim(sessions, run_id, 0, "w1")
    assert first is not None and first.token == 1
    before = _chunk(sessions, run_id, 0)
    assert aware(before.lease_expires_at) > utcnow() + timedelta(seconds=LEASE_S - 5)  # type: ignore[arg-type]
    assert _claim(sessions, run_id, 0, "w2") is None  # the duplicate message is skipped
    after = _chunk(sessions, run_id, 0)
    assert (after.status, after.worker, after.lease_token, after.attempts) == ("running", "w1", 1, 1)
    engine.dispose()


def test_an_expired_lease_is_taken_over_with_a_new_token(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    assert _claim(sessions, run_id, 0, "w1") is not None
    _expire(sessions, run_id, 0)
    second = _claim(sessions, run_id, 0, "w2")
    assert second is not None and (second.token, second.attempt) == (2, 2)
    chunk = _chunk(sessions, run_id, 0)
    assert (chunk.status, chunk.worker, chunk.lease_token) == ("running", "w2", 2)
    assert chunk.error is not None and "worker w1 presumed dead" in chunk.error and "taken over by w2" in chunk.error
    engine.dispose()


def test_a_stale_token_writes_nothing(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    stale = _claim(sessions, run_id, 0, "w1")
    _expire(sessions, run_id, 0)
    fresh = _claim(sessions, run_id, 0, "w2")
    assert stale is not None and fresh is not None
    with sessions.begin() as session:
        assert complete_chunk(session, run_id, 0, generate_seconds=9.0, token=stale.token) is False
        assert fail_chunk(session, run_id, 0, error="late", final=True, token=stale.token) is False
    outcome = ChunkOutcome(records=[], generate_seconds=9.0, device="cpu", dtype="float32", engine=None)
    assert _write_outputs(sessions, stale, [_gen(run_id, 0, "w1"), _gen(run_id, 1, "w1")], outcome) is False
    with sessions.begin() as session:
        assert renew_lease(session, run_id, 0, stale.token) is False
    chunk = _chunk(sessions, run_id, 0)
    assert (chunk.status, chunk.worker, chunk.lease_token, chunk.generate_seconds) == ("running", "w2", 2, None)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Generation)) == 0
    # The holder's own token writes.
    assert _write_outputs(sessions, fresh, [_gen(run_id, 0, "w2"), _gen(run_id, 1, "w2")], outcome) is True
    chunk = _chunk(sessions, run_id, 0)
    assert (chunk.status, chunk.generate_seconds) == ("done", 9.0)
    with sessions() as session:
        assert set(session.scalars(select(Generation.worker))) == {"w2"}
    engine.dispose()


def test_the_sweep_requeues_only_expired_leases(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url, n=6)
    for chunk_id in (0, 1, 2):
        assert _claim(sessions, run_id, chunk_id, f"w{chunk_id}") is not None
    _expire(sessions, run_id, 1)
    _expire(sessions, run_id, 2, seconds_ago=1)  # expired, but within the grace
    with sessions.begin() as session:
        taken = expire_leases(session, grace_s=5)
    assert taken == [Expired(run_id, 1, "q-test", "w1")]
    statuses = {c: (_chunk(sessions, run_id, c).status, _chunk(sessions, run_id, c).lease_token) for c in (0, 1, 2)}
    assert statuses == {0: ("running", 1), 1: ("queued", 2), 2: ("running", 1)}
    assert "worker w1 presumed dead" in str(_chunk(sessions, run_id, 1).error)
    with sessions.begin() as session:
        assert expire_leases(session, grace_s=5) == []  # once
    again = _claim(sessions, run_id, 1, "w9")  # the fresh message's claim
    assert again is not None and (again.token, again.attempt) == (3, 2)
    engine.dispose()


def test_two_concurrent_sweepers_requeue_each_chunk_exactly_once(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url, n=8)
    for chunk_id in range(4):
        assert _claim(sessions, run_id, chunk_id, "dead") is not None
        _expire(sessions, run_id, chunk_id)
    sent: list[tuple[int, int]] = []
    lock, barrier = threading.Lock(), threading.Barrier(2)
    errors: list[BaseException] = []

    def send(item: Expired) -> None:
        with lock:
            sent.append((item.run_id, item.chunk_id))

    def sweeper() -> None:
        try:
            barrier.wait()
            sweep_once(sessions, send)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=sweeper) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(sent) == [(run_id, c) for c in range(4)]
    with sessions() as session:
        rows = session.execute(select(Chunk.status, Chunk.lease_token).where(Chunk.run_id == run_id, Chunk.id < 4))
        assert set(rows) == {("queued", 2)}
    engine.dispose()


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    claim = _claim(sessions, run_id, 0, "w1")
    assert claim is not None
    _expire(sessions, run_id, 0, seconds_ago=-1)  # one second left
    with Heartbeat(sessions, run_id, 0, claim.token, interval_s=0.1) as beat:
        deadline = time.monotonic() + 10
        while aware(_chunk(sessions, run_id, 0).lease_expires_at) < utcnow() + timedelta(seconds=10):  # type: ignore[arg-type]
            assert time.monotonic() < deadline, "the heartbeat never renewed the lease"
            time.sleep(0.05)
        _expire(sessions, run_id, 0)
        assert _claim(sessions, run_id, 0, "w2") is not None
        assert beat.lost.wait(10)
    assert _chunk(sessions, run_id, 0).worker == "w2"
    engine.dispose()
