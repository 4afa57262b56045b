"""leases: a chunk's claim is a lease with a fencing token; a run remembers its queue

- `chunks.lease_token`: incremented at every claim (and when an expired lease is requeued); a
  worker's writes carry the token it claimed with and are refused once it has moved on;
- `chunks.lease_expires_at`: when the holder's lease runs out unless its heartbeat renews it;
- `chunks.heartbeat_at`: the holder's last renewal;
- `runs.queue`: the broker queue the run's chunks go to, so that a worker requeueing an expired
  lease sends the fresh message to the right queue (null: the default queue, or a run from before).

Adding nullable columns needs no table rebuild on SQLite (plain `ALTER TABLE ADD COLUMN`), so the
views and foreign keys are untouched. The downgrade uses `ALTER TABLE DROP COLUMN` (SQLite 3.35+).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("chunks", sa.Column("lease_token", sa.Integer(), nullable=True))
    op.add_column("chunks", sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("chunks", sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("runs", sa.Column("queue", sa.String(length=200), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "queue")
    op.drop_column("chunks", "heartbeat_at")
    op.drop_column("chunks", "lease_expires_at")
    op.drop_column("chunks", "lease_token")
