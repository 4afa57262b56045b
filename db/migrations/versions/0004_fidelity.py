"""fidelity: where and how each chunk was generated, the generated token ids, verifications

- `chunks.device`, `chunks.dtype`: where a chunk ran and the weights' dtype as resolved, so that
  `verify` regenerates on the same device and dtype;
- `chunks.engine`: the exact fallback a chunk took instead of the fast path, and why (null: fast path);
- `generations.output_ids`: the generated token ids, so `verify` finds the first differing token;
- `verifications`: one row per (verify call, variant): rows sampled, rows plain PEFT reproduced.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(sa.Column("device", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("dtype", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("engine", sa.Text(), nullable=True))
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("output_ids", sa.JSON(), nullable=True))
    op.create_table(
        "verifications",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("variant", sa.String(length=200), nullable=False),
        sa.Column("sampled", sa.Integer(), nullable=False),
        sa.Column("agreed", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("dtype", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_verifications_run_id", "verifications", ["run_id"])


def downgrade() -> None:
    op.drop_index("ix_verifications_run_id", table_name="verifications")
    op.drop_table("verifications")
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("output_ids")
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("engine")
        batch.drop_column("dtype")
        batch.drop_column("device")
