"""Commands that only read: status (the results database, and the broker's queue of a run whose chunks
wait), results, report, compare, sql."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session, sessionmaker

from contract.config import RunConfig
from contract.errors import RunNotFoundError, UserError
from db.enums import BASE_VARIANT, ChunkStatus
from db.outputs import SideBySide, side_by_side
from db.progress import recent_run_ids
from db.readonly import run_readonly
from db.runs import get_run, run_variants
from db.scores import run_answers, run_scores
from db.verifications import latest_verifications

from .. import display
from ..loglik_report import LoglikReport, Task
from . import Context, cli, pass_context
from .options import format_option, run_argument
from .watching import broker_lines, broker_view, progress_of
from .watching import watch as watch_run


@cli.command()
@click.argument("run_id", required=False, type=int)
@click.option("--watch", is_flag=True, help="Refresh until the run ends.")
@format_option("table", "json")
@click.option("--limit", default=20, show_default=True, help="How many recent runs to list without RUN.")
@pass_context
def status(obj: Context, run_id: int | None, watch: bool, fmt: str, limit: int) -> None:
    """Runs and their progress: chunks and rows done/total, failures, recent rows/s, ETA, silent workers."""
    sessions = obj.sessions()
    if run_id is None:
        with sessions() as session:
            ids = recent_run_ids(session, limit)
        items = [progress_of(sessions, i) for i in ids]
        if fmt == "json":
            click.echo(display.to_json([p.to_json() for p in items]))
            return
        rows = [[p.id, p.name, p.status, f"{p.rows_done}/{p.rows_total}",
                 f"{p.chunks.get(ChunkStatus.DONE, 0)}/{p.chunks_total}", p.chunks.get(ChunkStatus.FAILED, 0),
                 f"{p.rows_per_s:.2f}" if p.rows_per_s else "", p.created_at.strftime("%Y-%m-%d %H:%M")]
                for p in items]
        click.echo(display.to_table(["run", "name", "status", "rows", "chunks", "failed", "rows/s", "created"], rows))
        return
    progress = watch_run(sessions, run_id) if watch else progress_of(sessions, run_id)
    broker = broker_view(obj.settings.broker_url, progress)
    if fmt == "json":
        click.echo(display.to_json_object({**progress.to_json(), "broker": broker and broker.to_json()}))
        return
    if not watch:
        click.echo(display.progress_line(progress))
    click.echo(f"variants: {', '.join(progress.variants)}")
    for note, chunks in progress.engine_notes.items():
        click.echo(f"exact fallback ({chunks} chunk{'s' if chunks != 1 else ''}): {note}")
    for line in display.stalled_lines(progress) + broker_lines(progress, broker):
        click.echo(line)
    if progress.error:
        click.echo(f"error: {progress.error}")
    for failed in progress.failed_chunks:
        click.echo(f"chunk {failed.chunk} failed after {failed.attempts} attempt(s): {failed.error}")
    for line in display.attempt_lines(progress):
        click.echo(line)


@cli.command()
@run_argument
@click.option("--variant", "variants", multiple=True, help="Only these variants (repeatable); base is kept.")
@click.option("--only-diff", is_flag=True, help="Only examples where an adapter's output differs from base.")
@format_option("table", "json", "jsonl", "csv")
@click.option("--limit", type=int, default=None, help="At most this many examples.")
@pass_context
def results(obj: Context, run_id: int, variants: tuple[str, ...], only_diff: bool, fmt: str,
            limit: int | None) -> None:
    """Outputs of RUN side by side, one example per row."""
    _, names, records = _report_inputs(obj.sessions(), run_id)
    unknown = [v for v in variants if v not in names]
    if unknown:
        raise UserError(f"run {run_id} has no variant {', '.join(unknown)} (it has {', '.join(names)})")
    shown = [BASE_VARIANT, *[n for n in names if n != BASE_VARIANT and (not variants or n in variants)]]
    if only_diff:
        records = [r for r in records if any(
            v in r["variants"] and BASE_VARIANT in r["variants"]
            and r["variants"][v]["output"] != r["variants"][BASE_VARIANT]["output"] for v in shown[1:])]
    if limit is not None:
        records = records[:limit]
    for r in records:
        r["variants"] = {v: r["variants"][v] for v in shown if v in r["variants"]}
    if fmt == "json":
        click.echo(display.to_json(records))
    elif fmt == "jsonl":
        text = display.to_jsonl(records)
        if text:
            click.echo(text)
    else:
        fields = ["output", "prediction", "correct"]
        columns = ["example_idx", "prompt", "reference"] + [f"{v}.{f}" for v in shown for f in fields]
        rows = [[r["example_idx"], r["prompt"], r["reference"]]
                + [r["variants"][v].get(f) if v in r["variants"] else None for v in shown for f in fields]
                for r in records]
        if fmt == "csv":
            click.echo(display.to_csv(columns, rows))
        else:
            narrow = ["example_idx", "reference"] + [f"{v}.{f}" for v in shown for f in ("prediction", "correct")]
            keep = [columns.index(c) for c in narrow]
            click.echo(display.to_table(narrow, [[row[i] for i in keep] for row in rows], max_cell=40))


def _report_inputs(sessions: sessionmaker[Session], run_id: int) -> tuple[Any, list[str], list[SideBySide]]:
    with sessions() as session:
        run = get_run(session, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        names = [v.name for v in run_variants(session, run_id)]
        records = side_by_side(session, run_id)
    return run, names, records


def _task(run: Any) -> str:
    """The run's `task` (generate, choice, perplexity), from its stored config."""
    return RunConfig.from_dict(run.config, source=f"run {run.id}'s stored config").task


