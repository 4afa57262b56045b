"""The chunk's SQL is set-based: the statements a chunk costs do not grow with its rows (no per-row
database round trip), and PostgreSQL's one-statement insert stores exactly what the ORM's executemany did."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.dialects import postgresql

from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.outputs import NewGeneration, insert_generations
from db.runs import NewExample, NewVariant, create_run
from db.schema import Generation
from tests.fake_generator import FakeGenerator, fake_adapter_hash
from worker.chunk import Processed, process_chunk

STORED = {"name": "count", "model": {"base": "demo", "adapters": {"a": "/a", "b": "/b", "c": "/c"}},
          "dataset": {"path": "d.jsonl", "prompt": "{{ q }}"}, "generation": {"max_new_tokens": 4}}
VARIANTS = [NewVariant("base", None, None)] + [NewVariant(v, f"/{v}", fake_adapter_hash(v)) for v in "abc"]


def _statements(engine: Engine) -> list[tuple[str, bool]]:
    seen: list[tuple[str, bool]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _count(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, executemany: bool) -> None:
        seen.append((" ".join(statement.split()[:3]), executemany))

    return seen


def _statements_per_chunk(url: str, size: int, prefix: str) -> list[tuple[str, bool]]:
    """The statements of each of a run's chunks (two chunks of `size` examples x 4 variants), then of
    the same prompts again in a second run (every row then comes from the generation cache)."""
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    runs = []
    with sessions.begin() as session:
        for _ in range(2):
            runs.append(create_run(session, name="count", config=STORED, config_path=None, base_model="demo",
                                   dataset_path="d.jsonl", dataset_sha256="0" * 64, variants=VARIANTS,
                                   examples=[NewExample(i, {"q": i}, f"{prefix}{i}", None) for i in range(2 * size)],
                                   chunk_size=size).id)
    seen = _statements(engine)
    gen = FakeGenerator()
    counts = []
    for run_id in runs:
        for chunk_id in (0, 1):
            seen.clear()
            assert process_chunk(sessions, gen, run_id, chunk_id, worker="w", max_attempts=3) is Processed.DONE
            counts.append(list(seen))
    assert len(gen.generated) == 2  # the second run reused every row
    engine.dispose()
    return counts  # type: ignore[return-value]


def test_a_chunk_costs_the_same_statements_whatever_its_size(pg_url: str) -> None:
    small = _statements_per_chunk(pg_url, 3, "p")
    large = _statements_per_chunk(pg_url, 300, "q")  # 1,200 rows: past any batching of 500 or 1,000
    for few, many in zip(small, large):
        assert few == many
        assert not any(executemany for _, executemany in many)  # no executemany: one statement each
        assert sum(statement.startswith("INSERT INTO generations") for statement, _ in many) == 1
    # measured 17 (19 for the chunk that settles the run); 15 and 18 before the chunk's history
    # (`chunk_attempts`) added its statements to the claim and the completion, 18 before the completion
    # found the run `hold_lease` had just locked instead of reading it again
    assert max(len(chunk) for chunk in large) <= 19


def test_sqlite_batches_a_chunk_s_rows_never_one_statement_a_row(sqlite_url: str) -> None:
    """SQLite (embedded mode) binds at most so many parameters per statement, so the insert and the
    cache lookup go in batches of hundreds of rows: 1,200 rows cost 3 statements more than 12."""
    small = _statements_per_chunk(sqlite_url, 3, "p")
    large = _statements_per_chunk(sqlite_url, 300, "q")
    for few, many in zip(small, large):
        assert len(many) - len(few) <= 1200 // 400


def _awkward_rows(run_id: int) -> list[NewGeneration]:
    outputs = ["", "héllo 'q' \"x\" \\ {a,b} NULL", "a\nb\tc", "🙂", "[1, 2]"]
    rows = []
    for i in range(60):
        k = i % 5
        for variant in ("base", "a"):
            rows.append(NewGeneration(
                run_id=run_id, example_idx=i, variant=variant, chunk_id=i // 30, output=outputs[k],
                prediction=[None, "1", "", "NULL", "x,y"][k], correct=[None, True, False, True, None][k],
                prompt_tokens=i, output_tokens=k, finish_reason=["eos", "length", "stop", "empty_prompt", "eos"][k],
                base_model_hash="b" * 64, adapter_hash=None if variant == "base" else "h" * 64,
                worker=[None, "w1"][k % 2], cache_key=[None, f"{i:064d}"][k % 2], reused_from=[None, 7][k % 2],
                output_ids=[None, [], [5, 6, 2], [1], [2**31 - 1, 0]][k]))
    return rows


def test_the_one_statement_insert_stores_what_the_executemany_stored(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        runs = [create_run(session, name="x", config={}, config_path=None, base_model="demo", dataset_path="d",
                           dataset_sha256="0" * 64,
                           variants=[NewVariant("base", None, None), NewVariant("a", "/a", "h")],
                           examples=[NewExample(i, {}, f"p{i}", None) for i in range(60)], chunk_size=30).id
                for _ in range(2)]
    table: Any = Generation.__table__
    before = postgresql.insert(table).on_conflict_do_nothing(index_elements=["run_id", "example_idx", "variant"])
    with sessions.begin() as session:  # what insert_generations ran before: an executemany of the Core insert
        session.connection().execute(before, [vars(row) for row in _awkward_rows(runs[0])])
    with sessions.begin() as session:
        assert insert_generations(session, _awkward_rows(runs[1])) == 120
    with sessions.begin() as session:
        assert insert_generations(session, _awkward_rows(runs[1])[:10]) == 0  # insert-or-ignore
    columns = ("example_idx, variant, chunk_id, output, prediction, correct, prompt_tokens, output_tokens, "
               "finish_reason, base_model_hash, adapter_hash, worker, cache_key, reused_from, output_ids::text, "
               "output_ids IS NULL, created_at IS NULL")
    with engine.connect() as conn:
        stored = [conn.execute(text(f"SELECT {columns} FROM generations WHERE run_id = :r ORDER BY id"), {"r": r}).all()
                  for r in runs]
    assert stored[0] == stored[1] and len(stored[0]) == 120
    assert stored[0][0][14] == "null" and stored[0][4][14] == "[5, 6, 2]"  # None is JSON null, as before
    engine.dispose()


def test_the_cache_lookup_finds_keys_of_any_characters_in_one_query(pg_url: str) -> None:
    """PostgreSQL's lookup sends the keys as one array literal: quotes, backslashes, commas and braces
    in a key must survive it (real keys are hex digests, but the function takes any text)."""
    from db.outputs import cached_outputs

    engine = make_engine(pg_url)
    upgrade(engine)
    sessions = session_factory(engine)
    with sessions.begin() as session:
        run_id = create_run(session, name="x", config={}, config_path=None, base_model="demo", dataset_path="d",
                            dataset_sha256="0" * 64, variants=[NewVariant("base", None, None)],
                            examples=[NewExample(i, {}, f"p{i}", None) for i in range(60)], chunk_size=60).id
        rows = [r for r in _awkward_rows(run_id) if r.variant == "base"]
        weird = ['a"b', "c\\d", "e,f", "{g}", "NULL", " h ", "é🙂"]
        rows = [NewGeneration(**{**r.__dict__, "cache_key": key, "reused_from": None})
                for r, key in zip(rows, weird)]
        insert_generations(session, rows)
    seen = _statements(engine)
    with sessions() as session:
        found = cached_outputs(session, [*weird, "absent", *[f"{i:064x}" for i in range(1200)]])
    assert sorted(found) == sorted(weird)
    assert len(seen) == 1  # one statement for 1,208 keys
    engine.dispose()


def test_the_cache_lookup_reads_the_index_on_a_table_never_analysed(pg_url: str) -> None:
    """A fresh database (no statistics yet: autovacuum has not passed) with many rows: the lookup of a
    chunk's 1,024 keys is planned on `ix_generations_cache_key`, one entry per key, never a scan of
    `generations` (the set form `cache_key = ANY(keys) ORDER BY id` was planned as one here: seconds of
    server CPU per chunk). It finds each key's first generated row by id, never a copy."""
    from db.outputs import cached_outputs

    engine = make_engine(pg_url)
    upgrade(engine)
    sessions = session_factory(engine)
    examples = 50_000
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE generations SET (autovacuum_enabled = false)"))  # stays never analysed
        run_id = conn.execute(text("INSERT INTO runs (name, status, config, base_model, dataset_path, dataset_sha256, "
                                   "n_examples, n_chunks, created_at) VALUES ('x', 'running', '{}', 'm', 'd', :h, "
                                   ":n, 1, now()) RETURNING id"), {"h": "0" * 64, "n": examples}).scalar_one()
        conn.execute(text("INSERT INTO examples (run_id, idx, chunk_id, data, prompt) "
                          "SELECT :r, i, 0, '{}', 'p' FROM generate_series(0, :n - 1) AS i"),
                     {"r": run_id, "n": examples})
        conn.execute(text(  # 200,000 outputs, keys 'k<idx>-<variant>', the last examples first (lower ids);
            # example 40,000's outputs are copies (reused_from) of example 7's, with lower ids than theirs
            "INSERT INTO generations (run_id, example_idx, variant, chunk_id, output, prompt_tokens, output_tokens, "
            "finish_reason, base_model_hash, cache_key, reused_from, created_at) "
            "SELECT :r, i, v, 0, 'out ' || i, 10, 2, 'eos', :h, "
            "'k' || (CASE WHEN i = 40000 THEN 7 ELSE i END) || '-' || v, CASE WHEN i = 40000 THEN 1 END, now() "
            "FROM generate_series(0, :n - 1) AS i, unnest(ARRAY['base', 'a', 'b', 'c']) AS v ORDER BY i DESC, v"),
            {"r": run_id, "n": examples, "h": "b" * 64})
        conn.execute(text(  # a second generated output of example 9's keys (a later run's), a higher id
            "INSERT INTO examples (run_id, idx, chunk_id, data, prompt) VALUES (:r, :n, 0, '{}', 'p')"),
            {"r": run_id, "n": examples})
        conn.execute(text(
            "INSERT INTO generations (run_id, example_idx, variant, chunk_id, output, prompt_tokens, output_tokens, "
            "finish_reason, base_model_hash, cache_key, created_at) "
            "VALUES (:r, :n, 'base', 0, 'later', 10, 1, 'eos', :h, 'k9-base', now())"),
            {"r": run_id, "n": examples, "h": "b" * 64})
        assert conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = 'generations'")).scalar() == -1

    keys = [f"k{i}-{v}" for i in range(1_000, 1_254) for v in ("base", "a", "b", "c")] + ["k7-a", "k9-base", "k-no"] * 2
    seen: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def _keep(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, params))

    with sessions() as session:
        found = cached_outputs(session, keys)
    event.remove(engine, "before_cursor_execute", _keep)
    assert len(seen) == 1 and len(found) == 1_018 and "k-no" not in found
    assert found["k9-base"].output == "out 9"  # the first generated row for a key, by id
    assert found["k7-a"].output == "out 7"  # not example 40,000's copy, with the same key and a lower id
    with engine.connect() as conn:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN ANALYZE {seen[0][0]}", seen[0][1]))
    assert "ix_generations_cache_key" in plan, plan
    assert "Seq Scan on generations" not in plan and "generations_pkey" not in plan and "JIT" not in plan, plan
    with engine.connect() as conn:  # still never analysed: the plan above was made without statistics
        assert conn.execute(text("SELECT reltuples FROM pg_class WHERE relname = 'generations'")).scalar() == -1
    engine.dispose()
