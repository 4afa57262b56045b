"""`status` never lies: silent workers shown as such, no ETA while nothing progresses, the database's clock.

Each test builds a run's state directly in SQL (SQLite and PostgreSQL), then reads it through
`run_progress` and through the CLI (`status RUN`, text and JSON).
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from contract.queue import enqueue_chunks, make_client
from db.engine import make_engine, session_factory
from db.leases import LEASE_S, db_now
from db.migrate import upgrade
from db.outputs import NewGeneration, insert_generations
from db.progress import STALL_S, RunProgress, run_progress
from db.runs import NewExample, NewVariant, claim_chunk, complete_chunk, create_run
from db.schema import Chunk, Generation, Run
from producer.cli import cli
from producer.cli.watching import progress_printer
from producer.display import progress_line

#: The tests' Redis database (empty queues of their own names)
REDIS = "redis://127.0.0.1:6379/3"


def _setup(url: str, n: int = 8) -> tuple[sessionmaker[Session], int, datetime]:
    """A run of `n` examples, one variant, chunks of 2; and the database's clock now."""
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        run = create_run(
            session, name="t", config={"x": 1}, config_path=None, base_model="demo", dataset_path="d.jsonl",
            dataset_sha256="0" * 64, variants=[NewVariant("base", None, None)],
            examples=[NewExample(i, {"i": i}, f"p{i}", None) for i in range(n)], chunk_size=2,
        )
        run_id = run.id
    with sessions() as session:
        return sessions, run_id, db_now(session)


def _claim(sessions: sessionmaker[Session], run_id: int, chunk_id: int, worker: str, now: datetime, *,
           started_ago: float, beat_ago: float, expires_in: float) -> None:
    """A claim by `worker`, made `started_ago` seconds ago, last renewed `beat_ago` seconds ago."""
    with sessions.begin() as session:
        assert claim_chunk(session, run_id, chunk_id, worker=worker, max_attempts=3) is not None
        session.execute(update(Chunk).where(Chunk.run_id == run_id, Chunk.id == chunk_id).values(
            started_at=now - timedelta(seconds=started_ago), heartbeat_at=now - timedelta(seconds=beat_ago),
            lease_expires_at=now + timedelta(seconds=expires_in)))


def _done(sessions: sessionmaker[Session], run_id: int, chunk_id: int, now: datetime, *, started_ago: float,
          written_ago: float) -> None:
    """Chunk `chunk_id` claimed `started_ago` seconds ago, its 2 rows written and done `written_ago` seconds ago."""
    _claim(sessions, run_id, chunk_id, "w0@host", now, started_ago=started_ago, beat_ago=written_ago,
           expires_in=LEASE_S)
    with sessions.begin() as session:
        rows = [NewGeneration(run_id=run_id, example_idx=i, variant="base", chunk_id=chunk_id, output="o",
                              prediction="o", correct=None, prompt_tokens=1, output_tokens=1, finish_reason="eos",
                              base_model_hash="b" * 64, adapter_hash=None, worker="w0@host")
                for i in (2 * chunk_id, 2 * chunk_id + 1)]
        assert insert_generations(session, rows) == 2
        complete_chunk(session, run_id, chunk_id, generate_seconds=1.0)
        at = now - timedelta(seconds=written_ago)
        session.execute(update(Generation).where(Generation.run_id == run_id, Generation.chunk_id == chunk_id)
                        .values(created_at=at))
        session.execute(update(Chunk).where(Chunk.run_id == run_id, Chunk.id == chunk_id).values(finished_at=at))


def _started(sessions: sessionmaker[Session], run_id: int, now: datetime, ago: float) -> None:
    with sessions.begin() as session:
        session.execute(update(Run).where(Run.id == run_id).values(started_at=now - timedelta(seconds=ago)))


def _progress(sessions: sessionmaker[Session], run_id: int) -> RunProgress:
    with sessions() as session:
        progress = run_progress(session, run_id)
    assert progress is not None
    return progress


