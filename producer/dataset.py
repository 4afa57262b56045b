"""Reading evaluation sets (.jsonl, .json, .csv) into rows, with errors that give the line."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.errors import DatasetError

SUPPORTED = (".jsonl", ".json", ".csv")


@dataclass(frozen=True)
class Row:
    """One dataset row: its 0-based position, where it is in the file (for errors) and its fields."""

    idx: int
    where: str  # "file:line" or "file item N"
    data: dict[str, Any]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(path: str | Path, *, limit: int | None = None) -> list[Row]:
    """All rows of the dataset (the first `limit` if given). Raises DatasetError naming the line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DatasetError(f"{path}: unsupported dataset format '{suffix}' (use {', '.join(SUPPORTED)})")
    if not path.is_file():
        raise DatasetError(f"{path}: no such dataset file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read the dataset: {err}") from err
    reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv}[suffix]
    rows = reader(path, text, limit)
    if not rows:
        raise DatasetError(f"{path}: the dataset has no rows")
    return rows


def _jsonl(path: Path, text: str, limit: int | None) -> list[Row]:
    rows: list[Row] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}:{lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{path}:{lineno}: each line must be a JSON object, got {type(data).__name__}")
        rows.append(Row(len(rows), f"{path}:{lineno}", data))
    return rows


def _json(path: Path, text: str, limit: int | None) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{path}: a .json dataset must be a list of objects, got {type(data).__name__}")
    rows: list[Row] = []
    for i, item in enumerate(data[:limit] if limit is not None else data):
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: item {i} must be an object, got {type(item).__name__}")
        rows.append(Row(i, f"{path} item {i}", item))
    return rows


def _csv(path: Path, text: str, limit: int | None) -> list[Row]:
    reader = csv.reader(text.splitlines())
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as err:
        raise DatasetError(f"{path}:1: malformed CSV header: {err}") from None
    if not header or any(not h.strip() for h in header):
        raise DatasetError(f"{path}:1: the CSV header has an empty column name")
    if len(set(header)) != len(header):
        raise DatasetError(f"{path}:1: the CSV header repeats a column name")
    rows: list[Row] = []
    while limit is None or len(rows) < limit:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DatasetError(f"{path}:{reader.line_num}: malformed CSV: {err}") from None
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise DatasetError(
                f"{path}:{reader.line_num}: expected {len(header)} fields ({', '.join(header)}), got {len(values)}"
            )
        rows.append(Row(len(rows), f"{path}:{reader.line_num}", dict(zip(header, values))))
    return rows
