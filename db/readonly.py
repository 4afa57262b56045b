"""Read-only SQL for users: `lora-compare sql`.

SQLite files are opened in read-only mode (`mode=ro`) with `query_only`; PostgreSQL queries run in
a `READ ONLY` transaction with a statement timeout. Either way a write is refused by the database
itself, not by inspecting the query text.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from .engine import make_engine, normalize_url

#: Statement timeout for user queries on PostgreSQL, in milliseconds.
STATEMENT_TIMEOUT_MS = 60_000


class QueryError(Exception):
    """The query failed or tried to write; the message is the database's, on one line."""


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def run_readonly(url: str, query: str) -> QueryResult:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite(url, query)
    return _postgres(url, query)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _sqlite(url: str, query: str) -> QueryResult:
    path = make_url(url).database
    if not path or path == ":memory:":
        raise QueryError("an in-memory SQLite database has nothing to query")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as err:
        raise QueryError(f"cannot open {path}: {_one_line(err)}") from err
    try:
        conn.execute("PRAGMA query_only=ON")
        cursor = conn.execute(query)
        columns = [d[0] for d in cursor.description or []]
        rows = [tuple(r) for r in cursor.fetchall()]
    except sqlite3.Error as err:  # sqlite3.Warning covers several statements in one call
        raise QueryError(_one_line(err)) from err
    except sqlite3.Warning as err:
        raise QueryError(_one_line(err)) from err
    finally:
        conn.rollback()
        conn.close()
    return QueryResult(columns, rows)


def _postgres(url: str, query: str) -> QueryResult:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SET TRANSACTION READ ONLY"))
            conn.execute(text(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}"))
            result = conn.exec_driver_sql(query)
            columns = list(result.keys()) if result.returns_rows else []
            rows = [tuple(r) for r in result.fetchall()] if result.returns_rows else []
            conn.rollback()
    except DBAPIError as err:
        raise QueryError(_one_line(err.orig) if err.orig else _one_line(err)) from err
    finally:
        engine.dispose()
    return QueryResult(columns, rows)
