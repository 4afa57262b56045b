"""A chunk's attempt history (`chunk_attempts`, db/attempts.py) on SQLite and PostgreSQL: each transition
writes its row, `retry` keeps the history, repeated worker deaths are named, stale tokens write nothing."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from db.attempts import Attempt, chunk_attempts
from db.leases import expire_leases
from db.progress import run_progress
from db.readonly import run_readonly
from db.runs import claim_chunk, complete_chunk, delete_run, fail_chunk, requeue_run
from db.schema import ChunkAttempt
from tests.fake_generator import FakeGenerator
from tests.test_chunk import _fake_run
from tests.test_leases import _chunk, _expire, _setup
from tests.test_status_truth import _status
from worker.chunk import Processed, process_chunk, refuse_chunk


def _claim(sessions: sessionmaker[Session], run_id: int, chunk_id: int, worker: str, max_attempts: int = 3) -> Any:
    with sessions.begin() as session:
        return claim_chunk(session, run_id, chunk_id, worker=worker, max_attempts=max_attempts)


def _attempts(sessions: sessionmaker[Session], run_id: int, chunk_id: int) -> list[Attempt]:
    with sessions() as session:
        return chunk_attempts(session, run_id, chunk_id)


def _row(a: Attempt) -> tuple[int, str | None, int | None, str]:
    return a.n, a.worker, a.lease_token, a.outcome


def test_claim_fail_and_complete_write_their_attempt_rows(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    claim = _claim(sessions, run_id, 0, "w1")
    [first] = _attempts(sessions, run_id, 0)
    assert _row(first) == (1, "w1", claim.token, "running") and first.started_at and first.ended_at is None
    with sessions.begin() as session:
        assert fail_chunk(session, run_id, 0, error="RuntimeError: boom", final=False, token=claim.token)
    [first] = _attempts(sessions, run_id, 0)
    assert (first.outcome, first.error) == ("failed", "RuntimeError: boom") and first.ended_at is not None
    again = _claim(sessions, run_id, 0, "w2")
    with sessions.begin() as session:
        assert complete_chunk(session, run_id, 0, generate_seconds=1.0, token=again.token)
    assert [_row(a) for a in _attempts(sessions, run_id, 0)] == [(1, "w1", 1, "failed"), (2, "w2", 2, "done")]
    assert _attempts(sessions, run_id, 0)[1].error is None
    # a final failure of the next chunk
    third = _claim(sessions, run_id, 1, "w1")
    with sessions.begin() as session:
        assert fail_chunk(session, run_id, 1, error="x" * 5000, final=True, token=third.token)
    [failed] = _attempts(sessions, run_id, 1)
    assert failed.outcome == "failed" and failed.error == "x" * 2000  # capped like the chunk's own error
    engine.dispose()


def test_a_lost_worker_ends_its_attempt_by_the_sweep_or_by_a_takeover(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    _claim(sessions, run_id, 0, "w1")
    _claim(sessions, run_id, 1, "w1")
    _expire(sessions, run_id, 0)
    _expire(sessions, run_id, 1)
    with sessions.begin() as session:  # chunk 0: the sweep takes it back
        assert [e.chunk_id for e in expire_leases(session, limit=1)] == [0]
    [swept] = _attempts(sessions, run_id, 0)
    assert swept.outcome == "worker_lost" and swept.ended_at is not None
    assert swept.error is not None and "worker w1 presumed dead" in swept.error and "requeued" in swept.error
    assert _claim(sessions, run_id, 1, "w2") is not None  # chunk 1: a claim takes the expired lease over
    lost, running = _attempts(sessions, run_id, 1)
    assert (_row(lost), _row(running)) == ((1, "w1", 1, "worker_lost"), (2, "w2", 2, "running"))
    assert lost.error is not None and "taken over by w2" in lost.error
    engine.dispose()


def test_a_chunk_whose_worker_dies_every_time_is_failed_saying_so(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    for worker in ("w1", "w2", "w3"):
        assert _claim(sessions, run_id, 0, worker) is not None
        _expire(sessions, run_id, 0)
    assert _claim(sessions, run_id, 0, "w4") is None  # gives up
    chunk = _chunk(sessions, run_id, 0)
    assert (chunk.status, chunk.attempts) == ("failed", 3)
    assert chunk.error is not None
    assert chunk.error.startswith("gave up after 3 attempts: the worker died 3 times while running this chunk "
                                  "(workers w1, w2, w3; the last presumed dead at "), chunk.error
    assert "it may crash its worker (out of memory?)" in chunk.error
    assert [a.outcome for a in _attempts(sessions, run_id, 0)] == ["worker_lost"] * 3  # giving up is no attempt

    text_ = _status(any_db_url, run_id)
    assert "chunk 0 failed after 3 attempt(s): gave up after 3 attempts: the worker died 3 times" in text_
    assert "chunk 0 attempts: worker lost x3 (w1, w2, w3)\n" in text_, text_
    shown = _status(any_db_url, run_id, "--format", "json")
    [history] = shown["chunk_attempts"]
    assert (history["chunk"], history["status"], history["summary"]) == (0, "failed", "worker lost x3 (w1, w2, w3)")
    assert [(a["n"], a["worker"], a["outcome"]) for a in history["attempts"]] == [
        (1, "w1", "worker_lost"), (2, "w2", "worker_lost"), (3, "w3", "worker_lost")]
    assert history["attempts"][0]["ended_at"] and "presumed dead" in history["attempts"][0]["error"]
    engine.dispose()


def test_mixed_causes_are_counted_with_the_last_error(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    claim = _claim(sessions, run_id, 0, "w1", max_attempts=2)
    with sessions.begin() as session:
        fail_chunk(session, run_id, 0, error="RuntimeError: boom", final=False, token=claim.token)
    assert _claim(sessions, run_id, 0, "w2", max_attempts=2) is not None
    _expire(sessions, run_id, 0)
    assert _claim(sessions, run_id, 0, "w3", max_attempts=2) is None
    error = _chunk(sessions, run_id, 0).error or ""
    assert error.startswith("gave up after 2 attempts (failed x1, worker lost x1); last error: worker w2 presumed "
                            "dead"), error
    assert "died" not in error
    # chunk 1: an error, then two deaths: mostly deaths, named as such, with the other cause beside them
    first = _claim(sessions, run_id, 1, "w1")
    with sessions.begin() as session:
        fail_chunk(session, run_id, 1, error="RuntimeError: boom", final=False, token=first.token)
    for worker in ("w2", "w3"):
        assert _claim(sessions, run_id, 1, worker) is not None
        _expire(sessions, run_id, 1)
    assert _claim(sessions, run_id, 1, "w4") is None
    error = _chunk(sessions, run_id, 1).error or ""
    assert error.startswith("gave up after 3 attempts: the worker died 2 times while running this chunk "
                            "(workers w2, w3; the last presumed dead at "), error
    assert error.endswith("it may crash its worker (out of memory?); also failed x1; "
                          "last other error: RuntimeError: boom"), error
    engine.dispose()


def test_retry_keeps_the_history_and_numbers_new_attempts_after_it(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    for worker in ("w1", "w2"):
        _claim(sessions, run_id, 0, worker, max_attempts=2)
        _expire(sessions, run_id, 0)
    assert _claim(sessions, run_id, 0, "w3", max_attempts=2) is None
    _claim(sessions, run_id, 1, "w1")  # chunk 1 runs when `retry` comes: its attempt is ended
    with sessions.begin() as session:
        assert requeue_run(session, run_id) == [0, 1]
    assert _chunk(sessions, run_id, 0).attempts == 0  # the bound counts afresh
    assert [_row(a) for a in _attempts(sessions, run_id, 1)] == [(1, "w1", 1, "cancelled")]
    claim = _claim(sessions, run_id, 0, "w5", max_attempts=2)
    assert claim is not None and claim.attempt == 1
    with sessions.begin() as session:
        complete_chunk(session, run_id, 0, generate_seconds=1.0, token=claim.token)
    assert [_row(a) for a in _attempts(sessions, run_id, 0)] == [
        (1, "w1", 1, "worker_lost"), (2, "w2", 2, "worker_lost"), (3, "w5", 3, "done")]
    with sessions() as session:
        progress = run_progress(session, run_id)
    assert progress is not None
    assert [(h.chunk, h.status, h.summary) for h in progress.chunk_attempts] == [
        (0, "done", "worker lost x2 (w1, w2), done (w5)"), (1, "queued", "cancelled (w1)")]
    assert "chunk 1 attempts: cancelled (w1); now queued" in _status(any_db_url, run_id)
    engine.dispose()


def test_a_stale_token_records_nothing(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    stale = _claim(sessions, run_id, 0, "w1")
    _expire(sessions, run_id, 0)
    fresh = _claim(sessions, run_id, 0, "w2")
    before = [(_row(a), a.ended_at, a.error) for a in _attempts(sessions, run_id, 0)]
    with sessions.begin() as session:
        assert not complete_chunk(session, run_id, 0, generate_seconds=1.0, token=stale.token)
    with sessions.begin() as session:
        assert not fail_chunk(session, run_id, 0, error="late", final=True, token=stale.token)
    assert [(_row(a), a.ended_at, a.error) for a in _attempts(sessions, run_id, 0)] == before
    assert [_row(a) for a in _attempts(sessions, run_id, 0)] == [(1, "w1", 1, "worker_lost"), (2, "w2", 2, "running")]
    with sessions.begin() as session:
        assert complete_chunk(session, run_id, 0, generate_seconds=1.0, token=fresh.token)
    assert [a.outcome for a in _attempts(sessions, run_id, 0)] == ["worker_lost", "done"]
    engine.dispose()


def test_a_refusal_is_one_attempt_recorded_refused(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    refuse_chunk(sessions, run_id, 0, "message version 9: upgrade", worker="w9")  # what worker.tasks does
    [refused] = _attempts(sessions, run_id, 0)
    assert (_row(refused), refused.error) == ((1, "w9", None, "refused"), "message version 9: upgrade")
    assert refused.started_at is not None and refused.ended_at is not None
    chunk = _chunk(sessions, run_id, 0)
    assert (chunk.status, chunk.attempts) == ("failed", 0)  # not a claim: the counter is unchanged, as before
    engine.dispose()


def test_the_history_goes_with_its_run(any_db_url: str) -> None:
    engine, sessions, run_id = _setup(any_db_url)
    _claim(sessions, run_id, 0, "w1")
    with sessions.begin() as session:
        delete_run(session, run_id)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ChunkAttempt)) == 0
        assert session.execute(text("SELECT count(*) FROM chunk_attempts")).scalar() == 0
    engine.dispose()


def test_the_documented_query_reads_the_history_through_the_read_only_sql(any_db_url: str) -> None:
    """docs/sql.md's query, as `lora-compare sql` runs it (the reader role on PostgreSQL)."""
    engine, sessions, run_id = _setup(any_db_url)
    _claim(sessions, run_id, 0, "w1")
    _expire(sessions, run_id, 0)
    _claim(sessions, run_id, 0, "w2")
    result = run_readonly(any_db_url, f"""
        SELECT chunk_id, n, worker, outcome, started_at, ended_at, error
        FROM chunk_attempts
        WHERE run_id = {run_id} AND chunk_id IN (SELECT chunk_id FROM chunk_attempts
                                           WHERE run_id = {run_id} AND outcome NOT IN ('done', 'running'))
        ORDER BY chunk_id, n""")
    assert [(r[0], r[1], r[2], r[3]) for r in result.rows] == [(0, 1, "w1", "worker_lost"), (0, 2, "w2", "running")]
    lost = run_readonly(any_db_url, "SELECT worker, count(*) AS lost FROM chunk_attempts WHERE outcome = 'worker_lost' "
                                    "GROUP BY worker ORDER BY lost DESC")
    assert lost.rows == [("w1", 1)]
    engine.dispose()


def test_the_worker_path_records_each_failed_attempt_then_the_done_one(sqlite_url: str) -> None:
    """process_chunk over a fake generator: an error counted and retried, then the final failure, then
    after `retry` a good attempt: four rows, numbered on."""
    engine, sessions, run_id = _fake_run(sqlite_url)
    broken = FakeGenerator(fail=RuntimeError("CUDA out of memory"))
    assert process_chunk(sessions, broken, run_id, 0, worker="w1", max_attempts=2) is Processed.RETRY
    assert process_chunk(sessions, broken, run_id, 0, worker="w2", max_attempts=2) is Processed.FAILED
    with sessions.begin() as session:
        requeue_run(session, run_id)
    assert process_chunk(sessions, FakeGenerator(), run_id, 0, worker="w3", max_attempts=2) is Processed.DONE
    attempts = _attempts(sessions, run_id, 0)
    assert [_row(a) for a in attempts] == [(1, "w1", 1, "failed"), (2, "w2", 2, "failed"), (3, "w3", 3, "done")]
    assert attempts[0].error == attempts[1].error == "RuntimeError: CUDA out of memory"
    engine.dispose()
