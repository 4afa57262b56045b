"""Log-likelihood tasks' scores (`loglikelihoods`, migration 0008): writing them idempotently with their
chunk's outputs, and reading them back for reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from .schema import Example, Loglikelihood

_KEY = ["run_id", "example_idx", "variant", "choice_idx"]


@dataclass(frozen=True)
class NewScore:
    """One score to store: a choice of a run's example through one variant, or a whole document."""

    run_id: int
    example_idx: int
    variant: str
    choice_idx: int
    logprob: float
    tokens: int
    bytes: int
    chars: int
    words: int | None = None
    greedy: bool | None = None


_PG_COLUMNS = {"run_id": "integer", "example_idx": "integer", "variant": "varchar", "choice_idx": "integer",
               "logprob": "double precision", "tokens": "integer", "bytes": "integer", "chars": "integer",
               "words": "integer", "greedy": "boolean"}
_PG_INSERT = text(
    f"INSERT INTO loglikelihoods ({', '.join(_PG_COLUMNS)}) SELECT {', '.join(_PG_COLUMNS)} "
    f"FROM json_to_recordset(CAST(:rows AS json)) AS given({', '.join(f'{c} {t}' for c, t in _PG_COLUMNS.items())}) "
    f"ON CONFLICT ({', '.join(_KEY)}) DO NOTHING"
)


def insert_scores(session: Session, rows: Sequence[NewScore]) -> None:
    """Insert scores, ignoring any already stored (a redelivered chunk writes nothing twice): one
    statement on PostgreSQL (the rows as one JSON parameter), an executemany on SQLite. A float's JSON
    text is its shortest exact repr, so PostgreSQL stores the same double the worker computed."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.connection().execute(_PG_INSERT, {"rows": json.dumps([row.__dict__ for row in rows])})
        return
    table: Any = Loglikelihood.__table__
    stmt = sqlite.insert(table).on_conflict_do_nothing(index_elements=_KEY)
    session.connection().execute(stmt, [{f.name: getattr(row, f.name) for f in fields(NewScore)} for row in rows])


@dataclass(frozen=True)
class StoredScore:
    """One stored score with what a report needs of its example."""

    example_idx: int
    variant: str
    choice_idx: int
    logprob: float
    tokens: int
    bytes: int
    chars: int
    words: int | None
    greedy: bool | None


def run_scores(session: Session, run_id: int) -> list[StoredScore]:
    """Every score of a run, by example, variant and choice."""
    stmt = (select(Loglikelihood.example_idx, Loglikelihood.variant, Loglikelihood.choice_idx, Loglikelihood.logprob,
                   Loglikelihood.tokens, Loglikelihood.bytes, Loglikelihood.chars, Loglikelihood.words,
                   Loglikelihood.greedy)
            .where(Loglikelihood.run_id == run_id)
            .order_by(Loglikelihood.example_idx, Loglikelihood.variant, Loglikelihood.choice_idx))
    return [StoredScore(*row) for row in session.execute(stmt)]


def run_answers(session: Session, run_id: int) -> dict[int, tuple[list[str] | None, int | None]]:
    """Each example's choices and gold index (None, None outside `task: choice`)."""
    stmt = select(Example.idx, Example.choices, Example.answer_index).where(Example.run_id == run_id)
    return {idx: (choices, answer) for idx, choices, answer in session.execute(stmt)}
