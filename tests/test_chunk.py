"""`worker.chunk.process_chunk` around the SQL: a claimed chunk is never stranded by an exception."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from contract.artifacts import ADAPTER_WEIGHTS, inspect_adapter
from contract.errors import FatalChunkError, RetryableChunkError
from contract.settings import Settings
from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.runs import NewExample, NewVariant, create_run, get_run
from db.schema import Chunk, Generation
from tests.fake_generator import FakeGenerator, fake_adapter_hash
from worker.chunk import Processed, process_chunk
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
    assert process_chunk(sessions, host, run_id, 0, worker="w", max_attempts=3) is Processed.FAILED
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, 0))
        assert chunk is not None and (chunk.status, chunk.attempts) == ("failed", 1)
        assert chunk.error is not None and "stored config cannot be used by this worker" in chunk.error
        assert "from_the_future" in chunk.error or "task" in chunk.error
        run = get_run(session, run_id)
        assert run is not None and run.status == "failed"
    engine.dispose()


# --- process_chunk over a fake generator (no model): every path after the claim ends recorded ---------

STORED = {"name": "fake", "model": {"base": "demo", "adapters": {"a": "/a"}},
          "dataset": {"path": "d.jsonl", "prompt": "{{ q }}"}, "generation": {"max_new_tokens": 4}}


def _fake_run(url: str, *, examples: int = 2) -> tuple[Any, sessionmaker[Session], int]:
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        run_id = create_run(session, name="fake", config=STORED, config_path=None, base_model="demo",
                            dataset_path="d.jsonl", dataset_sha256="0" * 64,
                            variants=[NewVariant("base", None, None), NewVariant("a", "/a", fake_adapter_hash("a"))],
                            examples=[NewExample(i, {"q": i}, f"p{i}", None) for i in range(examples)],
                            chunk_size=examples).id
    return engine, sessions, run_id


def _chunk(sessions: sessionmaker[Session], run_id: int) -> tuple[str, int, str | None]:
    with sessions() as session:
        chunk = session.get(Chunk, (run_id, 0))
        assert chunk is not None
        return chunk.status, chunk.attempts, chunk.error


def test_a_chunk_is_written_once_and_a_second_run_reuses_its_outputs(sqlite_url: str) -> None:
    engine, sessions, run_id = _fake_run(sqlite_url)
    gen = FakeGenerator()
    assert process_chunk(sessions, gen, run_id, 0, worker="w", max_attempts=3) is Processed.DONE
    assert process_chunk(sessions, gen, run_id, 0, worker="w", max_attempts=3) is Processed.SKIPPED
    assert process_chunk(sessions, gen, 999, 0, worker="w", max_attempts=3) is Processed.REJECTED
    assert _chunk(sessions, run_id) == ("done", 1, None) and len(gen.generated) == 1
    with sessions.begin() as session:
        second = create_run(session, name="again", config=STORED, config_path=None, base_model="demo",
                            dataset_path="d.jsonl", dataset_sha256="0" * 64,
                            variants=[NewVariant("base", None, None), NewVariant("a", "/a", fake_adapter_hash("a"))],
                            examples=[NewExample(i, {"q": i}, f"p{i}", None) for i in range(2)], chunk_size=2).id
    assert process_chunk(sessions, gen, second, 0, worker="w", max_attempts=3) is Processed.DONE
    assert len(gen.generated) == 1  # every row came from the cache
    with sessions() as session:
        rows = {(g.run_id, g.example_idx, g.variant): g for g in session.scalars(select(Generation))}
    first, copy = rows[(run_id, 1, "a")], rows[(second, 1, "a")]
    assert copy.reused_from == first.id and copy.cache_key == first.cache_key is not None
    assert (copy.output, copy.output_ids, copy.worker, copy.chunk_id) == (first.output, [5, 6, 2], "w", 0)
    engine.dispose()


def test_a_fatal_generator_error_fails_the_chunk_at_once(sqlite_url: str) -> None:
    engine, sessions, run_id = _fake_run(sqlite_url)
    gen = FakeGenerator(fail=FatalChunkError("adapter 'a' does not fit"))
    assert process_chunk(sessions, gen, run_id, 0, worker="w", max_attempts=3) is Processed.FAILED
    assert _chunk(sessions, run_id) == ("failed", 1, "adapter 'a' does not fit")
    engine.dispose()


def test_any_other_generator_error_is_counted_and_retried_up_to_max_attempts(sqlite_url: str) -> None:
    engine, sessions, run_id = _fake_run(sqlite_url)
    gen = FakeGenerator(fail=RuntimeError("CUDA out of memory"))
    assert process_chunk(sessions, gen, run_id, 0, worker="w", max_attempts=2) is Processed.RETRY
    assert _chunk(sessions, run_id) == ("queued", 1, "RuntimeError: CUDA out of memory")
    assert process_chunk(sessions, gen, run_id, 0, worker="w", max_attempts=2) is Processed.FAILED
    assert _chunk(sessions, run_id)[:2] == ("failed", 2)
    engine.dispose()


@pytest.mark.parametrize("fault", [RetryableChunkError("broker away"),
                                   OperationalError("SELECT 1", {}, Exception("connection refused"))],
                         ids=["retryable", "transient-db"])
def test_a_passing_fault_asks_for_the_message_again(sqlite_url: str, fault: Exception) -> None:
    engine, sessions, run_id = _fake_run(sqlite_url)
    with pytest.raises(RetryableChunkError):
        process_chunk(sessions, FakeGenerator(fail=fault), run_id, 0, worker="w", max_attempts=3)
    assert _chunk(sessions, run_id) == ("running", 1, None)  # claimed; the message comes back, or the claim expires
    assert process_chunk(sessions, FakeGenerator(), run_id, 0, worker="w", max_attempts=3) is Processed.DONE
    engine.dispose()


@pytest.mark.parametrize("step", ["worker.chunk.chunk_prompts", "worker.chunk.run_variants",
                                  "worker.chunk.done_pairs", "worker.planner.score", "worker.chunk._row"])
def test_an_unexpected_error_after_the_claim_fails_the_chunk_with_its_reason(
    any_db_url: str, step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the chunk's examples, its variants, its done rows, scoring, building rows: whatever
    breaks, the chunk ends `failed` with the reason (never `queued` or `running` for ever)."""
    engine, sessions, run_id = _fake_run(any_db_url)

    def broken(*_: Any, **__: Any) -> Any:
        raise KeyError("a surprise")

    monkeypatch.setattr(step, broken)
    assert process_chunk(sessions, FakeGenerator(), run_id, 0, worker="w", max_attempts=3) is Processed.FAILED
    status, attempts, error = _chunk(sessions, run_id)
    assert (status, attempts) == ("failed", 1) and error is not None and "KeyError: 'a surprise'" in error
    with sessions() as session:
        run = get_run(session, run_id)
        assert run is not None and run.status == "failed"
    engine.dispose()


