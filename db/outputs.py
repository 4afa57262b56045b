"""Writing generations idempotently and reading outputs back."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from itertools import groupby
from operator import attrgetter
from typing import Any, TypedDict

from sqlalchemy import Select, String, and_, bindparam, case, func, select, text, true
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased

from .enums import BASE_VARIANT, FinishReason
from .schema import Example, Generation, Variant, utcnow

_UNIQUE = ["run_id", "example_idx", "variant"]


@dataclass(frozen=True)
class NewGeneration:
    """One output to store: a run's example through one variant."""

    run_id: int
    example_idx: int
    variant: str
    chunk_id: int
    output: str
    prediction: str | None
    correct: bool | None
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # a `FinishReason` value
    base_model_hash: str
    adapter_hash: str | None  # None for base rows
    worker: str | None = None
    cache_key: str | None = None  # None when sampling, or when the row was not generated
    reused_from: int | None = None  # the generation this output was copied from
    output_ids: list[int] | None = None  # the generated token ids (EOS included when hit)


@dataclass(frozen=True)
class CachedOutput:
    """An earlier generated output (not itself a copy) that a cache key already has."""

    id: int
    output: str
    output_tokens: int
    finish_reason: FinishReason
    output_ids: list[int] | None  # None: a row from before migration 0004, or one copied from such a row


@dataclass(frozen=True)
class VariantSummary:
    """One variant of a run: rows, rows with a score, rows correct, and how often it differs from base."""

    variant: str
    rows: int
    scored: int
    correct: int
    accuracy: float | None  # None: no row has a reference
    differs_from_base: int | None  # None for base itself
    mean_output_tokens: float | None


class VariantCell(TypedDict):
    """One variant's output of one example, in a side-by-side record."""

    output: str
    prediction: str | None
    correct: bool | None
    finish_reason: str
    output_tokens: int


class SideBySide(TypedDict):
    """One example with every variant's output. A dict (the JSON shape `lora-compare results` prints)."""

    example_idx: int
    prompt: str
    reference: str | None
    variants: dict[str, VariantCell]  # variant name -> its cell


def insert_generations(session: Session, rows: Sequence[NewGeneration]) -> int:
    """Insert rows, ignoring any whose (run, example, variant) already exists. Returns rows inserted.

    A redelivered chunk therefore never duplicates an output. One statement on PostgreSQL, whatever the
    number of rows (`_insert_pg`); SQLite gets an executemany.
    """
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return _insert_pg(session, rows)
    if dialect != "sqlite":  # pragma: no cover - only the two supported backends
        raise NotImplementedError(f"insert-or-ignore is not implemented for {dialect}")
    table: Any = Generation.__table__
    stmt: Any = sqlite.insert(table).on_conflict_do_nothing(index_elements=_UNIQUE)
    # RETURNING lists only the rows actually inserted (rowcount is unreliable for batched inserts).
    result = session.connection().execute(stmt.returning(table.c.id), [_values(row) for row in rows])
    return len(result.all())


def _values(row: NewGeneration) -> dict[str, Any]:
    return {f.name: getattr(row, f.name) for f in fields(NewGeneration)}  # shallow: no copy of output_ids


#: The columns every row of a chunk shares: `_insert_pg` sends them once, as parameters.
_PG_SHARED = {"run_id": "integer", "chunk_id": "integer", "worker": "varchar", "base_model_hash": "varchar"}
#: The columns that vary per row, in the order of each row's JSON array, with their SQL types.
_PG_ROW = {"example_idx": "integer", "variant": "varchar", "output": "text", "prediction": "text", "correct": "boolean",
           "prompt_tokens": "integer", "output_tokens": "integer", "finish_reason": "varchar",
           "adapter_hash": "varchar", "cache_key": "varchar", "reused_from": "integer", "output_ids": "json"}


