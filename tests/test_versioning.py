"""A run a worker cannot read fails its chunk at once, with a reason that says to upgrade, on the real queue.

Three ways a newer producer can reach an older worker: a stored config with a key this worker does
not know, a stored config of a newer version, a queue message of a newer version. Each must end
`failed` in one attempt (none for the message, which is refused before any claim), with the reason in
`status`, instead of a run left `queued` or retried for hours.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import text

from contract.config import CONFIG_VERSION, VERSION_KEY
from contract.queue import MESSAGE_VERSION, TASK_NAME, make_client
from db.engine import make_engine
from tests.cluster import Worker, lora, scalar
from tests.conftest import write_arith_dataset
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/3"

CONFIG = """
name: {name}
model:
  base: demo
  adapters:
    arith: {adapter}
dataset:
  path: {data}
  prompt: "What is {{{{ a }}}} plus {{{{ b }}}}?"
  reference: "{{{{ answer }}}}"
generation:
  max_new_tokens: 4
inference:
  chunk_size: 2
scoring:
  match: numeric
"""


def _submit(tmp_path: Path, db_url: str, adapter: Path, name: str, queue: str) -> int:
    data = write_arith_dataset(tmp_path / f"{name}.jsonl", [(1, 2), (3, 4)])
    config = tmp_path / f"{name}.yaml"
    config.write_text(CONFIG.format(name=name, adapter=adapter, data=data))
    result = lora(db_url, REDIS, "submit", str(config), "--queue", queue)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


def _edit_config(db_url: str, run_id: int, edit: dict[str, object]) -> None:
    """What a newer producer would have stored: today's config with `edit` merged in."""
    engine = make_engine(db_url)
    with engine.begin() as conn:
        stored = conn.execute(text("SELECT config FROM runs WHERE id = :r"), {"r": run_id}).scalar_one()
        stored = json.loads(stored) if isinstance(stored, str) else dict(stored)
        for key, value in edit.items():
            section, _, name = key.partition(".")
            if name:
                stored[section][name] = value
            else:
                stored[section] = value
        conn.execute(text("UPDATE runs SET config = :c WHERE id = :r"), {"c": json.dumps(stored), "r": run_id})
    engine.dispose()


def _chunk(db_url: str, run_id: int) -> tuple[str, int, str]:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT status, attempts, error FROM chunks WHERE run_id = :r AND id = 0"),
                           {"r": run_id}).one()
    engine.dispose()
    return str(row[0]), int(row[1]), str(row[2] or "")


def test_what_this_worker_cannot_read_fails_in_one_attempt_and_says_so(
    tmp_path: Path, pg_url: str, test_adapters: dict[str, Path]
) -> None:
    queue, parked = f"lc-test-{uuid.uuid4().hex[:8]}", f"lc-parked-{uuid.uuid4().hex[:8]}"
    adapter = test_adapters["attn"]
    unknown_key = _submit(tmp_path, pg_url, adapter, "unknown-key", parked)
    _edit_config(pg_url, unknown_key, {"generation.beam_width": 4})
    newer_config = _submit(tmp_path, pg_url, adapter, "newer-config", parked)
    _edit_config(pg_url, newer_config, {VERSION_KEY: CONFIG_VERSION + 1})
    newer_message = _submit(tmp_path, pg_url, adapter, "newer-message", parked)

    # Each run is one chunk. The submits' own messages sit on a queue nobody reads; the worker's queue
    # gets one message per case, as a newer producer would send it.
    client = make_client(REDIS)
    for run_id in (unknown_key, newer_config):
        client.send_task(TASK_NAME, kwargs={"run_id": run_id, "chunk_id": 0, "version": MESSAGE_VERSION}, queue=queue)
    client.send_task(TASK_NAME, kwargs={"run_id": newer_message, "chunk_id": 0, "version": MESSAGE_VERSION + 1},
                     queue=queue)

    worker = Worker("w@versions", pg_url, REDIS, queue, tmp_path).start()
    try:
        worker.wait_ready()
        wait_until(lambda: all(_chunk(pg_url, r)[0] == "failed" for r in (unknown_key, newer_config, newer_message)),
                   120, "the three chunks to fail", interval=0.5)
    finally:
        worker.stop()

    cases = {
        unknown_key: ("unknown key 'generation.beam_width'", 1),
        newer_config: (f"config version {CONFIG_VERSION + 1} was written by a newer lora-compare", 1),
        newer_message: (f"queue message has version {MESSAGE_VERSION + 1}", 0),
    }
    for run_id, (reason, attempts) in cases.items():
        status, used, error = _chunk(pg_url, run_id)
        assert (status, used) == ("failed", attempts), (run_id, error)
        assert reason in error and "upgrade" in error, error
        shown = lora(pg_url, REDIS, "status", str(run_id))
        assert shown.returncode == 0, shown.stderr
        assert f"chunk 0 failed after {attempts} attempt(s)" in shown.stdout and reason in shown.stdout, shown.stdout
        assert scalar(pg_url, "SELECT status FROM runs WHERE id = :r", r=run_id) == "failed"  # its only chunk
    redis.Redis.from_url(REDIS).delete(parked)  # the submits' own messages, never read
