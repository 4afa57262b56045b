"""Schema migrations (Alembic), applied programmatically: `lora-compare db upgrade`."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from .engine import MIGRATION_REPLY_TIMEOUT_S, reply_timeout

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
        with (engine.connect() as conn, reply_timeout(conn, MIGRATION_REPLY_TIMEOUT_S), _sqlite_foreign_keys_off(conn),
              conn.begin()):
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            if MigrationContext.configure(conn).get_current_revision() != head:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                _check_foreign_keys(conn)
    except (OperationalError, IntegrityError):
        if current_revision(engine) != head:
            raise
    log.info("database schema at %s", head)
    return head


@contextmanager
def _sqlite_foreign_keys_off(conn: Connection) -> Iterator[None]:
    """SQLite rebuilds a table to alter it (drop, then rename a copy); with foreign keys on, dropping
    `runs` would delete every child row. So migrations run with them off, as SQLite's documentation
    prescribes, and `_check_foreign_keys` checks the result before commit. The pragma is a no-op inside
    a transaction: it is set before the migration's transaction begins, and restored after it ends."""
    if conn.dialect.name != "sqlite":
        yield
        return
    conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
    conn.commit()  # ends the transaction SQLAlchemy began for the pragma (no SQL transaction was open)
    try:
        yield
    finally:
        conn.exec_driver_sql("PRAGMA foreign_keys=ON")
        conn.commit()


def _check_foreign_keys(conn: Connection) -> None:
    if conn.dialect.name == "sqlite":
        broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
        if broken:
            raise RuntimeError(f"a migration left rows whose foreign keys point nowhere: {broken[:5]}")
