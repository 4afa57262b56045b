"""An adapter folder overwritten after `submit`, end to end: a real `lora-compare worker` on Redis and
PostgreSQL fails the chunk that finds other files, keeps what earlier chunks wrote, and `status` says why."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from contract.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, inspect_adapter
from contract.queue import enqueue_chunks, make_client
from tests.cluster import Worker, lora, rows, scalar
from tests.conftest import write_arith_dataset
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

REDIS = "redis://127.0.0.1:6379/3"
CONFIG = """
name: integrity
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
  chunk_size: 1
scoring:
  match: numeric
"""


@pytest.fixture
def queues() -> Iterator[tuple[str, str]]:
    """The worker's queue, and one nobody consumes (where `submit` parks the run's own messages)."""
    name = f"lc-test-{uuid.uuid4().hex[:8]}"
    yield name, f"{name}-parked"
    import redis

    redis.Redis.from_url(REDIS).delete(f"{name}-parked")


def _chunk_status(db_url: str, run_id: int, chunk_id: int) -> object:
    return scalar(db_url, "SELECT status FROM chunks WHERE run_id = :r AND id = :c", r=run_id, c=chunk_id)


def test_an_adapter_overwritten_after_submit_fails_its_next_chunk_on_a_real_worker(
        tmp_path: Path, pg_url: str, queues: tuple[str, str], test_adapters: dict[str, Path]) -> None:
    queue, parked = queues
    folder = shutil.copytree(test_adapters["attn"], tmp_path / "attn")
    recorded = inspect_adapter("attn", folder).sha256
    config = tmp_path / "integrity.yaml"
    config.write_text(CONFIG.format(adapter=folder, data=write_arith_dataset(tmp_path / "d.jsonl", [(1, 2), (3, 4)])))
    submitted = lora(pg_url, REDIS, "submit", str(config), "--queue", parked)
    assert submitted.returncode == 0, submitted.stderr
    run_id = int(submitted.stdout.strip().splitlines()[-1])
    worker = Worker("w1@test", pg_url, REDIS, queue, tmp_path).start()
    try:
        worker.wait_ready()
        client = make_client(REDIS)
        enqueue_chunks(client, run_id, [0], queue=queue)  # one chunk at a time: the overwrite falls between
        wait_until(lambda: _chunk_status(pg_url, run_id, 0) == "done", 240, "chunk 0", interval=0.5)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):  # another adapter's files in the same folder
            shutil.copyfile(test_adapters["mlp"] / name, folder / name)
        found = inspect_adapter("attn", folder).sha256
        enqueue_chunks(client, run_id, [1], queue=queue)
        wait_until(lambda: _chunk_status(pg_url, run_id, 1) == "failed", 240, "chunk 1 to fail", interval=0.5)
    finally:
        worker.stop()
    assert scalar(pg_url, "SELECT status FROM runs WHERE id = :r", r=run_id) == "failed"
    [(attempts, error)] = rows(pg_url, "SELECT attempts, error FROM chunks WHERE run_id = :r AND id = 1", r=run_id)
    assert attempts == 1 and f"adapter 'attn' ({folder})" in str(error)
    assert recorded in str(error) and found in str(error)
    kept = rows(pg_url, "SELECT chunk_id, variant, adapter_hash FROM generations WHERE run_id = :r "
                        "ORDER BY variant", r=run_id)
    assert kept == [(0, "attn", recorded), (0, "base", None)]
    status = lora(pg_url, REDIS, "status", str(run_id))
    assert "chunk 1 failed after 1 attempt(s)" in status.stdout
    assert "changed since the run was submitted" in status.stdout and found in status.stdout