def _pg_value(position: int, column: str, sql_type: str) -> str:
    """Column `column` of a row (`given`, a jsonb array), as SQL. `output_ids` is the JSON value itself,
    its text as PostgreSQL writes a jsonb array of ints: "[5, 6, 2]", as `json.dumps` wrote it when the
    rows went in as JSON text; a None is JSON `null`, as the ORM's JSON type stored it."""
    if column == "output_ids":
        return f"CAST(given -> {position} AS json)"
    return f"CAST(given ->> {position} AS {sql_type})"


_PG_INSERT = text(
    f"INSERT INTO generations ({', '.join([*_PG_SHARED, *_PG_ROW, 'created_at'])}) "
    f"SELECT {', '.join(f'CAST(:{c} AS {t})' for c, t in _PG_SHARED.items())}, "
    f"{', '.join(_pg_value(i, c, t) for i, (c, t) in enumerate(_PG_ROW.items()))}, CAST(:created_at AS timestamptz) "
    f"FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS given ON CONFLICT ({', '.join(_UNIQUE)}) DO NOTHING"
)
_shared_of = attrgetter(*_PG_SHARED)
_row_of = attrgetter(*_PG_ROW)
#: Compact JSON of the rows (`output_ids` is written anew by PostgreSQL: `_pg_value`).
_rows_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _insert_pg(session: Session, rows: Sequence[NewGeneration]) -> int:
    """All of a chunk's rows in one INSERT ... SELECT FROM jsonb_array_elements(the rows as one JSON
    parameter): one round trip and a short statement, where an executemany of 1,000 rows built a
    statement with 17,000 placeholders that the driver parsed anew every time (and one array per
    column costs the driver twice the CPU of one JSON text). Each row is a JSON array of the columns
    that vary (`_PG_ROW`); those a chunk's rows share (`_PG_SHARED`) and `created_at` are parameters,
    so a run of consecutive rows that share them is one statement (a chunk's rows: one). That halves
    the JSON both sides handle against one object per row with every column named.

    The stored values are the ones the ORM's executemany wrote (tests/test_write_path.py compares
    them): the same JSON text for `output_ids` (`_pg_value`), JSON `null` for None, `created_at` from
    `utcnow` (one value per statement)."""
    inserted = 0
    for shared, group in groupby(rows, key=_shared_of):
        params = dict(zip(_PG_SHARED, shared), created_at=utcnow().isoformat(),
                      rows=_rows_json(list(map(_row_of, group))))
        inserted += session.connection().execute(_PG_INSERT, params).rowcount
    return inserted


def done_pairs(session: Session, run_id: int, start_idx: int, end_idx: int) -> set[tuple[int, str]]:
    """The (example_idx, variant) pairs that already have an output in [start_idx, end_idx)."""
    stmt = select(Generation.example_idx, Generation.variant).where(
        Generation.run_id == run_id, Generation.example_idx >= start_idx, Generation.example_idx < end_idx
    )
    return {(idx, variant) for idx, variant in session.execute(stmt)}


def variant_summary(session: Session, run_id: int) -> list[VariantSummary]:
    """Per variant: rows, rows with a score, rows correct, accuracy, and rows whose output differs from base."""
    base = aliased(Generation)
    stmt = (
        select(
            Generation.variant,
            func.count(),
            func.count(Generation.correct),
            func.sum(case((Generation.correct.is_(True), 1), else_=0)),
            func.sum(case((and_(base.output.is_not(None), base.output != Generation.output), 1), else_=0)),
            func.avg(Generation.output_tokens),
        )
        .outerjoin(
            base,
            and_(
                base.run_id == Generation.run_id,
                base.example_idx == Generation.example_idx,
                base.variant == BASE_VARIANT,
            ),
        )
        .where(Generation.run_id == run_id)
        .group_by(Generation.variant)
    )
    stats = {row[0]: row[1:] for row in session.execute(stmt)}
    order = session.scalars(select(Variant.name).where(Variant.run_id == run_id).order_by(Variant.position))
    summary = []
    for name in order:
        rows, scored, correct, differ, mean_tokens = stats.get(name, (0, 0, 0, 0, None))
        summary.append(
            VariantSummary(
                variant=name,
                rows=int(rows),
                scored=int(scored),
                correct=int(correct or 0),
                accuracy=(int(correct or 0) / scored) if scored else None,
                differs_from_base=None if name == BASE_VARIANT else int(differ or 0),
                mean_output_tokens=float(mean_tokens) if mean_tokens is not None else None,
            )
        )
    return summary