def _loglik_report(sessions: sessionmaker[Session], run: Any, names: list[str]) -> LoglikReport | None:
    """A choice or perplexity run's figures from its stored scores (a `LoglikReport`); None for generate."""
    from ..loglik_report import build_loglik

    task = _task(run)
    if task not in {t.value for t in Task}:
        return None
    with sessions() as session:
        scores = run_scores(session, run.id)
        gold = {idx: answer for idx, (_, answer) in run_answers(session, run.id).items()}
    return build_loglik(Task(task), scores, gold, names)


def _elapsed(run: Any) -> float | None:
    if run.started_at is None or run.finished_at is None:
        return None
    return (run.finished_at - run.started_at).total_seconds() or None


@cli.command()
@run_argument
@format_option("table", "json")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Also write a self-contained HTML report to this file; `-`: only the page, on stdout.")
@pass_context
def report(obj: Context, run_id: int, fmt: str, html_file: Path | None) -> None:
    """Per-variant scores with 95% intervals and paired comparisons of each adapter with base.

    task choice: acc and acc_norm, both paired, and the gold answer's log-probability change; task
    perplexity: word and byte perplexity, bits per byte, and its change over documents."""
    from ..report import Verified, build_report, report_tables, verified_line

    sessions = obj.sessions()
    run, names, records = _report_inputs(sessions, run_id)
    with sessions() as session:
        verified = {name: Verified(name, v.sampled, v.agreed, v.device, v.dtype)
                    for name, v in latest_verifications(session, run_id).items()}
    result = build_report(run_id, records, names, elapsed_s=_elapsed(run), verified=verified,
                          loglik=_loglik_report(sessions, run, names))
    if html_file is not None:
        from ..html_report import render_html
        from ..loglik_html import render_loglik_html

        meta = {"name": run.name, "status": run.status, "base": run.base_model, "dataset": run.dataset_path,
                "examples": run.n_examples}
        page = render_html(result, records, meta) if result.loglik is None else \
            render_loglik_html(result, records, meta)
        if str(html_file) == "-":  # e.g. from a container: `docker compose run --rm -T cli report 1 --html - > r.html`
            click.echo(page, nl=False)
            return
        html_file.write_text(page, encoding="utf-8")
        click.echo(f"wrote {html_file}", err=True)
    if fmt == "json":
        click.echo(display.to_json_object(result.to_json()))
        return
    click.echo(f"run {run_id} ({run.name}): {run.status}, {run.n_examples} examples")
    if result.loglik is not None:
        click.echo(_TASK_LINES[result.loglik.task])
    elif not result.has_scores:
        click.echo("no references: this run has no scores; changed outputs and lengths only")
    for i, (columns, rows) in enumerate(report_tables(result)):
        click.echo(("\n" if i else "") + display.to_table(columns, rows))
    line = verified_line(result)
    if line:
        click.echo(f"\n{line}")
    if result.rows_per_s:
        tokens = "" if result.loglik is not None else f", {result.tokens_per_s:.1f} generated tokens/s"
        click.echo(f"\nthroughput: {result.rows_per_s:.2f} rows/s{tokens}")


#: What a log-likelihood run's report measures, said above its tables.
_TASK_LINES = {
    Task.CHOICE: "task choice: acc = the highest-log-probability choice is the gold one; acc_norm = the same per "
              "character of the choice (lm-evaluation-harness's definitions); gold logprob delta = the mean change "
              "of the gold choice's log-probability, adapter minus base (nats)",
    Task.PERPLEXITY: "task perplexity: lm-evaluation-harness's word_perplexity, byte_perplexity and bits_per_byte, "
                  "summed over documents; bits per byte delta = adapter minus base (lower is better)",
}


