"""The one place that creates engines and session factories.

Call `make_engine` after any fork (a Celery worker process creates its own, at start, never at import).

Every PostgreSQL connection is bounded in time, so a database that stops answering (a network cut that
keeps the connection open, a stuck server) surfaces as an `OperationalError` instead of a hang: libpq's
connect timeout and TCP keepalives / user timeout (which catch a dead peer on a real network), and a
client-side limit on every wait for a reply (which also catches a peer whose TCP stack still answers,
such as a proxy that stopped forwarding). A worker's sessions also carry a server-side statement timeout.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

#: Seconds an SQLite writer waits for another writer's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 60
#: Seconds libpq waits to open a connection (TCP connect plus the startup exchange).
PG_CONNECT_TIMEOUT_S = 5
#: TCP keepalives on every PostgreSQL connection: the first probe after this many idle seconds...
PG_KEEPALIVES_IDLE_S = 10
#: ...then one probe every this many seconds...
PG_KEEPALIVES_INTERVAL_S = 3
#: ...and the connection is dropped after this many unanswered probes (a dead idle link: about 19 s).
PG_KEEPALIVES_COUNT = 3
#: Milliseconds sent data may stay unacknowledged before the kernel drops the connection (a dead link
#: while a query is being sent).
PG_TCP_USER_TIMEOUT_MS = 15_000
#: Seconds a command-line connection waits for any one reply (a query's whole answer, a commit) before
#: the connection is closed as dead: `status` and the other reading commands answer or fail within it.
CLI_REPLY_TIMEOUT_S = 10.0
#: The same limit for a worker's connections: a silent cut surfaces within it (then the worker's logged
#: write-retry path runs, holding the generated rows in memory).
WORKER_REPLY_TIMEOUT_S = 15.0
#: Server-side statement timeout of a worker's sessions, in seconds: shorter than the reply limit, so a
#: statement stuck in the server (a lock) is cancelled cleanly before the client gives up on the link.
WORKER_STATEMENT_TIMEOUT_S = 10
#: The reply limit while migrations run (they may rewrite large tables, or queue on another process's
#: migration lock): long, but still a bound.
MIGRATION_REPLY_TIMEOUT_S = 900.0


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://` (and `postgres://`) URLs and use the psycopg 3 driver for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, reply_timeout_s: float | None = CLI_REPLY_TIMEOUT_S,
                statement_timeout_s: float | None = None, **kwargs: object) -> Engine:
    """An engine for `url`; SQLite files get WAL, foreign keys and a busy timeout; PostgreSQL gets the
    connection timeouts above, `reply_timeout_s` (None: wait for ever) and, if given, a statement timeout."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            **kwargs,  # type: ignore[arg-type]
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    connect_args: dict[str, Any] = {
        "connect_timeout": PG_CONNECT_TIMEOUT_S,
        "keepalives": 1,
        "keepalives_idle": PG_KEEPALIVES_IDLE_S,
        "keepalives_interval": PG_KEEPALIVES_INTERVAL_S,
        "keepalives_count": PG_KEEPALIVES_COUNT,
        "tcp_user_timeout": PG_TCP_USER_TIMEOUT_MS,
    }
    if statement_timeout_s is not None:
        connect_args["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)  # type: ignore[arg-type]
    if reply_timeout_s is not None:
        _bound_replies(engine, reply_timeout_s)
    return engine


def _bound_replies(engine: Engine, timeout_s: float) -> None:
    """Open the engine's psycopg connections as `_BoundedConnection`s waiting at most `timeout_s` per reply."""
    import psycopg

    # Connection.wait takes a timeout from psycopg 3.2 on; an older psycopg keeps only the TCP bounds.
    if "timeout" not in inspect.signature(psycopg.Connection.wait).parameters:
        return
    bounded = _bounded_connection_class(timeout_s)

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        return bounded.connect(*cargs, **cparams)


def _bounded_connection_class(timeout_s: float) -> Any:
    import psycopg

    wait_timeout = getattr(psycopg.errors, "_WaitTimeout", psycopg.errors.OperationalError)

    class _BoundedConnection(psycopg.Connection):  # type: ignore[type-arg]
        """A psycopg connection whose every wait for the server has a deadline: past it the connection
        is closed (its state is unknown) and an OperationalError says so."""

        reply_timeout_s = timeout_s

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            if timeout is not None:  # psycopg's own bounded waits (cancel, notifies) keep theirs
                return super().wait(gen, interval, timeout)
            limit = self.reply_timeout_s
            try:
                return super().wait(gen, interval, limit)
            except wait_timeout as err:
                self.pgconn.finish()
                raise psycopg.OperationalError(
                    f"the database sent no answer for {limit:g} s (a network cut or a stuck server); "
                    "the connection was closed") from err

    return _BoundedConnection


@contextmanager
def reply_timeout(connection: Connection, timeout_s: float) -> Iterator[None]:
    """Within the block, `connection` waits up to `timeout_s` per reply (no-op on SQLite)."""
    dbapi = connection.connection.dbapi_connection
    before = getattr(dbapi, "reply_timeout_s", None)
    if before is None:
        yield
        return
    dbapi.reply_timeout_s = timeout_s  # type: ignore[union-attr]
    try:
        yield
    finally:
        dbapi.reply_timeout_s = before  # type: ignore[union-attr]


def _sqlite_on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    if not _is_memory(dbapi_connection):
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.close()


def _is_memory(dbapi_connection) -> bool:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    try:
        rows = cursor.execute("PRAGMA database_list").fetchall()
    finally:
        cursor.close()
    return any(row[1] == "main" and not row[2] for row in rows)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (results are read after the transaction)."""
    return sessionmaker(engine, expire_on_commit=False)
