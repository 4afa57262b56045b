"""Showing a run while it goes and when it ends: the progress line or bar on stderr, the summary table,
and what the broker holds for a run whose chunks wait."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import click
from sqlalchemy.orm import Session, sessionmaker

from contract.config import RunConfig
from contract.errors import BrokerUnavailableError, ConfigError, RunNotFoundError
from contract.queue import DEFAULT_QUEUE, make_client, queue_depth
from db.enums import EMBEDDED_QUEUE, FINAL_RUN_STATUSES
from db.leases import RECONCILE_AFTER_S, SWEEP_S
from db.outputs import variant_summary
from db.progress import RunProgress, run_progress
from db.runs import get_run
from db.scores import run_answers, run_scores

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
    loglik = _loglik_summary(sessions, run, [s.variant for s in rows_by_variant])
    if loglik is not None:
        return f"run {run.id} ({run.name}): {run.status}" + (f": {run.error}" if run.error else "") + f"\n{loglik}"
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


def _loglik_summary(sessions: sessionmaker[Session], run: Any, variants: list[str]) -> str | None:
    """A choice or perplexity run's summary table (acc and acc_norm; bits per byte and word perplexity);
    None for a generate run."""
    try:
        task = RunConfig.from_dict(run.config).task
    except ConfigError:  # a config from a newer lora-compare: the plain summary
        return None
    if task == "generate":
        return None
    from ..loglik_report import Task, build_loglik

    with sessions() as session:
        scores = run_scores(session, run.id)
        gold = {idx: answer for idx, (_, answer) in run_answers(session, run.id).items()}
    report = build_loglik(Task(task), scores, gold, variants)

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    if report.task is Task.CHOICE:
        rows = [[v, c.acc.n, f"{c.acc.correct}/{c.acc.n} = {pct(c.acc.value)}", pct(c.acc_norm.value)]
                for v, c in report.choice.items()]
        return display.to_table(["variant", "rows", "acc", "acc_norm"], rows)
    rows = [[v, p.documents, "-" if p.bits_per_byte is None else f"{p.bits_per_byte:.4f}",
             "-" if p.word_perplexity is None else f"{p.word_perplexity:.3f}"] for v, p in report.perplexity.items()]
    return display.to_table(["variant", "documents", "bits per byte", "word perplexity"], rows)


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


@dataclass(frozen=True)
class BrokerView:
    """What the broker holds for a run's queue, as `status` saw it."""

    queue: str
    messages: int | None  # waiting on the queue (delivered, unacknowledged ones not counted); None: unknown
    error: str | None  # why the broker could not say (unreachable, not answering)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def broker_view(broker_url: str, progress: RunProgress) -> BrokerView | None:
    """The run's queue depth when it matters: an unfinished run, carried by a broker, with chunks waiting.

    Bounded by the broker timeouts of contract.queue (a few seconds) when the broker does not answer.
    """
    if not progress.active or progress.queue == EMBEDDED_QUEUE or not progress.chunks_waiting:
        return None
    queue = progress.queue or DEFAULT_QUEUE
    try:
        return BrokerView(queue, queue_depth(make_client(broker_url), queue), None)
    except BrokerUnavailableError as err:
        return BrokerView(queue, None, str(err))


def broker_lines(progress: RunProgress, view: BrokerView | None) -> list[str]:
    """Why waiting chunks are not handed out, when the broker shows it: its queue is empty (lost messages)
    or unreachable, or it holds messages that no worker takes."""
    if view is None:
        return []
    waiting = f"{progress.chunks_waiting} waiting chunk{'s' if progress.chunks_waiting != 1 else ''}"
    if view.error is not None:
        return [f"broker: cannot see queue '{view.queue}' ({view.error}); the {waiting} cannot be handed out "
                "until it answers"]
    if view.messages == 0 and (progress.waiting_s or 0.0) >= RECONCILE_AFTER_S:
        resend = int(RECONCILE_AFTER_S + SWEEP_S)
        return [f"broker: queue '{view.queue}' holds no message for the {waiting} (lost, e.g. Redis restarted "
                f"without its data): a live worker's sweep sends them again within {resend} s, "
                f"or `lora-compare retry {progress.id}` now"]
    if view.messages and not progress.chunks_running and not progress.stalled_chunks:
        return [f"broker: queue '{view.queue}' holds {view.messages} message{'s' if view.messages != 1 else ''} "
                f"and no chunk is running: is a worker consuming it? (`lora-compare worker --queue {view.queue}`)"]
    return []
