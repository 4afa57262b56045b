"""Schema migrations (Alembic), applied programmatically: `lora-compare db upgrade`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

if TYPE_CHECKING:  # alembic is imported when a migration check runs, not when the CLI starts
    from alembic.config import Config

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: PostgreSQL advisory lock that serialises concurrent migrations (an arbitrary constant).
_MIGRATION_LOCK_KEY = 7_412_367_001


def _config() -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Bring the database to the newest schema; a no-op when it is already there. Returns the revision.

    Safe when several processes start at once (workers on a fresh database): on PostgreSQL they
    queue on an advisory lock; on SQLite the loser of the race finds the schema already there.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    head = head_revision()
    if current_revision(engine) == head:
        return head
    cfg = _config()
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            if MigrationContext.configure(conn).get_current_revision() != head:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
    except (OperationalError, IntegrityError):
        if current_revision(engine) != head:
            raise
    log.info("database schema at %s", head)
    return head
