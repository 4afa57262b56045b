"""chunk attempts: every claim of a chunk and how it ended, kept across `retry`

- `chunk_attempts`: one row per attempt at a chunk, (`run_id`, `chunk_id`, `n`) with `n` = 1, 2, 3...
  never reset; the claiming worker and its lease token, `started_at`, `ended_at`, the `outcome`
  (CHECK: the values below, frozen as they were when this revision was written) and the `error`.
  Its foreign key to `chunks` cascades, like every child of a run.

A new table: nothing else is rebuilt, so the views and the other tables are untouched on SQLite.
On PostgreSQL the reader role of 0002 reads it through its default privileges.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OUTCOMES = ("running", "done", "failed", "worker_lost", "refused", "cancelled", "handed_back")


def upgrade() -> None:
    op.create_table(
        "chunk_attempts",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("chunk_id", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("lease_token", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "chunk_id", "n"),
        sa.ForeignKeyConstraint(["run_id", "chunk_id"], ["chunks.run_id", "chunks.id"], ondelete="CASCADE",
                                name="fk_chunk_attempts_chunk"),
        sa.CheckConstraint(f"outcome IN ({', '.join(repr(v) for v in OUTCOMES)})", name="ck_chunk_attempts_outcome"),
    )


def downgrade() -> None:
    op.drop_table("chunk_attempts")