@cli.command()
@click.argument("run_a", type=int)
@click.argument("run_b", type=int)
@click.option("--variant-a", default=None, help="Variant of RUN_A (default: its only adapter).")
@click.option("--variant-b", default=None, help="Variant of RUN_B (default: its only adapter).")
@format_option("table", "json")
@pass_context
def compare(obj: Context, run_a: int, run_b: int, variant_a: str | None, variant_b: str | None, fmt: str) -> None:
    """Paired statistics of a variant of RUN_B against a variant of RUN_A on the same dataset (for two
    choice runs: acc, acc_norm and the gold answer's log-probability; for two perplexity runs: bits per byte)."""
    from ..loglik_report import ChoiceComparison, VariantScores, compare_variant_scores
    from ..report import choice_comparison_tables, compare_runs, comparison_rows, perplexity_comparison_table

    sessions = obj.sessions()
    run_1, names_a, records_a = _report_inputs(sessions, run_a)
    run_2, names_b, records_b = _report_inputs(sessions, run_b)
    if run_1.dataset_sha256 != run_2.dataset_sha256 or run_1.n_examples != run_2.n_examples:
        raise UserError(f"runs {run_a} and {run_b} are not on the same dataset "
                        f"({run_1.dataset_path} vs {run_2.dataset_path}); their examples cannot be paired")
    chosen = []
    for run_id, names, variant, flag in ((run_a, names_a, variant_a, "--variant-a"),
                                         (run_b, names_b, variant_b, "--variant-b")):
        adapters = [n for n in names if n != BASE_VARIANT]
        if variant is None:
            if len(adapters) != 1:
                raise UserError(f"run {run_id} has adapters {', '.join(adapters)}: choose one with {flag}")
            variant = adapters[0]
        if variant not in names:
            raise UserError(f"run {run_id} has no variant {variant} (it has {', '.join(names)})")
        chosen.append(variant)
    task = _task(run_1)
    if _task(run_2) != task:
        raise UserError(f"runs {run_a} and {run_b} are different tasks ({task} vs {_task(run_2)}); "
                        "their scores cannot be paired")
    scored = None
    if task in {t.value for t in Task}:
        sides = []
        for run, variant in ((run_1, chosen[0]), (run_2, chosen[1])):
            with sessions() as session:
                gold = {idx: answer for idx, (_, answer) in run_answers(session, run.id).items()}
                sides.append(VariantScores(run_scores(session, run.id), gold, variant, f"{run.id}:{variant}"))
        scored = compare_variant_scores(Task(task), sides[0], sides[1])
    result = compare_runs(records_a, chosen[0], records_b, chosen[1], run_a=run_a, run_b=run_b, scored=scored)
    if fmt == "json":
        extra = {} if scored is None else {"task": task, **scored.to_json()}
        click.echo(display.to_json_object({"run_a": run_a, "variant_a": chosen[0], "run_b": run_b,
                                           "variant_b": chosen[1], "paired": result.paired, **result.to_json(),
                                           **extra}))
        return
    if scored is None:
        columns, rows = comparison_rows([result])
        click.echo(display.to_table(columns, rows))
        return
    click.echo(_COMPARE_LINES[Task(task)].format(a=f"{run_a}:{chosen[0]}", b=f"{run_b}:{chosen[1]}"))
    tables = choice_comparison_tables([scored]) if isinstance(scored, ChoiceComparison) else \
        [perplexity_comparison_table([scored])]
    for columns, rows in tables:
        click.echo("\n" + display.to_table(columns, rows))


#: What `compare` pairs for two log-likelihood runs, said above its tables.
_COMPARE_LINES = {
    Task.CHOICE: "compares {b} against {a}, example by example: acc and acc_norm (wins: right in {b}, wrong in {a}; "
              "exact McNemar p; delta with a paired bootstrap 95% CI) and the gold choice's log-probability",
    Task.PERPLEXITY: "compares {b} against {a}, document by document: bits per byte ({b} minus {a}, "
                  "with a paired bootstrap 95% CI over documents; lower is better)",
}


@cli.command()
@click.argument("query")
@format_option("table", "json", "csv")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds before the query is stopped.")
@pass_context
def sql(obj: Context, query: str, fmt: str, timeout_s: float) -> None:
    """Run one read-only SQL QUERY against the results database (writes, ATTACH and pragmas are refused)."""
    result = run_readonly(obj.settings.database_url, query, timeout_s=timeout_s)
    if fmt == "json":
        click.echo(display.to_json(result.records()))
    elif fmt == "csv":
        click.echo(display.to_csv(result.columns, result.rows))
    else:
        click.echo(display.to_table(result.columns, result.rows))
