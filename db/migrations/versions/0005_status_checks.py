"""CHECK constraints on run and chunk states and on finish reasons

The columns stay plain strings (the SQL surface of DESIGN.md does not change); the database now
refuses a value outside each vocabulary. The value lists are frozen here, as they were when this
revision was written: they cover every value any version has written (the git history has no other
status, and no finish reason besides these; an early `error` finish reason was declared, never written).
Rows with any other value stop the upgrade with the offending values named, before anything changes.

SQLite cannot add a constraint to a table: `runs`, `chunks` and `generations` are rebuilt (batch
mode), which needs foreign keys off (dropping `runs` with them on would delete every child row:
`db.migrate.upgrade` turns them off around migrations) and the views dropped and created again
around it (SQLite checks views when a table is renamed).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RUN_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
CHUNK_STATUSES = ("queued", "running", "done", "failed", "cancelled")
FINISH_REASONS = ("eos", "stop", "length", "empty_prompt", "prompt_too_long")

#: (table, constraint, column, allowed values)
CHECKS = (
    ("runs", "ck_runs_status", "status", RUN_STATUSES),
    ("chunks", "ck_chunks_status", "status", CHUNK_STATUSES),
    ("generations", "ck_generations_finish_reason", "finish_reason", FINISH_REASONS),
)

# The public views as of this revision (unchanged since 0001), frozen here; SQLite only.
OUTPUTS_VIEW = """
CREATE VIEW outputs AS
SELECT g.run_id, g.example_idx, g.variant, e.prompt, e.reference, g.output, g.prediction,
       g.correct, g.output_tokens, g.finish_reason
FROM generations g
JOIN examples e ON e.run_id = g.run_id AND e.idx = g.example_idx
"""

COMPARISONS_VIEW = """
CREATE VIEW comparisons AS
SELECT a.run_id, a.example_idx, a.variant, e.prompt, e.reference,
       b.output AS base_output, a.output, b.prediction AS base_prediction, a.prediction,
       b.correct AS base_correct, a.correct
FROM generations a
JOIN generations b ON b.run_id = a.run_id AND b.example_idx = a.example_idx AND b.variant = 'base'
JOIN examples e ON e.run_id = a.run_id AND e.idx = a.example_idx
WHERE a.variant <> 'base'
"""


def _condition(column: str, values: Sequence[str]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _refuse_unknown_values() -> None:
    bind = op.get_bind()
    for table, _name, column, values in CHECKS:
        found = bind.execute(sa.text(f"SELECT DISTINCT {column} FROM {table} WHERE NOT ({_condition(column, values)})"))
        unknown = sorted(str(v) for (v,) in found)
        if unknown:
            raise RuntimeError(f"{table}.{column} holds {', '.join(map(repr, unknown))}, outside "
                               f"{', '.join(values)}: correct those rows before upgrading")


def _sqlite_rebuild(add: bool) -> None:
    bind = op.get_bind()
    if bind.exec_driver_sql("PRAGMA foreign_keys").scalar() and bind.execute(sa.text("SELECT 1 FROM runs")).first():
        raise RuntimeError("rebuilding `runs` on SQLite with foreign keys on would delete every run's rows: "
                           "migrate with them off (`lora-compare db upgrade` does)")
    op.execute("DROP VIEW comparisons")
    op.execute("DROP VIEW outputs")
    for table, name, column, values in CHECKS:
        with op.batch_alter_table(table, recreate="always") as batch:
            if add:
                batch.create_check_constraint(name, _condition(column, values))
            else:
                batch.drop_constraint(name, type_="check")
    op.execute(OUTPUTS_VIEW)
    op.execute(COMPARISONS_VIEW)


def upgrade() -> None:
    _refuse_unknown_values()
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_rebuild(add=True)
        return
    for table, name, column, values in CHECKS:
        op.create_check_constraint(name, table, _condition(column, values))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_rebuild(add=False)
        return
    for table, name, _column, _values in CHECKS:
        op.drop_constraint(name, table, type_="check")