def _status(url: str, run_id: int, *args: str, broker: str = REDIS) -> Any:
    result = CliRunner().invoke(cli, ["--database-url", url, "--broker-url", broker, "status", str(run_id), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "json" in args else result.output


def test_a_silent_worker_is_shown_stalled_not_running(any_db_url: str) -> None:
    sessions, run_id, now = _setup(any_db_url)
    _started(sessions, run_id, now, 300)
    _done(sessions, run_id, 0, now, started_ago=130, written_ago=100)
    # chunk 1: its holder was SIGKILLed 47 s ago, its lease ran out 17 s ago
    _claim(sessions, run_id, 1, "w1@host", now, started_ago=90, beat_ago=47, expires_in=-17)
    # chunk 2: not renewed for longer than a lease, although its expiry is still ahead (a clock jump)
    _claim(sessions, run_id, 2, "w2@host", now, started_ago=90, beat_ago=LEASE_S + 10, expires_in=5)
    progress = _progress(sessions, run_id)
    assert [(s.chunk, s.worker) for s in progress.stalled_chunks] == [(1, "w1@host"), (2, "w2@host")]
    assert progress.stalled_chunks[0].silent_s == pytest.approx(47, abs=5)
    assert progress.chunks == {"done": 1, "running": 2, "queued": 1}  # as stored; the truth is beside it
    assert (progress.chunks_running, progress.chunks_waiting) == (0, 1)
    assert progress.eta_s is None and not progress.progressing and progress.stalled

    text = _status(any_db_url, run_id)
    assert re.search(r"chunk 1: worker w1@host silent for (4[5-9]|5\d) s \(presumed dead; it will be taken back\)",
                     text), text
    assert "chunk 2: worker w2@host silent for" in text
    assert "chunks 1/4 (2 stalled, 1 waiting)" in text and "ETA - (stalled: no row for 1m" in text, text
    assert "no chunk running: 1 chunk waiting for a worker" in text
    shown = _status(any_db_url, run_id, "--format", "json")
    assert shown["eta_s"] is None and shown["stalled"] is True and shown["progressing"] is False
    assert (shown["chunks_running"], shown["chunks_waiting"]) == (0, 1)
    assert shown["chunks"] == {"done": 1, "running": 2, "queued": 1} and shown["rows_done"] == 2
    first = shown["stalled_chunks"][0]
    assert (first["chunk"], first["worker"]) == (1, "w1@host") and first["silent_s"] == pytest.approx(47, abs=5)
    assert first["lease_expires_at"].startswith(str((now - timedelta(seconds=17)).year))
    assert shown["as_of"] and shown["last_row_at"] and shown["idle_s"] == pytest.approx(100, abs=5)


def test_rows_written_long_ago_and_nothing_since_give_no_eta(any_db_url: str) -> None:
    sessions, run_id, now = _setup(any_db_url)
    _started(sessions, run_id, now, 3700)
    _done(sessions, run_id, 0, now, started_ago=3700, written_ago=3600)
    _claim(sessions, run_id, 1, "w1@host", now, started_ago=10, beat_ago=2, expires_in=LEASE_S)  # alive
    progress = _progress(sessions, run_id)
    assert progress.stalled_chunks == [] and progress.chunks_running == 1
    assert progress.rows_per_s is None  # nothing in the window: no rate made up from the average
    assert progress.eta_s is None and progress.stalled
    line = progress_line(progress)
    assert "- rows/s  ETA - (stalled: no row for 1h00m)" in line and "(1 running, 2 waiting)" in line, line


def test_lost_messages_nothing_running_gives_no_eta(any_db_url: str) -> None:
    """Redis lost its queue: `queued` chunks nobody runs, rows from a minute and a half ago."""
    sessions, run_id, now = _setup(any_db_url)
    _started(sessions, run_id, now, 200)
    _done(sessions, run_id, 0, now, started_ago=STALL_S + 50, written_ago=STALL_S + 30)
    progress = _progress(sessions, run_id)
    assert progress.rows_per_s and progress.eta_s is None and progress.stalled
    text = _status(any_db_url, run_id)
    assert "ETA - (stalled" in text and "no chunk running: 3 chunks waiting for a worker" in text, text


def test_status_says_what_the_broker_holds_for_waiting_chunks(any_db_url: str) -> None:
    """The queue lost its messages (Redis restarted without its data), then holds messages nobody
    takes, then cannot be reached: each is said under the progress line, and in the JSON."""
    sessions, run_id, now = _setup(any_db_url)
    queue = f"lc-test-{uuid.uuid4().hex[:8]}"
    with sessions.begin() as session:
        session.execute(update(Run).where(Run.id == run_id).values(queue=queue))
        session.execute(update(Chunk).where(Chunk.run_id == run_id).values(queued_at=now - timedelta(seconds=90)))
    _started(sessions, run_id, now, 120)
    _done(sessions, run_id, 0, now, started_ago=40, written_ago=30)
    text = _status(any_db_url, run_id)
    assert f"broker: queue '{queue}' holds no message for the 3 waiting chunks (lost" in text, text
    assert "ETA -" in text and "no chunk running: 3 chunks waiting for a worker" in text, text
    assert _status(any_db_url, run_id, "--format", "json")["broker"] == {"queue": queue, "messages": 0, "error": None}

    enqueue_chunks(make_client(REDIS), run_id, [1, 2, 3], queue=queue)
    try:
        text = _status(any_db_url, run_id)
        assert f"queue '{queue}' holds 3 messages and no chunk is running: is a worker consuming it?" in text, text
    finally:
        store = redis.Redis.from_url(REDIS)
        for key in store.scan_iter(match=f"{queue}*"):
            store.delete(key)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    text = _status(any_db_url, run_id, broker=f"redis://127.0.0.1:{closed}/0")
    assert f"broker: cannot see queue '{queue}' (broker redis://127.0.0.1:{closed}/0 is unreachable" in text, text
    as_json = _status(any_db_url, run_id, "--format", "json", broker=f"redis://127.0.0.1:{closed}/0")
    assert as_json["broker"]["messages"] is None and "unreachable" in as_json["broker"]["error"]


def test_a_progressing_run_has_a_finite_eta(any_db_url: str) -> None:
    sessions, run_id, now = _setup(any_db_url)
    _started(sessions, run_id, now, 100)
    _done(sessions, run_id, 0, now, started_ago=100, written_ago=50)
    _done(sessions, run_id, 1, now, started_ago=50, written_ago=10)
    _claim(sessions, run_id, 2, "w1@host", now, started_ago=10, beat_ago=3, expires_in=LEASE_S - 3)
    progress = _progress(sessions, run_id)
    assert progress.progressing and not progress.stalled and progress.stalled_chunks == []
    assert progress.rows_per_s == pytest.approx(4 / 100, rel=0.1)  # recent rows over the time since the start
    assert progress.eta_s == pytest.approx(4 / (4 / 100), rel=0.1)
    assert progress.stall_after_s >= 2 * 45  # chunks take ~45 s: a minute without a row is not a stall
    shown = _status(any_db_url, run_id, "--format", "json")
    assert shown["eta_s"] and shown["eta_s"] > 0 and shown["progressing"] is True and shown["stalled_chunks"] == []
    assert "chunks 2/4 (1 running, 1 waiting)" in _status(any_db_url, run_id)


def test_a_run_just_started_has_no_eta_yet(any_db_url: str) -> None:
    sessions, run_id, now = _setup(any_db_url)
    _claim(sessions, run_id, 0, "w1@host", now, started_ago=2, beat_ago=2, expires_in=LEASE_S - 2)
    progress = _progress(sessions, run_id)
    assert progress.rows_per_s is None and progress.eta_s is None and not progress.stalled
    line = progress_line(progress)
    assert line.endswith("- rows/s  ETA -") and "(1 running, 3 waiting)" in line, line


def test_the_database_clock_decides_not_the_hosts(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CLI host whose clock is an hour ahead still sees a live run as live (PostgreSQL's `now()`)."""
    sessions, run_id, now = _setup(pg_url)
    _started(sessions, run_id, now, 60)
    _done(sessions, run_id, 0, now, started_ago=60, written_ago=5)
    _claim(sessions, run_id, 1, "w1@host", now, started_ago=5, beat_ago=1, expires_in=LEASE_S - 1)
    import db.leases

    skewed = now + timedelta(hours=1)
    monkeypatch.setattr(db.leases, "utcnow", lambda: skewed)
    progress = _progress(sessions, run_id)
    assert progress.stalled_chunks == [] and progress.progressing and progress.eta_s is not None


def test_watch_prints_a_new_line_when_a_worker_goes_silent(sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    sessions, run_id, now = _setup(sqlite_url)
    _claim(sessions, run_id, 0, "w1@host", now, started_ago=2, beat_ago=2, expires_in=LEASE_S - 2)
    show = progress_printer(True)
    show(_progress(sessions, run_id))
    with sessions.begin() as session:  # its holder dies: nothing else changes
        session.execute(update(Chunk).where(Chunk.run_id == run_id, Chunk.id == 0).values(
            heartbeat_at=now - timedelta(seconds=LEASE_S + 5), lease_expires_at=now - timedelta(seconds=5)))
    show(_progress(sessions, run_id))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "(1 running, 3 waiting)" in lines[0] and "(1 stalled, 3 waiting)" in lines[1], lines
