"""Every boundary refuses what it should, with a clear message, and leaves the data unchanged."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.readonly import QueryError, run_readonly
from db.runs import NewExample, NewVariant, create_run
from producer.cli import cli
from tests.cluster import Worker, lora, scalar
from tests.conftest import write_arith_dataset
from tests.waiting import wait_until


def _seeded(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine)
    with session_factory(engine).begin() as session:
        create_run(session, name="t", config={}, config_path=None, base_model="demo", dataset_path="d",
                   dataset_sha256="0" * 64, variants=[NewVariant("base", None, None)],
                   examples=[NewExample(0, {}, "p", None)], chunk_size=1)
    engine.dispose()


def _snapshot(url: str) -> list[tuple[object, ...]]:
    engine = make_engine(url)
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text("SELECT id, name, status FROM runs ORDER BY id"))]
        rows += [tuple(r) for r in conn.execute(text("SELECT run_id, idx, prompt FROM examples"))]
    engine.dispose()
    return rows


COMMON_WRITES = ["DELETE FROM runs", "UPDATE runs SET name = 'x'", "INSERT INTO runs (id) VALUES (99)",
                 "DROP TABLE generations", "CREATE TABLE evil (x int)", "ALTER TABLE runs ADD COLUMN y int",
                 "SELECT 1; DELETE FROM runs"]


@pytest.mark.parametrize("statement", COMMON_WRITES + [
    "ATTACH 'evil.db' AS evil", "VACUUM INTO 'copy.db'", "VACUUM", "PRAGMA query_only = OFF",
    "PRAGMA user_version = 7", "PRAGMA journal_mode = DELETE", "PRAGMA writable_schema = ON", "BEGIN",
    "SELECT load_extension('/tmp/x')"])
def test_sqlite_sql_is_read_only(tmp_path: Path, statement: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'r.db'}"
    _seeded(url)
    before, files = _snapshot(url), sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(QueryError) as err:
        run_readonly(url, statement)
    assert "\n" not in str(err.value)
    assert _snapshot(url) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no file attached or vacuumed into


def test_sqlite_reads_still_work(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    _seeded(url)
    assert run_readonly(url, "SELECT count(*) FROM outputs").rows == [(0,)]
    assert run_readonly(url, "PRAGMA table_info(runs)").rows
    cte = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 5) SELECT sum(n) FROM c"
    assert run_readonly(url, cte).rows == [(15,)]
    with pytest.raises(QueryError, match="limit"):
        run_readonly(url, "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c",
                     timeout_s=0.3)


@pytest.mark.parametrize("statement", COMMON_WRITES + [
    "SELECT 1; COMMIT; DELETE FROM runs", "COMMIT", "SET TRANSACTION READ WRITE",
    "COPY (SELECT 1) TO '/tmp/lora-compare-evil.txt'", "SELECT pg_read_file('/etc/hostname')",
    "CREATE TEMP TABLE t2 AS SELECT 1"])
def test_postgres_sql_is_read_only(pg_url: str, statement: str) -> None:
    _seeded(pg_url)
    before = _snapshot(pg_url)
    try:
        run_readonly(pg_url, statement)
    except QueryError as err:
        assert "\n" not in str(err)
    else:
        assert statement in ("COMMIT",), f"{statement} ran"  # a bare COMMIT of the read-only transaction
    assert _snapshot(pg_url) == before
    assert not Path("/tmp/lora-compare-evil.txt").exists()


def test_postgres_reads_and_timeout(pg_url: str) -> None:
    _seeded(pg_url)
    assert run_readonly(pg_url, "SELECT count(*) AS n FROM comparisons").records() == [{"n": 0}]
    with pytest.raises(QueryError, match="limit"):
        run_readonly(pg_url, "SELECT pg_sleep(3)", timeout_s=0.5)


# --- the queue ---------------------------------------------------------------------------------


class _Evil:
    """Unpickling this would create a file: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_pickle_and_malformed_messages_are_rejected_and_valid_chunks_still_served(
        tmp_path: Path, pg_url: str, test_adapters: dict[str, Path]) -> None:
    from celery import Celery

    from contract.queue import TASK_NAME

    redis_url = "redis://127.0.0.1:6379/6"
    queue = f"lc-sec-{uuid.uuid4().hex[:8]}"
    worker = Worker("w1@sec", pg_url, redis_url, queue, tmp_path)
    try:
        worker.start().wait_ready()
        marker = tmp_path / "pwned"
        evil = Celery("evil", broker=redis_url, set_as_current=False)
        evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
        evil.send_task(TASK_NAME, args=(_Evil(marker),), queue=queue, serializer="pickle")
        plain = Celery("plain", broker=redis_url, set_as_current=False)
        plain.send_task(TASK_NAME, kwargs={"run_id": "1; DROP TABLE runs", "chunk_id": None}, queue=queue)
        plain.send_task(TASK_NAME, kwargs={"run_id": 123456, "chunk_id": 0}, queue=queue)  # unknown run
        plain.send_task(TASK_NAME, args=[1, 2, 3], kwargs={"extra": {"nested": [1]}}, queue=queue)
        with plain.connection_for_write() as conn:  # not even JSON
            conn.default_channel.basic_publish(
                conn.default_channel.prepare_message("{not json", content_type="application/json",
                                                     headers={"task": TASK_NAME, "id": str(uuid.uuid4())}),
                exchange="", routing_key=queue)

        data = write_arith_dataset(tmp_path / "d.jsonl", [(1, 2), (3, 4)])
        config = tmp_path / "c.yaml"
        config.write_text(f"""
model: {{base: demo, adapters: {{attn: {test_adapters['attn']}}}}}
dataset: {{path: {data}, prompt: "What is {{{{a}}}} plus {{{{b}}}}?", reference: "{{{{answer}}}}"}}
generation: {{max_new_tokens: 4}}
""")
        result = lora(pg_url, redis_url, "submit", str(config), "--queue", queue)
        run_id = int(result.stdout.strip().splitlines()[-1])
        wait_until(lambda: scalar(pg_url, "SELECT status FROM runs WHERE id = :r", r=run_id) == "completed", 120,
                   "the valid run")
        import redis

        client = redis.Redis.from_url(redis_url)

        def unacked_here() -> list[dict[str, object]]:
            unacked = [json.loads(v)[0] for v in client.hvals("unacked")]
            return [m for m in unacked if m.get("properties", {}).get("delivery_info", {}).get("routing_key") == queue]

        # The worker logs each refusal before it acknowledges the message: once none is left, all were answered.
        wait_until(lambda: client.llen(queue) == 0 and not unacked_here(), 30,
                   "every message to be acknowledged (nothing left to be redelivered)")
        assert not marker.exists(), "a pickle was unpickled"
        log = worker.log()
        assert "pickle" in log.lower()  # refused content type, logged
        assert "rejected a malformed chunk message" in log
        assert "rejected a chunk message for run 123456, which does not exist" in log
        assert worker.alive
    finally:
        worker.stop()