def side_by_side(session: Session, run_id: int) -> list[SideBySide]:
    """One record per example: prompt, reference and, per variant, output, prediction, correct."""
    stmt = (
        select(Example.idx, Example.prompt, Example.reference, Generation.variant, Generation.output,
               Generation.prediction, Generation.correct, Generation.finish_reason, Generation.output_tokens)
        .join(Generation, (Generation.run_id == Example.run_id) & (Generation.example_idx == Example.idx))
        .where(Example.run_id == run_id)
        .order_by(Example.idx)
    )
    records: dict[int, SideBySide] = {}
    for idx, prompt, reference, variant, output, prediction, correct, finish_reason, tokens in session.execute(stmt):
        record = records.setdefault(
            idx, SideBySide(example_idx=idx, prompt=prompt, reference=reference, variants={})
        )
        record["variants"][variant] = VariantCell(
            output=output,
            prediction=prediction,
            correct=None if correct is None else bool(correct),
            finish_reason=finish_reason,
            output_tokens=tokens,
        )
    return list(records.values())


def _pg_array(values: Sequence[str]) -> str:
    """A PostgreSQL array literal of `values`, each quoted."""
    return "{" + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values) + "}"


#: What a cache lookup reads of each row.
_CACHED = (Generation.id, Generation.cache_key, Generation.output, Generation.output_tokens,
           Generation.finish_reason, Generation.output_ids)


def cached_outputs(session: Session, keys: Sequence[str]) -> dict[str, CachedOutput]:
    """For each cache key already generated (not itself a copy), one such output: its first, by id.

    PostgreSQL: one statement with the keys as one array, whatever their number, each key looked up on
    its own (`_pg_lookup`); SQLite: bounded IN lists."""
    found: dict[str, CachedOutput] = {}
    unique = sorted(set(keys))
    if not unique:
        return found
    if session.get_bind().dialect.name == "postgresql":
        statements = [_pg_lookup(unique)]
    else:
        statements = [select(*_CACHED).where(Generation.cache_key.in_(unique[start:start + 500]),
                                             Generation.reused_from.is_(None)).order_by(Generation.id)
                      for start in range(0, len(unique), 500)]
    for stmt in statements:
        for gid, key, output, tokens, reason, ids in session.execute(stmt):
            found.setdefault(str(key), CachedOutput(id=int(gid), output=output, output_tokens=int(tokens),
                                                    finish_reason=FinishReason(reason), output_ids=ids))
    return found


def _pg_lookup(keys: Sequence[str]) -> Select[Any]:
    """`unnest(keys)`, each key joined LATERAL to its first reusable row by id (`LIMIT 1`).

    Per key the only sensible plan is the index `ix_generations_cache_key` (cache_key, id over the rows
    reused_from IS NULL): one entry read. The whole-set form (`cache_key = ANY(keys) ORDER BY id`) left
    the planner free to scan: on a table never analysed it assumes 200 distinct keys and nearly every
    row matching 1,024 of them, and chose a walk of the primary key or a sequential scan, seconds per
    chunk on a fresh database (tests/test_write_path.py checks the plan on such a table)."""
    given = func.unnest(bindparam("keys", _pg_array(keys), type_=String).cast(ARRAY(String)))
    wanted = given.table_valued("key").render_derived(name="wanted")
    hit = (select(*_CACHED).where(Generation.cache_key == wanted.c.key, Generation.reused_from.is_(None))
           .order_by(Generation.id).limit(1).lateral("hit"))
    return select(hit).select_from(wanted).join(hit, true())
