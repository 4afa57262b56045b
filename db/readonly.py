"""Read-only SQL for users: `lora-compare sql`.

SQLite files are opened in read-only mode (`mode=ro`) with `query_only`, and an authorizer allows
only reading: no ATTACH (which would create files), no VACUUM INTO, no pragma that sets anything,
one statement per call. PostgreSQL queries run in a `READ ONLY` transaction with a statement
timeout, one statement per call. Either way the database refuses a write, not a parser of ours.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from .engine import CLI_REPLY_TIMEOUT_S, make_engine, normalize_url

#: Default time limit of a user query, in seconds (PostgreSQL statement_timeout; SQLite progress check).
DEFAULT_TIMEOUT_S = 60.0
#: What the SQLite authorizer lets through: reading, functions, recursive CTEs.
_SQLITE_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33}  # 33: SQLITE_RECURSIVE
#: Pragmas that only describe the schema (allowed with an argument naming a table or index).
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
                 "database_list", "table_list", "collation_list", "function_list"}
#: The PostgreSQL role user queries run as (created by migration 0002 where the user may create roles).
READER_ROLE = "lora_compare_reader"
_REFUSED = "refused: lora-compare sql is read-only (only single SELECT-like statements run)"


class QueryError(Exception):
    """The query failed or tried to write; the message is the database's, on one line."""


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def run_readonly(url: str, query: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> QueryResult:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite(url, query, timeout_s)
    return _postgres(url, query, timeout_s)


def _authorize(action: int, arg1: str | None, arg2: str | None, _db: str | None, _trigger: str | None) -> int:
    if action in _SQLITE_ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1 in _READ_PRAGMAS and (arg2 is None or arg1 != "database_list"):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _query_error(message: str, timeout_s: float, *, refused: tuple[str, ...], timed_out: str) -> QueryError:
    """The database's own message, said plainly when it refused a write or stopped a long query."""
    if any(marker in message for marker in refused):
        return QueryError(f"{_REFUSED}: {message}")
    if timed_out in message:
        return QueryError(f"the query ran past its {timeout_s:g} s limit and was stopped")
    return QueryError(message)


def _sqlite(url: str, query: str, timeout_s: float) -> QueryResult:
    import time

    path = make_url(url).database
    if not path or path == ":memory:":
        raise QueryError("an in-memory SQLite database has nothing to query")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as err:
        raise QueryError(f"cannot open {path}: {_one_line(err)}") from err
    deadline = time.monotonic() + timeout_s
    try:
        conn.execute("PRAGMA query_only=ON")
        conn.set_authorizer(_authorize)
        conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)  # non-zero aborts
        cursor = conn.execute(query)
        columns = [d[0] for d in cursor.description or []]
        rows = [tuple(r) for r in cursor.fetchall()]
    except (sqlite3.Error, sqlite3.Warning) as err:  # several statements in one call raise ProgrammingError
        raise _query_error(_one_line(err), timeout_s, refused=("not authorized", "authorization denied", "readonly"),
                           timed_out="interrupted") from err
    finally:
        conn.rollback()
        conn.close()
    return QueryResult(columns, rows)


def _postgres(url: str, query: str, timeout_s: float) -> QueryResult:
    import psycopg  # here, not at import: the CLI starts without it

    engine = make_engine(url, reply_timeout_s=timeout_s + CLI_REPLY_TIMEOUT_S)  # the server stops it first
    try:
        with engine.connect() as conn:
            conn.execute(text("SET TRANSACTION READ ONLY"))
            conn.execute(text(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}"))
            if conn.execute(text("SELECT pg_has_role(current_user, :r, 'MEMBER') FROM pg_roles WHERE rolname = :r"),
                            {"r": READER_ROLE}).scalar():
                conn.execute(text(f"SET LOCAL ROLE {READER_ROLE}"))  # SELECT only: no COPY TO files
            # A prepared statement holds exactly one command: "SELECT 1; COMMIT; DELETE ..." is refused
            # before anything runs (sent plainly, psycopg would run all three, the last outside this
            # read-only transaction).
            cursor: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            cursor.execute(query, prepare=True)
            columns = [d.name for d in cursor.description] if cursor.description else []
            rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
            conn.rollback()
    except (DBAPIError, psycopg.Error) as err:
        message = _one_line(getattr(err, "orig", None) or err)
        raise _query_error(message, timeout_s, refused=("read-only transaction", "permission denied",
                                                        "must be superuser"), timed_out="statement timeout") from err
    finally:
        engine.dispose()
    return QueryResult(columns, rows)