# --- model and adapter loading -----------------------------------------------------------------


@pytest.mark.slow
def test_workers_load_only_from_their_model_roots(tmp_path: Path, demo_model: Path,
                                                  test_adapters: dict[str, Path], settings) -> None:  # type: ignore
    from dataclasses import replace

    from contract.errors import ModelLoadError
    from worker.model_host import ModelHost

    root = tmp_path / "models"
    inside = root / "adapters"
    inside.mkdir(parents=True)
    (inside / "attn").symlink_to(test_adapters["attn"], target_is_directory=True)
    host = ModelHost(replace(settings, model_roots=(root,)), device="cpu")
    host.ensure_base("demo")  # the demo model lives in the cache, which is ours
    for path in (str(test_adapters["attn"]), str(inside / ".." / ".." / "elsewhere"), str(inside / "attn")):
        with pytest.raises(ModelLoadError, match="outside the folders this worker loads from"):
            host.ensure_adapter("attn", path)  # a link out of the root is outside too
    with pytest.raises(ModelLoadError, match="outside"):
        host.ensure_base(str(tmp_path / "other-model"))


@pytest.mark.slow
def test_empty_and_too_long_prompts_are_handled_per_row(tmp_path: Path, test_adapters: dict[str, Path]) -> None:
    rows = [{"q": "What is 2 plus 2?"}, {"q": ""}, {"q": "word " * 9000}, {"q": "Name a colour."}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "c.yaml").write_text(f"""
model: {{base: demo, adapters: {{attn: {test_adapters['attn']}}}}}
dataset: {{path: d.jsonl, prompt: "{{{{ q }}}}", chat_template: false}}
generation: {{max_new_tokens: 4}}
inference: {{chunk_size: 4}}
""")
    db = tmp_path / "r.db"
    result = CliRunner().invoke(cli, ["--database-url", f"sqlite:///{db}", "run", "-q", "--device", "cpu",
                                      str(tmp_path / "c.yaml")])
    assert result.exit_code == 0, result.output
    got = dict(run_readonly(f"sqlite:///{db}", "SELECT example_idx || variant, finish_reason FROM outputs").rows)
    assert got["1base"] == got["1attn"] == "empty_prompt"
    assert got["2base"] == got["2attn"] == "prompt_too_long"
    assert {got["0base"], got["3attn"]} <= {"eos", "length"}
