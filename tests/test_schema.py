"""The migrated schema is the schema the models declare, its CHECK constraints hold, and migrations
stand alone: on SQLite and PostgreSQL."""

from __future__ import annotations

import ast
from enum import Enum
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, Column, Engine, Integer, MetaData, inspect, text
from sqlalchemy.exc import IntegrityError

from db.engine import make_engine
from db.enums import AttemptOutcome, ChunkStatus, FinishReason, RunStatus
from db.migrate import MIGRATIONS_DIR, _config, current_revision, upgrade
from db.schema import Base
from db.views import VIEW_COLUMNS

#: (table, column, the values it may hold)
CHECKED: list[tuple[str, str, type[Enum]]] = [
    ("runs", "status", RunStatus),
    ("chunks", "status", ChunkStatus),
    ("generations", "finish_reason", FinishReason),
    ("chunk_attempts", "outcome", AttemptOutcome),
]


def _differences(engine: Engine, metadata: MetaData) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, metadata))


def test_models_and_migrated_schema_agree(any_db_url: str) -> None:
    engine = make_engine(any_db_url)
    upgrade(engine)
    # No known noise to filter on either backend: any difference at all is a model or a migration to fix.
    assert _differences(engine, Base.metadata) == []
    # The comparison sees differences (it is not vacuous): a column the database lacks is reported.
    extra = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(extra)
    extra.tables["runs"].append_column(Column("not_migrated", Integer))
    assert [d[0] for d in _differences(engine, extra)] == ["add_column"]  # type: ignore[index]
    # autogenerate does not compare CHECK constraints: compare their names directly.
    reflected = inspect(engine)
    for table in Base.metadata.sorted_tables:
        declared = {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
        assert {c["name"] for c in reflected.get_check_constraints(table.name)} == declared, table.name


def _insert_run(conn, *, status: str = "running", chunk: str = "done", finish: str = "eos") -> None:  # type: ignore[no-untyped-def]
    """One run with a variant, an example, a chunk and an output, in plain SQL (any revision since 0004)."""
    conn.execute(text("INSERT INTO runs (id, name, status, config, base_model, dataset_path, dataset_sha256, "
                      "n_examples, n_chunks, created_at) VALUES (1, 'r', :s, '{}', 'm', 'd', :h, 1, 1, :t)"),
                 {"s": status, "h": "0" * 64, "t": "2026-01-01 00:00:00"})
    conn.execute(text("INSERT INTO variants (run_id, name, position) VALUES (1, 'base', 0)"))
    conn.execute(text("INSERT INTO examples (run_id, idx, chunk_id, data, prompt) VALUES (1, 0, 0, '{}', 'p')"))
    conn.execute(text("INSERT INTO chunks (run_id, id, start_idx, end_idx, status, attempts, queued_at) "
                      "VALUES (1, 0, 0, 1, :s, 1, :t)"), {"s": chunk, "t": "2026-01-01 00:00:00"})
    conn.execute(text("INSERT INTO generations (run_id, example_idx, variant, chunk_id, output, prompt_tokens, "
                      "output_tokens, finish_reason, base_model_hash, created_at) "
                      "VALUES (1, 0, 'base', 0, 'o', 1, 1, :f, :h, :t)"),
                 {"f": finish, "h": "0" * 64, "t": "2026-01-01 00:00:00"})


def test_check_constraints_take_every_enum_value_and_refuse_others(any_db_url: str) -> None:
    engine = make_engine(any_db_url)
    upgrade(engine)
    with engine.begin() as conn:
        _insert_run(conn)
        conn.execute(text("INSERT INTO chunk_attempts (run_id, chunk_id, n, started_at, outcome) "
                          "VALUES (1, 0, 1, :t, 'running')"), {"t": "2026-01-01 00:00:00"})
    for table, column, values in CHECKED:
        with engine.begin() as conn:
            for value in values:
                conn.execute(text(f"UPDATE {table} SET {column} = :v"), {"v": value.value})
        with pytest.raises(IntegrityError, match="ck_|CHECK"), engine.begin() as conn:
            conn.execute(text(f"UPDATE {table} SET {column} = 'bogus'"))


def _at_0004(url: str) -> Engine:
    engine = make_engine(url)
    cfg = _config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    return engine


def test_0005_keeps_existing_rows(any_db_url: str) -> None:
    engine = _at_0004(any_db_url)
    with engine.begin() as conn:
        _insert_run(conn, status="completed", chunk="done", finish="prompt_too_long")
    upgrade(engine)
    with engine.connect() as conn:
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar()
                  for t in ("runs", "variants", "examples", "chunks", "generations")}
        assert counts == dict.fromkeys(counts, 1)
        for view, columns in VIEW_COLUMNS.items():  # rebuilt on SQLite
            assert list(conn.execute(text(f"SELECT * FROM {view}")).keys()) == columns
        assert conn.execute(text("SELECT finish_reason FROM outputs")).scalar() == "prompt_too_long"
        if engine.dialect.name == "sqlite":  # turned off for the rebuild, on again for everyone else
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
    with engine.begin() as conn:  # the foreign keys still cascade
        conn.execute(text("DELETE FROM runs"))
        assert conn.execute(text("SELECT count(*) FROM generations")).scalar() == 0


def test_0005_refuses_unknown_values_before_changing_anything(any_db_url: str) -> None:
    engine = _at_0004(any_db_url)
    with engine.begin() as conn:
        _insert_run(conn, status="paused")
    with pytest.raises(RuntimeError, match="runs.status holds 'paused'"):
        upgrade(engine)
    assert current_revision(engine) == "0004"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM runs")).scalar() == "paused"


def test_0005_on_sqlite_refuses_to_rebuild_with_foreign_keys_on(sqlite_url: str) -> None:
    """Dropping `runs` with foreign keys on would delete every child row: the migration refuses."""
    engine = _at_0004(sqlite_url)
    with engine.begin() as conn:
        _insert_run(conn)
    cfg = _config()
    with pytest.raises(RuntimeError, match="foreign keys on"), engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM generations")).scalar() == 1
    assert current_revision(engine) == "0004"


def test_migrations_import_no_live_code() -> None:
    """A migration that imports the application changes what it builds whenever the application changes."""
    ours = {"db", "contract", "producer", "worker"}
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path.name}: a relative import"
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ours, f"{path.name} imports {name}"
