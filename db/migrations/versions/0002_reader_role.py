"""a read-only role for user SQL on PostgreSQL

`lora-compare sql` runs user queries in a READ ONLY transaction. That alone still lets a superuser
connection write server files (`COPY ... TO '/file'`) or read them (`pg_read_file`), so user
queries also switch to this role, which can only SELECT. Creating a role needs CREATEROLE; without
it the migration says so and `sql` falls back to the read-only transaction alone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

READER_ROLE = "lora_compare_reader"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
DO $$
BEGIN
  BEGIN
    CREATE ROLE {READER_ROLE} NOLOGIN;
  EXCEPTION
    WHEN duplicate_object THEN NULL;
    WHEN unique_violation THEN NULL;
    WHEN insufficient_privilege THEN
      RAISE NOTICE 'no CREATEROLE: lora-compare sql runs without a dedicated read-only role';
      RETURN;
  END;
  EXECUTE format('GRANT USAGE ON SCHEMA public TO {READER_ROLE}');
  EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READER_ROLE}');
  EXECUTE format('ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {READER_ROLE}');
  BEGIN
    EXECUTE format('GRANT {READER_ROLE} TO %I', current_user);
  EXCEPTION WHEN OTHERS THEN NULL;
  END;
END
$$;
""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"""
DO $$
BEGIN
  EXECUTE format('REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM {READER_ROLE}');
EXCEPTION WHEN undefined_object THEN NULL;
END
$$;
""")
