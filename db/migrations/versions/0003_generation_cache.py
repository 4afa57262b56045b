"""generation cache: a key per output, and where a reused output came from

An output is fully determined by (base model hash, adapter hash or none, exact prompt tokens,
generation settings) when decoding is greedy; `cache_key` is the hash of those, so a later run can
reuse it instead of generating again (`reused_from` names the row it copied).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("cache_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("reused_from", sa.Integer(), nullable=True))
        batch.create_index("ix_generations_cache_key", ["cache_key"])


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_index("ix_generations_cache_key")
        batch.drop_column("reused_from")
        batch.drop_column("cache_key")
