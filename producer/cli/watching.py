"""Showing a run while it goes and when it ends: the progress line or bar on stderr, the summary table."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import RunNotFoundError
from db.enums import FINAL_RUN_STATUSES
from db.outputs import variant_summary
from db.progress import RunProgress, run_progress
from db.runs import get_run

from .. import display


def progress_printer(enabled: bool) -> Callable[[RunProgress], None]:
    """A progress bar redrawn in place on a terminal; elsewhere (logs, CI) one line per change."""
    last: dict[str, Any] = {"line": "", "state": None}
    interactive = sys.stderr.isatty()

    def show(progress: RunProgress) -> None:
        if not enabled:
            return
        line = display.progress_line(progress)
        state = (progress.status, progress.rows_done, dict(progress.chunks), len(progress.stalled_chunks),
                 progress.stalled)  # a worker going silent or a stall is news too
        if interactive:
            click.echo("\r" + line.ljust(len(last["line"])), nl=False, err=True)
            if progress.status in FINAL_RUN_STATUSES:
                click.echo("", err=True)
        elif state != last["state"]:
            click.echo(line, err=True)
        last["line"], last["state"] = line, state

    return show


def summary(sessions: sessionmaker[Session], run_id: int) -> str:
    with sessions() as session:
        rows_by_variant = variant_summary(session, run_id)
        run = get_run(session, run_id)
    assert run is not None
    rows = []
    for s in rows_by_variant:
        accuracy = f"{s.correct}/{s.scored} = {s.accuracy:.1%}" if s.accuracy is not None else "no reference"
        differs = "-" if s.differs_from_base is None else f"{s.differs_from_base}/{s.rows}"
        mean = f"{s.mean_output_tokens:.1f}" if s.mean_output_tokens is not None else "-"
        rows.append([s.variant, s.rows, accuracy, differs, mean])
    table = display.to_table(["variant", "rows", "score", "differs from base", "mean tokens"], rows)
    head = f"run {run.id} ({run.name}): {run.status}"
    if run.error:
        head += f": {run.error}"
    return f"{head}\n{table}"


def progress_of(sessions: sessionmaker[Session], run_id: int) -> RunProgress:
    with sessions() as session:
        progress = run_progress(session, run_id)
    if progress is None:
        raise RunNotFoundError(f"no run with id {run_id}")
    return progress


def watch(sessions: sessionmaker[Session], run_id: int, interval: float = 1.0) -> RunProgress:
    show = progress_printer(True)
    while True:
        progress = progress_of(sessions, run_id)
        show(progress)
        if progress.status in FINAL_RUN_STATUSES:
            return progress
        time.sleep(interval)
