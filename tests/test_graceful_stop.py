"""A worker stopped mid-chunk (SIGTERM, then SIGQUIT) hands its chunk back at once and exits in seconds.

Real `lora-compare worker` processes on Redis and PostgreSQL with the demo model. The stopped worker
runs with every decode step slowed (tests/fault_injection.py), so its chunk would take minutes; before
the hand-back, a warm shutdown kept generating until Docker's SIGKILL, and a cold one recorded
`NotImplementedError ... does not implement kill_job` on the chunk and used an attempt. The broker's
visibility timeout is an hour, so only the hand-back's fresh message can bring the chunk back in time.
The run has one chunk: the worker is stopped on it twice (SIGTERM, then SIGQUIT after a restart), and
a second worker, at the demo model's own speed, completes it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import Worker, rows, scalar
from tests.conftest import write_arith_dataset
from tests.fault_injection import SLOW_STEP_ENV
from tests.test_distributed import (
    REDIS,
    _assert_exactly_once,
    _submit,
    _wait_final,
    queue,  # noqa: F401 - fixture
    workers,  # noqa: F401 - fixture
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

#: Seconds added to every decode step of the worker that is stopped: its chunk lasts minutes.
SLOW_STEP_S = 4.0
NEW_TOKENS = 30
#: The acceptance bound: well inside Docker's stop_grace_period.
EXIT_BOUND_S = 30.0
VISIBILITY_S = 3600
PAIRS = [(12, 30), (7, 8)]

# Sampled at a high temperature, so rows rarely meet EOS and run their NEW_TOKENS steps.
CONFIG = """
name: graceful-stop
model:
  base: demo
  adapters:
{adapters}
  dtype: float32
dataset:
  path: {data}
  prompt: "Tell a long story about {{{{ a }}}} and {{{{ b }}}}."
  reference: "{{{{ answer }}}}"
generation:
  max_new_tokens: {new_tokens}
  do_sample: true
  temperature: 1.5
inference:
  batch_size: 8
  chunk_size: 8
scoring:
  match: numeric
"""


def _config(tmp_path: Path, adapters: dict[str, Path]) -> Path:
    data = write_arith_dataset(tmp_path / "stop.jsonl", PAIRS)
    body = "\n".join(f"    {k}: {v}" for k, v in adapters.items())
    path = tmp_path / "stop.yaml"
    path.write_text(CONFIG.format(adapters=body, data=data, new_tokens=NEW_TOKENS))
    return path


def _generating(db_url: str, run_id: int, worker: Worker) -> int:
    """Wait until `worker` (its latest start) is in the decode loop of a chunk it holds; that chunk."""
    def holding() -> bool:
        return worker.log().count("every decode step is") >= worker.starts and bool(rows(
            db_url, "SELECT id FROM chunks WHERE run_id = :r AND status = 'running' AND worker = :w",
            r=run_id, w=worker.name))

    wait_until(holding, 180, f"{worker.name} to be generating a chunk", interval=0.1)
    [(chunk_id,)] = rows(db_url, "SELECT id FROM chunks WHERE run_id = :r AND status = 'running' AND worker = :w",
                         r=run_id, w=worker.name)
    return int(chunk_id)  # type: ignore[call-overload]


def _signal(worker: Worker, sig: signal.Signals) -> float:
    assert worker.proc is not None
    worker.proc.send_signal(sig)
    return time.monotonic()


def _exited(worker: Worker, sent: float) -> tuple[float, int]:
    """Seconds from the signal `sent` until the process exited, and its exit code; no error in its log."""
    assert worker.proc is not None
    try:
        code = worker.proc.wait(timeout=EXIT_BOUND_S + 30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{worker.name} still running {EXIT_BOUND_S + 30:.0f}s after the signal:\n{worker.log()[-3000:]}")
    took = time.monotonic() - sent
    log = worker.log()
    assert "NotImplementedError" not in log and "raised unexpected" not in log, log[-3000:]
    return took, code


def _assert_handed_back(db_url: str, run_id: int, chunk_id: int, worker: Worker) -> None:
    """The chunk is `queued` again, uncounted, its lease released, nothing written (waits for the hand-back)."""
    query = "SELECT status, attempts, error, lease_expires_at FROM chunks WHERE run_id = :r AND id = :c"
    wait_until(lambda: rows(db_url, query, r=run_id, c=chunk_id)[0][0] != "running", EXIT_BOUND_S,
               "the chunk to be handed back", interval=0.1)
    status, attempts, error, lease = rows(db_url, query, r=run_id, c=chunk_id)[0]
    assert (status, attempts, lease) == ("queued", 0, None), (status, attempts, error, lease)
    assert error == f"handed back by worker {worker.name} at shutdown (attempt not counted)"
    assert scalar(db_url, "SELECT count(*) FROM generations WHERE run_id = :r AND chunk_id = :c",
                  r=run_id, c=chunk_id) == 0  # it stopped before the end: nothing was written


def test_a_worker_stopped_mid_chunk_hands_it_back_at_once_and_another_completes_it(
        tmp_path: Path, pg_url: str, queue: str, workers: list[Worker],  # noqa: F811
        test_adapters: dict[str, Path]) -> None:
    slow = Worker("w1@test", pg_url, REDIS, queue, tmp_path, visibility_timeout=VISIBILITY_S,
                  env={SLOW_STEP_ENV: str(SLOW_STEP_S)})
    fast = Worker("w2@test", pg_url, REDIS, queue, tmp_path, visibility_timeout=VISIBILITY_S)
    workers += [slow, fast]
    slow.start().wait_ready()
    run_id = _submit(pg_url, REDIS, _config(tmp_path, test_adapters), queue)

    # Warm shutdown (docker stop, a scale-down): SIGTERM mid-chunk.
    assert _generating(pg_url, run_id, slow) == 0
    sent = _signal(slow, signal.SIGTERM)
    _assert_handed_back(pg_url, run_id, 0, slow)
    took, code = _exited(slow, sent)
    print(f"\nSIGTERM mid-chunk: exited in {took:.1f}s (code {code}); the chunk alone would take "
          f">= {NEW_TOKENS * SLOW_STEP_S:.0f}s")
    assert took < EXIT_BOUND_S and code == 0

    # The same worker restarted (a supervisor) takes the chunk up again; then a cold shutdown: SIGQUIT.
    slow.start()
    assert _generating(pg_url, run_id, slow) == 0
    sent = _signal(slow, signal.SIGQUIT)
    _assert_handed_back(pg_url, run_id, 0, slow)
    # Another worker completes the run from the handed-back message alone: no manual step.
    fast.start()
    took, code = _exited(slow, sent)
    print(f"SIGQUIT mid-chunk: exited in {took:.1f}s (code {code})")
    assert took < EXIT_BOUND_S

    assert _wait_final(pg_url, run_id, timeout=180) == "completed"
    _assert_exactly_once(pg_url, run_id, len(PAIRS), 3)
    chunks = rows(pg_url, "SELECT id, attempts, error FROM chunks WHERE run_id = :r ORDER BY id", r=run_id)
    assert chunks == [(0, 1, None)]  # one counted attempt: the two handed back were not
    writers = rows(pg_url, "SELECT DISTINCT worker FROM generations WHERE run_id = :r", r=run_id)
    assert writers == [(fast.name,)]
