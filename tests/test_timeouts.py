"""Bounded waits on every connection: a dead or silent broker, a silent cut of PostgreSQL.

Real processes, the real Redis and PostgreSQL: `submit` to a broker that refuses or never answers
fails with one line and records nothing; `status` across a silent cut fails with one line; a worker
writing across a silent cut logs the outage, keeps its rows and writes them once the link returns.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import fault_injection
from tests.cluster import TcpProxy, Worker, lora, rows, scalar
from tests.conftest import write_arith_dataset
from tests.waiting import wait_until

REDIS = "redis://127.0.0.1:6379/3"
#: `submit` against a dead broker must fail within this many seconds (DESIGN: about 10 s).
SUBMIT_BOUND_S = 12.0
#: `status` against a silent database must fail within this many seconds.
STATUS_BOUND_S = 15.0

CONFIG = """
name: timeouts
model:
  base: demo
  adapters:
    attn: {adapter}
  dtype: float32
dataset:
  path: {data}
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
generation:
  max_new_tokens: 8
inference:
  batch_size: 8
  chunk_size: 2
scoring:
  match: numeric
"""
PAIRS = [(12, 30), (7, 8), (55, 21), (90, 9), (33, 44), (61, 17)]


def _config(tmp_path: Path, adapters: dict[str, Path]) -> Path:
    data = write_arith_dataset(tmp_path / "data.jsonl", PAIRS)
    path = tmp_path / "timeouts.yaml"
    path.write_text(CONFIG.format(adapter=adapters["attn"], data=data))
    return path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again on leaving: nothing listens there


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A listener that accepts every connection and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    done.set()
    thread.join(timeout=5)
    server.close()
    for sock in held:
        sock.close()


def _assert_one_line_failure(result: object, started: float, bound: float, *needles: str) -> float:
    took = time.monotonic() - started
    stderr = result.stderr.strip()  # type: ignore[attr-defined]
    assert result.returncode == 1, (result.returncode, stderr)  # type: ignore[attr-defined]
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in stderr, stderr
    assert took < bound, f"took {took:.1f}s: {stderr}"
    return took


def _assert_nothing_recorded(db_url: str) -> None:
    assert scalar(db_url, "SELECT count(*) FROM runs") == 0
    status = lora(db_url, REDIS, "status", "--format", "json", timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout) == []


@pytest.mark.slow
def test_submit_to_a_closed_broker_port_fails_in_one_line_and_records_nothing(
        tmp_path: Path, pg_url: str, test_adapters: dict[str, Path]) -> None:
    broker = f"redis://:s3cret@127.0.0.1:{_closed_port()}/0"
    started = time.monotonic()
    result = lora(pg_url, broker, "submit", str(_config(tmp_path, test_adapters)), timeout=60)
    took = _assert_one_line_failure(result, started, SUBMIT_BOUND_S, "redis://:***@127.0.0.1", "check that Redis")
    assert "s3cret" not in result.stderr
    _assert_nothing_recorded(pg_url)
    print(f"closed broker port: one line after {took:.1f}s")


@pytest.mark.slow
def test_submit_to_a_broker_that_never_answers_fails_in_one_line_and_records_nothing(
        tmp_path: Path, pg_url: str, test_adapters: dict[str, Path], silent_port: int) -> None:
    broker = f"redis://127.0.0.1:{silent_port}/0"
    started = time.monotonic()
    result = lora(pg_url, broker, "submit", str(_config(tmp_path, test_adapters)), timeout=60)
    took = _assert_one_line_failure(result, started, SUBMIT_BOUND_S, broker, "not answering")
    _assert_nothing_recorded(pg_url)
    print(f"silent broker: one line after {took:.1f}s")


def test_status_across_a_silent_database_cut_fails_in_one_line(pg_url: str) -> None:
    database = pg_url.rsplit("/", 1)[1]
    proxy = TcpProxy().start()
    try:
        via_proxy = proxy.url(database)
        assert lora(via_proxy, REDIS, "db", "upgrade", timeout=60).returncode == 0
        ok = lora(via_proxy, REDIS, "status", timeout=60)
        assert ok.returncode == 0, ok.stderr
        proxy.freeze()
        started = time.monotonic()
        result = lora(via_proxy, REDIS, "status", timeout=60)
        took = _assert_one_line_failure(result, started, STATUS_BOUND_S, "database error")
        print(f"status across a silent cut: one line after {took:.1f}s: {result.stderr.strip()}")
    finally:
        proxy.thaw()
        proxy.cut()


#: Seconds of silence in the worker's cut: 60 in the suite; the issue's 2 minutes with
#: LORA_COMPARE_TEST_CUT_S=120 (the worker's lease expires either way: the cut outlasts it).
CUT_S = float(os.environ.get("LORA_COMPARE_TEST_CUT_S", "60"))


@pytest.mark.slow
def test_a_worker_across_a_silent_database_cut_logs_it_and_finishes_exactly_once(
        tmp_path: Path, pg_url: str, test_adapters: dict[str, Path]) -> None:
    database = pg_url.rsplit("/", 1)[1]
    queue = f"lc-test-{uuid.uuid4().hex[:8]}"
    proxy = TcpProxy().start()
    # A long visibility timeout: the chunk held across the cut is not redelivered meanwhile.
    hold = tmp_path / "hold"
    hold.touch()
    worker = Worker("w1@test", proxy.url(database), REDIS, queue, tmp_path, visibility_timeout=600,
                    env={fault_injection.HOLD_ENV: str(hold)})
    try:
        worker.start().wait_ready(timeout=120)
        # Submitted straight to PostgreSQL; the worker's own link goes through the proxy.
        result = lora(pg_url, REDIS, "submit", str(_config(tmp_path, test_adapters)), "--queue", queue)
        assert result.returncode == 0, result.stderr
        run_id = int(result.stdout.strip().splitlines()[-1])
        # The worker has generated its first chunk and holds the rows: cut the link, then let it write.
        wait_until(lambda: "fault injection: holding" in worker.log(), 180, "a first generated chunk")
        proxy.freeze()
        cut_at = time.monotonic()
        hold.unlink()
        wait_until(lambda: "database unreachable while writing" in worker.log(), 30, "the worker to log the outage")
        noticed = time.monotonic() - cut_at
        time.sleep(max(0.0, CUT_S - noticed))  # the outage under test (CUT_S of silence in all), not a wait
        proxy.thaw()
        wait_until(lambda: scalar(pg_url, "SELECT status FROM runs WHERE id = :r", r=run_id) == "completed",
                   240, f"run {run_id} to complete", interval=0.5)
        counts = rows(pg_url, "SELECT example_idx, variant, count(*) FROM generations WHERE run_id = :r "
                              "GROUP BY example_idx, variant", r=run_id)
        assert len(counts) == len(PAIRS) * 2 and all(c == 1 for _, _, c in counts)
        assert worker.alive
        print(f"worker logged the silent cut after {noticed:.1f}s; {CUT_S:.0f}s of silence; run completed")
    finally:
        worker.stop()
        proxy.thaw()
        proxy.cut()
