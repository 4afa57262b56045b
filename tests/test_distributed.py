"""Distributed mode on the real Redis and PostgreSQL, with real `lora-compare worker` processes.

Each test gets its own PostgreSQL database and queue name; the Redis-restart test runs its own
redis-server. Workers run on the CPU with one thread each (two share this machine's cores).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from producer.cli import cli
from tests import fault_injection
from tests.cluster import RedisServer, TcpProxy, Worker, lora, rows, scalar
from tests.conftest import write_arith_dataset
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/3"
PAIRS = [(12, 30), (7, 8), (55, 21), (90, 9), (33, 44), (61, 17), (25, 25), (48, 39), (14, 72), (66, 11),
         (23, 41), (80, 15)]

CONFIG = """
name: {name}
model:
  base: demo
  adapters:
{adapters}
  dtype: float32
dataset:
  path: {data}
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
generation:
  max_new_tokens: 8
inference:
  batch_size: 8
  chunk_size: {chunk_size}
scoring:
  match: numeric
"""


@pytest.fixture
def queue() -> str:
    return f"lc-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for worker in started:
        worker.stop()


def _config(tmp_path: Path, adapters: dict[str, Path], *, name: str = "dist", chunk_size: int = 2,
            pairs: list[tuple[int, int]] = PAIRS) -> Path:
    data = write_arith_dataset(tmp_path / f"{name}.jsonl", pairs)
    body = "\n".join(f"    {k}: {v}" for k, v in adapters.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, adapters=body, data=data, chunk_size=chunk_size))
    return path


def _submit(db_url: str, broker: str, config: Path, queue: str) -> int:
    result = lora(db_url, broker, "submit", str(config), "--queue", queue)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


def _wait_final(db_url: str, run_id: int, timeout: float = 240) -> str:
    wait_until(lambda: scalar(db_url, "SELECT status FROM runs WHERE id = :r", r=run_id)
               in ("completed", "failed", "cancelled"), timeout, f"run {run_id} to finish", interval=0.5)
    return str(scalar(db_url, "SELECT status FROM runs WHERE id = :r", r=run_id))


def _outputs(db_url: str, run_id: int) -> dict[tuple[int, str], str]:
    found = rows(db_url, "SELECT example_idx, variant, output FROM outputs WHERE run_id = :r", r=run_id)
    return {(int(i), str(v)): str(o) for i, v, o in found}  # type: ignore[call-overload]


def _assert_exactly_once(db_url: str, run_id: int, n_examples: int, variants: int) -> None:
    counts = rows(db_url, "SELECT example_idx, variant, count(*) FROM generations WHERE run_id = :r "
                          "GROUP BY example_idx, variant", r=run_id)
    assert len(counts) == n_examples * variants
    assert all(c == 1 for _, _, c in counts)


def _done_chunks(db_url: str, run_id: int) -> int:
    return int(scalar(db_url, "SELECT count(*) FROM chunks WHERE run_id = :r AND status = 'done'", r=run_id) or 0)


def test_two_workers_complete_a_run_like_embedded_mode(tmp_path: Path, pg_url: str, queue: str,
                                                       workers: list[Worker], test_adapters: dict[str, Path]) -> None:
    config = _config(tmp_path, test_adapters)
    workers += [Worker(f"w{i}@test", pg_url, REDIS, queue, tmp_path).start() for i in (1, 2)]
    for w in workers:
        w.wait_ready()
    run_id = _submit(pg_url, REDIS, config, queue)
    assert _wait_final(pg_url, run_id) == "completed"
    _assert_exactly_once(pg_url, run_id, len(PAIRS), 3)
    by_worker = rows(pg_url, "SELECT DISTINCT worker FROM generations WHERE run_id = :r", r=run_id)
    assert {w for (w,) in by_worker} == {"w1@test", "w2@test"}  # both took chunks

    embedded_db = tmp_path / "embedded.db"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{embedded_db}", "run", "-q", "--device", "cpu",
                                      str(config)])
    assert result.exit_code == 0, result.output
    embedded_id = int(result.output.strip().splitlines()[-1])
    assert _outputs(pg_url, run_id) == _outputs(f"sqlite:///{embedded_db}", embedded_id)


def test_redis_restart_mid_run_loses_nothing(tmp_path: Path, pg_url: str, queue: str, workers: list[Worker],
                                             test_adapters: dict[str, Path]) -> None:
    redis = RedisServer(tmp_path).start()
    try:
        config = _config(tmp_path, test_adapters)
        worker = Worker("w1@test", pg_url, redis.url, queue, tmp_path)
        workers.append(worker)
        worker.start().wait_ready()
        run_id = _submit(pg_url, redis.url, config, queue)
        wait_until(lambda: _done_chunks(pg_url, run_id) >= 1, 120, "a first chunk")
        redis.stop()
        time.sleep(3)  # the outage under test (how long Redis is down), not a wait
        redis.start()
        assert _wait_final(pg_url, run_id) == "completed"
        _assert_exactly_once(pg_url, run_id, len(PAIRS), 3)
        assert worker.alive
    finally:
        redis.stop()


def test_postgres_unreachable_mid_run_is_retried(tmp_path: Path, pg_url: str, queue: str, workers: list[Worker],
                                                 test_adapters: dict[str, Path]) -> None:
    database = pg_url.rsplit("/", 1)[1]
    proxy = TcpProxy().start()
    try:
        via_proxy = proxy.url(database)
        config = _config(tmp_path, test_adapters)
        worker = Worker("w1@test", via_proxy, REDIS, queue, tmp_path)
        workers.append(worker)
        worker.start().wait_ready()
        run_id = _submit(via_proxy, REDIS, config, queue)
        wait_until(lambda: _done_chunks(pg_url, run_id) >= 1, 120, "a first chunk")
        proxy.cut()
        time.sleep(8)  # the outage under test (how long PostgreSQL is cut off), not a wait
        proxy.restore()
        assert _wait_final(pg_url, run_id) == "completed"
        _assert_exactly_once(pg_url, run_id, len(PAIRS), 3)
        assert "database unreachable" in worker.log() or "OperationalError" in worker.log()
    finally:
        proxy.cut()


def test_a_chunk_that_always_crashes_its_worker_is_failed_then_retried(
        tmp_path: Path, pg_url: str, queue: str, workers: list[Worker], test_adapters: dict[str, Path]) -> None:
    pairs = PAIRS[:6]
    config = _config(tmp_path, {"attn": test_adapters["attn"]}, pairs=pairs)
    text_ = config.read_text().replace('prompt: "What is', 'prompt: "{% if a == 55 %}CRASH-ME {% endif %}What is')
    config.write_text(text_)  # example 2 (55 + 21) sits in chunk 1
    crashy = Worker("w1@test", pg_url, REDIS, queue, tmp_path, visibility_timeout=6, max_attempts=2,
                    env={fault_injection.MARKER_ENV: "CRASH-ME"})
    workers.append(crashy)
    crashy.start().wait_ready()
    run_id = _submit(pg_url, REDIS, config, queue)

    def ended_restarting_the_worker() -> bool:
        if scalar(pg_url, "SELECT status FROM runs WHERE id = :r", r=run_id) in ("completed", "failed"):
            return True
        if not crashy.alive:  # a supervisor (compose's restart policy) brings the worker back
            crashy.start()
        return False

    wait_until(ended_restarting_the_worker, 240, "the run to end", interval=0.5)
    assert scalar(pg_url, "SELECT status FROM runs WHERE id = :r", r=run_id) == "failed"
    chunk = rows(pg_url, "SELECT id, status, attempts, error FROM chunks WHERE run_id = :r AND status <> 'done'",
                 r=run_id)
    assert [(c[0], c[1]) for c in chunk] == [(1, "failed")]
    # Every attempt's cause is kept (chunk_attempts), and the final error names the repeated deaths.
    assert "gave up after 2 attempts: the worker died 2 times while running this chunk (worker w1@test;" \
        in str(chunk[0][3]), chunk[0][3]
    assert crashy.starts >= 2
    status = lora(pg_url, REDIS, "status", str(run_id))
    assert "chunk 1 failed after 2 attempt(s)" in status.stdout
    assert "chunk 1 attempts: worker lost x2 (w1@test)\n" in status.stdout, status.stdout
    status_json = json.loads(lora(pg_url, REDIS, "status", str(run_id), "--format", "json").stdout)
    assert status_json["failed_chunks"][0]["chunk"] == 1
    assert [(c["chunk"], c["summary"]) for c in status_json["chunk_attempts"]] == [(1, "worker lost x2 (w1@test)")]
    assert int(scalar(pg_url, "SELECT count(*) FROM generations WHERE run_id = :r", r=run_id) or 0) == 2 * 4

    # The fix: a worker without the fault; `retry` takes the failed chunk again.
    crashy.stop()
    fixed = Worker("w2@test", pg_url, REDIS, queue, tmp_path)
    workers.append(fixed)
    fixed.start().wait_ready()
    assert lora(pg_url, REDIS, "retry", str(run_id), "--queue", queue).returncode == 0
    assert _wait_final(pg_url, run_id) == "completed"
    _assert_exactly_once(pg_url, run_id, len(pairs), 2)
    history = rows(pg_url, "SELECT n, worker, outcome FROM chunk_attempts WHERE run_id = :r AND chunk_id = 1 "
                           "ORDER BY n", r=run_id)
    assert [tuple(h) for h in history] == [(1, "w1@test", "worker_lost"), (2, "w1@test", "worker_lost"),
                                           (3, "w2@test", "done")]  # retry kept the history and numbered on


def test_cancel_stops_a_run_and_retry_resumes_only_what_is_missing(
        tmp_path: Path, pg_url: str, queue: str, workers: list[Worker], test_adapters: dict[str, Path]) -> None:
    config = _config(tmp_path, {"attn": test_adapters["attn"]}, chunk_size=1)
    worker = Worker("w1@test", pg_url, REDIS, queue, tmp_path)
    workers.append(worker)
    worker.start().wait_ready()
    run_id = _submit(pg_url, REDIS, config, queue)
    wait_until(lambda: _done_chunks(pg_url, run_id) >= 2, 120, "two chunks")
    result = lora(pg_url, REDIS, "cancel", str(run_id))
    assert result.returncode == 0 and "cancelled" in result.stdout
    # Cancelling leaves a chunk already claimed to finish; every other chunk is `cancelled`, and a message for it
    # is skipped at its claim. So once no chunk runs, nothing more can be written.
    wait_until(lambda: scalar(pg_url, "SELECT count(*) FROM chunks WHERE run_id = :r AND status = 'running'",
                              r=run_id) == 0, 60, "the chunk in progress to finish")
    before = rows(pg_url, "SELECT example_idx, variant, id FROM generations WHERE run_id = :r", r=run_id)
    time.sleep(3)  # a window in which a cancelled run must write nothing (what is tested, not a wait)
    assert rows(pg_url, "SELECT example_idx, variant, id FROM generations WHERE run_id = :r", r=run_id) == before
    assert scalar(pg_url, "SELECT status FROM runs WHERE id = :r", r=run_id) == "cancelled"
    assert len(before) < len(PAIRS) * 2
    assert lora(pg_url, REDIS, "retry", str(run_id), "--queue", queue).returncode == 0
    assert _wait_final(pg_url, run_id) == "completed"
    _assert_exactly_once(pg_url, run_id, len(PAIRS), 2)
    after = set(rows(pg_url, "SELECT example_idx, variant, id FROM generations WHERE run_id = :r", r=run_id))
    assert set(before) <= after  # what was already done was kept, not regenerated


def test_a_warm_worker_reuses_its_model_and_holds_adapters_of_several_runs(
        tmp_path: Path, pg_url: str, queue: str, workers: list[Worker], test_adapters: dict[str, Path]) -> None:
    worker = Worker("w1@test", pg_url, REDIS, queue, tmp_path)
    workers.append(worker)
    worker.start().wait_ready()
    first = _submit(pg_url, REDIS, _config(tmp_path, {"attn": test_adapters["attn"]}, name="first",
                                           pairs=PAIRS[:4]), queue)
    assert _wait_final(pg_url, first) == "completed"
    second = _submit(pg_url, REDIS, _config(tmp_path, {"mlp": test_adapters["mlp"]}, name="second",
                                            pairs=PAIRS[:4]), queue)
    assert _wait_final(pg_url, second) == "completed"
    log = worker.log()
    assert log.count("loading base model") == 1  # the second run loaded no model
    second_part = log[log.index(f"run {second} chunk 0 attempt 1"):]
    assert "loading base model" not in second_part
    assert "model loads so far: base 1, adapters 2; resident adapters 2" in second_part


def test_redis_restarted_without_its_data_mid_run_is_rebuilt_from_sql(
        tmp_path: Path, pg_url: str, queue: str, workers: list[Worker], test_adapters: dict[str, Path]) -> None:
    """Every queued message is lost with Redis's data: the workers' sweep sends them again from SQL."""
    folder = tmp_path / "redis"
    folder.mkdir()
    redis = RedisServer(folder).start()
    try:
        config = _config(tmp_path, test_adapters)
        worker = Worker("w1@test", pg_url, redis.url, queue, tmp_path)
        workers.append(worker)
        worker.start().wait_ready()
        run_id = _submit(pg_url, redis.url, config, queue)
        wait_until(lambda: _done_chunks(pg_url, run_id) >= 1, 120, "a first chunk")
        redis.stop()
        for path in folder.rglob("*"):  # the data loss under test: the append-only file is gone
            if path.is_file():
                path.unlink()
        # The outage: the worker finishes the chunk it holds, then nothing runs; `status` says so.
        wait_until(lambda: not rows(pg_url, "SELECT id FROM chunks WHERE run_id = :r AND status = 'running'",
                                    r=run_id), 120, "the chunk in hand to be written")
        shown = lora(pg_url, redis.url, "status", str(run_id))
        assert shown.returncode == 0, shown.stderr
        assert "ETA -" in shown.stdout and "no chunk running:" in shown.stdout, shown.stdout
        assert f"broker: cannot see queue '{queue}'" in shown.stdout, shown.stdout
        redis.start()
        back = time.monotonic()
        assert _wait_final(pg_url, run_id) == "completed"
        took = time.monotonic() - back
        _assert_exactly_once(pg_url, run_id, len(PAIRS), 3)
        generating = sum(float(s or 0) for (s,) in rows(
            pg_url, "SELECT generate_seconds FROM chunks WHERE run_id = :r AND finished_at > now() - "
                    "make_interval(secs => :t)", r=run_id, t=took))
        print(f"run completed {took:.1f} s after Redis came back empty ({generating:.1f} s of it generating)")
        assert took < 60 + generating
        assert "sent again" in worker.log()
        assert worker.alive
    finally:
        redis.stop()
