"""The schema, migrations, idempotent writes, state transitions and read-only SQL, on both backends."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, select, text

from db.engine import make_engine, session_factory
from db.migrate import current_revision, head_revision, upgrade
from db.outputs import NewGeneration, done_pairs, insert_generations, side_by_side, variant_summary
from db.progress import run_progress
from db.readonly import QueryError, run_readonly
from db.runs import (
    NewExample,
    NewVariant,
    cancel_run,
    chunk_bounds,
    claim_chunk,
    complete_chunk,
    create_run,
    fail_chunk,
    get_run,
    requeue_run,
)
from db.schema import Chunk, Generation
from db.views import VIEW_COLUMNS


def _setup(url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(url)
    upgrade(engine)
    return engine, session_factory(engine)


def _new_run(sessions, n: int = 5, chunk_size: int = 2) -> int:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        run = create_run(
            session, name="t", config={"x": 1}, config_path=None, base_model="demo", dataset_path="d.jsonl",
            dataset_sha256="0" * 64,
            variants=[NewVariant("base", None, None), NewVariant("ad", "/a", "f" * 64)],
            examples=[NewExample(i, {"i": i}, f"p{i}", str(i) if i % 2 == 0 else None) for i in range(n)],
            chunk_size=chunk_size,
        )
        return run.id


def _gen(run_id: int, idx: int, variant: str, output: str, correct: bool | None) -> NewGeneration:
    return NewGeneration(
        run_id=run_id, example_idx=idx, variant=variant, chunk_id=idx // 2, output=output,
        prediction=output, correct=correct, prompt_tokens=3, output_tokens=2, finish_reason="eos",
        base_model_hash="b" * 64, adapter_hash=None if variant == "base" else "f" * 64, worker="w",
    )


def test_chunk_bounds() -> None:
    assert chunk_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(4, 4) == [(0, 4)]


def test_migrations_create_tables_and_stable_views(any_db_url: str) -> None:
    engine, _ = _setup(any_db_url)
    assert current_revision(engine) == head_revision()
    upgrade(engine)  # a second upgrade is a no-op
    names = set(inspect(engine).get_table_names())
    assert {"runs", "variants", "examples", "chunks", "generations"} <= names
    with engine.connect() as conn:
        for view, columns in VIEW_COLUMNS.items():
            assert list(conn.execute(text(f"SELECT * FROM {view}")).keys()) == columns


def test_outputs_are_written_once_per_run_example_variant(any_db_url: str) -> None:
    _, sessions = _setup(any_db_url)
    run_id = _new_run(sessions)
    with sessions.begin() as session:
        assert insert_generations(session, [_gen(run_id, 0, "base", "a", True), _gen(run_id, 0, "ad", "b", False)]) == 2
    with sessions.begin() as session:  # a redelivered chunk writes the same rows again
        again = [_gen(run_id, 0, "base", "X", True), _gen(run_id, 1, "base", "c", None)]
        assert insert_generations(session, again) == 1
    with sessions() as session:
        rows = session.execute(select(Generation.example_idx, Generation.variant, Generation.output)).all()
        assert sorted(rows) == [(0, "ad", "b"), (0, "base", "a"), (1, "base", "c")]
        assert done_pairs(session, run_id, 0, 2) == {(0, "base"), (0, "ad"), (1, "base")}
        summary = {s.variant: s for s in variant_summary(session, run_id)}
        assert summary["base"].rows == 2 and summary["base"].correct == 1 and summary["base"].scored == 1
        assert summary["ad"].differs_from_base == 1
        assert side_by_side(session, run_id)[0]["variants"]["ad"]["output"] == "b"
    with sessions() as session:
        comparison = session.execute(text("SELECT variant, base_output, output, base_correct, correct "
                                          "FROM comparisons")).all()
        assert [tuple(r) for r in comparison] == [("ad", "a", "b", True, False)]


def test_chunk_lifecycle_and_run_completion(any_db_url: str) -> None:
    _, sessions = _setup(any_db_url)
    run_id = _new_run(sessions, n=5, chunk_size=2)
    with sessions.begin() as session:
        claim = claim_chunk(session, run_id, 0, worker="w", max_attempts=2)
        assert claim is not None and (claim.start_idx, claim.end_idx, claim.attempt) == (0, 2, 1)
        assert get_run(session, run_id).status == "running"  # type: ignore[union-attr]
        complete_chunk(session, run_id, 0, generate_seconds=1.0)
    with sessions.begin() as session:
        assert claim_chunk(session, run_id, 0, worker="w", max_attempts=2) is None  # done: a redelivery is skipped
        assert claim_chunk(session, run_id, 1, worker="w", max_attempts=2) is not None
        fail_chunk(session, run_id, 1, error="boom", final=False)  # back to queued
        assert claim_chunk(session, run_id, 1, worker="w", max_attempts=2) is not None
        fail_chunk(session, run_id, 1, error="boom again", final=False)
        assert claim_chunk(session, run_id, 1, worker="w", max_attempts=2) is None  # attempts used up: failed
        assert claim_chunk(session, run_id, 2, worker="w", max_attempts=2) is not None
        complete_chunk(session, run_id, 2, generate_seconds=1.0)
        run = get_run(session, run_id)
        assert run.status == "failed" and "chunk(s) 1 failed" in run.error and "boom again" in run.error  # type: ignore
    with sessions() as session:
        progress = run_progress(session, run_id)
        assert progress.chunks == {"done": 2, "failed": 1} and progress.rows_total == 10  # type: ignore[union-attr]
        assert progress.failed_chunks[0].chunk == 1  # type: ignore[union-attr]
        assert progress.to_json()["failed_chunks"][0]["chunk"] == 1  # type: ignore[union-attr]
    with sessions.begin() as session:
        assert requeue_run(session, run_id) == [1]
        assert get_run(session, run_id).status == "running"  # type: ignore[union-attr]
        assert claim_chunk(session, run_id, 1, worker="w", max_attempts=2) is not None
        complete_chunk(session, run_id, 1, generate_seconds=1.0)
        assert get_run(session, run_id).status == "completed"  # type: ignore[union-attr]


def test_cancel_stops_queued_chunks(any_db_url: str) -> None:
    _, sessions = _setup(any_db_url)
    run_id = _new_run(sessions, n=6, chunk_size=2)
    with sessions.begin() as session:
        claim_chunk(session, run_id, 0, worker="w", max_attempts=3)
        assert cancel_run(session, run_id) == 2
        assert claim_chunk(session, run_id, 1, worker="w", max_attempts=3) is None
        assert get_run(session, run_id).status == "cancelled"  # type: ignore[union-attr]
        statuses = dict(session.execute(select(Chunk.id, Chunk.status).where(Chunk.run_id == run_id)).all())
        assert statuses == {0: "running", 1: "cancelled", 2: "cancelled"}
    with sessions.begin() as session:
        assert requeue_run(session, run_id) == [0, 1, 2]


def test_readonly_sql_reads_and_refuses_writes(any_db_url: str) -> None:
    engine, sessions = _setup(any_db_url)
    run_id = _new_run(sessions)
    result = run_readonly(any_db_url, "SELECT id, name FROM runs")
    assert result.columns == ["id", "name"] and result.rows == [(run_id, "t")]
    assert result.records() == [{"id": run_id, "name": "t"}]
    for statement in ("DELETE FROM runs", "UPDATE runs SET name = 'x'", "DROP TABLE generations",
                      "CREATE TABLE evil (x int)", "SELECT 1; DELETE FROM runs"):
        with pytest.raises(QueryError):
            run_readonly(any_db_url, statement)
    with pytest.raises(QueryError):
        run_readonly(any_db_url, "SELECT * FROM no_such_table")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM runs")).scalar_one() == "t"
        assert "evil" not in inspect(engine).get_table_names()