# --- an adapter overwritten after submit, on a real model host (a tiny model made here) -------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny random Llama, a LoRA adapter for it, and another with the same shapes but other weights."""
    from tests.tiny_models import ADAPTERS, make_adapter, make_model

    root = tmp_path_factory.mktemp("tiny")
    base = make_model("llama", root / "base")
    return (base, make_adapter(base, "llama", ADAPTERS["r1"], root / "a", seed=1),
            make_adapter(base, "llama", ADAPTERS["r1"], root / "other", seed=2))


def test_an_adapter_overwritten_between_two_chunks_fails_the_second_and_keeps_the_first(
    any_db_url: str, tmp_path: Path, tiny_llama: tuple[Path, Path, Path]
) -> None:
    """Once it completed with rows of two adapter versions, unreported. Now the worker's hash of the files it
    loads is held to the one recorded at submit: chunk 1 fails in one attempt, naming both, and the run fails."""
    base, made, other = tiny_llama
    folder = shutil.copytree(made, tmp_path / "a")
    recorded = inspect_adapter("a", folder).sha256
    stored = {"name": "tiny", "model": {"base": str(base), "adapters": {"a": str(folder)}, "dtype": "float32"},
              "dataset": {"path": "d.jsonl", "prompt": "{{ q }}"}, "generation": {"max_new_tokens": 4}}
    engine = make_engine(any_db_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        run_id = create_run(session, name="tiny", config=stored, config_path=None, base_model=str(base),
                            dataset_path="d.jsonl", dataset_sha256="0" * 64,
                            variants=[NewVariant("base", None, None), NewVariant("a", str(folder), recorded)],
                            examples=[NewExample(i, {"q": i}, f"the quick fox {i}", None) for i in range(2)],
                            chunk_size=1).id
    host = ModelHost(Settings.from_env(), device="cpu")
    assert process_chunk(sessions, host, run_id, 0, worker="w", max_attempts=3) is Processed.DONE
    shutil.copyfile(other / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS)  # the same folder, other weights
    found = inspect_adapter("a", folder).sha256
    assert found != recorded
    assert process_chunk(sessions, host, run_id, 1, worker="w", max_attempts=3) is Processed.FAILED
    with sessions() as session:
        chunks = {c.id: c for c in session.scalars(select(Chunk).where(Chunk.run_id == run_id))}
        assert (chunks[0].status, chunks[1].status, chunks[1].attempts) == ("done", "failed", 1)
        error = chunks[1].error
        assert error is not None and f"adapter 'a' ({folder})" in error and recorded in error and found in error
        assert "restore the adapter's files" in error
        kept = session.scalars(select(Generation).where(Generation.run_id == run_id)).all()
        assert sorted((g.chunk_id, g.example_idx, g.variant) for g in kept) == [(0, 0, "a"), (0, 0, "base")]
        assert {g.adapter_hash for g in kept if g.variant == "a"} == {recorded}
        run = get_run(session, run_id)
        assert run is not None and run.status == "failed"
    engine.dispose()
