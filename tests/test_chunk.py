"""`worker.chunk.process_chunk` around the SQL: a claimed chunk is never stranded by an exception."""

from __future__ import annotations

from contract.settings import Settings
from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.runs import NewExample, NewVariant, create_run, get_run
from db.schema import Chunk
from worker.chunk import process_chunk
from worker.model_host import ModelHost


def test_a_stored_config_this_worker_cannot_read_fails_its_chunk_in_one_attempt(any_db_url: str) -> None:
    """A key from a newer producer used to escape `process_chunk` and roll back the claim: the chunk
    stayed `queued` with 0 attempts, the run `queued` for ever. Now the claim is committed first and
    the chunk is failed with the reason, which `status` shows."""
    engine = make_engine(any_db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    stored = {"name": "newer", "model": {"base": "demo", "adapters": {"a": "/a"}},
              "dataset": {"path": "d.jsonl", "prompt": "{{ q }}"}, "task": "choice", "from_the_future": 1}
    with sessions.begin() as session:
        run_id = create_run(session, name="newer", config=stored, config_path=None, base_model="demo",
                            dataset_path="d.jsonl", dataset_sha256="0" * 64,
                            variants=[NewVariant("base", None, None), NewVariant("a", "/a", "f" * 64)],
                            examples=[NewExample(i, {"q": i}, f"p{i}", None) for i in range(2)], chunk_size=2).id
    host = ModelHost(Settings.from_env(), device="cpu")  # never loads: the chunk fails before generation
    assert process_chunk(sessions, host, run_id, 0, worker="w", max_attempts=3) == "failed"
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, 0))
        assert chunk is not None and (chunk.status, chunk.attempts) == ("failed", 1)
        assert chunk.error is not None and "stored config cannot be used by this worker" in chunk.error
        assert "from_the_future" in chunk.error or "task" in chunk.error
        run = get_run(session, run_id)
        assert run is not None and run.status == "failed"
    engine.dispose()
