"""generation cache index: one entry per reusable output, in id order within a key

`ix_generations_cache_key` was `(cache_key)` over every row. It becomes `(cache_key, id)` over the
rows the cache can reuse from (`reused_from IS NULL AND cache_key IS NOT NULL`: generated outputs
with a key; copies and sampled rows are never looked up). The lookup (db.outputs.cached_outputs)
asks, for each key, for its first such row in id order: with this index that is one index entry per
key whatever the table's size or statistics. With the old one, on a table never analysed (a fresh
database, before autovacuum's first pass) PostgreSQL chose a scan of the whole table, about 3 s of
server CPU per chunk once a few hundred thousand rows were in (bench/README.md). Copies and sampled
rows no longer add an index entry each on insert.

Dropping and creating an index rebuilds nothing else: the views and foreign keys are untouched on
SQLite. On PostgreSQL the new index is built in the migration's transaction (writes to `generations`
wait for it: a second or so per million rows).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The rows the generation cache reuses from, as db.schema.CACHE_SOURCES says (frozen here).
SOURCES = "reused_from IS NULL AND cache_key IS NOT NULL"


def upgrade() -> None:
    op.drop_index("ix_generations_cache_key", table_name="generations")
    op.create_index("ix_generations_cache_key", "generations", ["cache_key", "id"],
                    postgresql_where=sa.text(SOURCES), sqlite_where=sa.text(SOURCES))


def downgrade() -> None:
    op.drop_index("ix_generations_cache_key", table_name="generations")
    op.create_index("ix_generations_cache_key", "generations", ["cache_key"])
