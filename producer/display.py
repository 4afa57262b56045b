"""What the CLI prints: tables, JSON, CSV and the progress line (stdout for data, stderr for progress)."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from db.enums import ChunkStatus
from db.progress import RunProgress

#: Widest a table cell gets before it is cut with an ellipsis.
MAX_CELL = 60


def _plain(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return value


def to_json(records: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps([{k: _plain(v) for k, v in r.items()} for r in records], indent=2, ensure_ascii=False)


def to_json_object(record: dict[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in record.items()}, indent=2, ensure_ascii=False)


def to_jsonl(records: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(json.dumps({k: _plain(v) for k, v in r.items()}, ensure_ascii=False) for r in records)


def to_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else _plain(v) for v in row])
    return buffer.getvalue().rstrip("\n")


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = ""
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(_plain(value))
    text = " ".join(text.split()) if "\n" in text or "\t" in text else text
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def to_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], *, max_cell: int = MAX_CELL) -> str:
    cells = [[_cell(v, max_cell) for v in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        widths = [max(w, len(v)) for w, v in zip(widths, row)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([line, rule, *body])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def progress_line(p: RunProgress, *, width: int | None = None) -> str:
    """`run 3 running [#####.....] 120/240 rows  chunks 2/4 (1 running, 1 waiting)  3.1 rows/s  ETA 40s`.

    While nothing progresses the ETA is `-`, with why: `ETA - (stalled: no row for 2m05s)`.
    """
    columns = width or shutil.get_terminal_size((100, 20)).columns
    bar_width = max(10, min(30, columns - 70))
    filled = int(round(p.fraction * bar_width))
    bar = "#" * filled + "." * (bar_width - filled)
    rate = f"{p.rows_per_s:.1f} rows/s" if p.rows_per_s else "- rows/s"
    failed = p.chunks.get(ChunkStatus.FAILED, 0)
    fail = f"  {failed} failed" if failed else ""
    reused = f" ({p.rows_reused} reused)" if p.rows_reused else ""
    states = [f"{n} {what}" for n, what in ((p.chunks_running, "running"), (len(p.stalled_chunks), "stalled"),
                                            (p.chunks_waiting, "waiting")) if n]
    detail = f" ({', '.join(states)})" if p.active and states else ""
    eta = f"ETA {_duration(p.eta_s)}"
    if p.stalled:
        eta += f" (stalled: no row for {_duration(p.idle_s)})"
    return (
        f"run {p.id} {p.status:<9} [{bar}] {p.rows_done}/{p.rows_total} rows{reused}  "
        f"chunks {p.chunks.get(ChunkStatus.DONE, 0)}/{p.chunks_total}{detail}{fail}  {rate}  {eta}"
    )


def stalled_lines(p: RunProgress) -> list[str]:
    """Why an unfinished run does not progress: silent workers, chunks waiting with none running."""
    lines = [f"chunk {s.chunk}: worker {s.worker or '?'} silent for "
             f"{'?' if s.silent_s is None else int(round(s.silent_s))} s (presumed dead; it will be taken back)"
             for s in p.stalled_chunks]
    if p.active and p.chunks_waiting and not p.chunks_running:
        plural = "s" if p.chunks_waiting != 1 else ""
        lines.append(f"no chunk running: {p.chunks_waiting} chunk{plural} waiting for a worker, "
                     f"the oldest for {_duration(p.waiting_s)}")
    return lines


#: Chunks whose attempts `status` lists, at most (`--format json` has them all, up to its own bound).
MAX_ATTEMPT_LINES = 20


def attempt_lines(p: RunProgress) -> list[str]:
    """`chunk 3 attempts: worker lost x3 (w1, w2, w3)`: the causes of each failed or retried chunk's attempts."""
    lines = []
    for history in p.chunk_attempts[:MAX_ATTEMPT_LINES]:
        now = "" if history.status in (ChunkStatus.DONE, ChunkStatus.FAILED) else f"; now {history.status}"
        lines.append(f"chunk {history.chunk} attempts: {history.summary}{now}")
    if len(p.chunk_attempts) > MAX_ATTEMPT_LINES:
        lines.append(f"... and {len(p.chunk_attempts) - MAX_ATTEMPT_LINES} more chunk(s) with failed attempts "
                     "(status --format json lists them)")
    return lines
