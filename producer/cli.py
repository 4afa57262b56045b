"""The `lora-compare` command line (Click).

Library code raises; this module turns the project's errors into one line on stderr and a non-zero
exit. Data goes to stdout; progress and logs go to stderr. A command that creates a run prints the
run id alone on the last line of stdout. torch, transformers and peft are imported only inside the
commands that run a model (`run`, `demo`, `worker`, `retry --here`, `verify`).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import LoraCompareError, RunNotFoundError, UserError
from contract.queue import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    enqueue_chunks,
    make_client,
)
from contract.settings import DEFAULT_BROKER_URL, DEFAULT_DATABASE_URL, Settings
from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.outputs import side_by_side, variant_summary
from db.progress import RunProgress, recent_run_ids, run_progress
from db.readonly import QueryError, run_readonly
from db.runs import cancel_run, get_run, requeue_run, run_variants
from db.verifications import latest_verifications

from . import display
from .submit import prepare_run, register_run

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

#: The demo's config, shipped inside the package (producer/demo/) with its dataset and adapter, so an
#: installed lora-compare runs the demo from any folder; examples/ in a checkout links to these files.
DEMO_CONFIG = Path(__file__).resolve().parent / "demo" / "demo.yaml"


@dataclass
class Context:
    """Built once by the group and passed to every command."""

    settings: Settings
    _engine: Engine | None = field(default=None, repr=False)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.settings.database_url)
        return self._engine

    def sessions(self, *, migrate: bool = False) -> sessionmaker[Session]:
        if migrate:
            upgrade(self.engine)
        return session_factory(self.engine)


def _errors(func: F) -> F:
    """Turn the project's errors (and an unreachable database) into one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LoraCompareError as err:  # UserError, and a chunk error met by a command that generates
            raise click.ClickException(str(err)) from None
        except QueryError as err:
            raise click.ClickException(f"sql: {err}") from None
        except OperationalError as err:
            first = str(err.orig if err.orig is not None else err).strip().splitlines()[0]
            raise click.ClickException(f"database error: {first}") from None
        except ProgrammingError as err:
            first = str(err.orig if err.orig is not None else err).strip().splitlines()[0]
            raise click.ClickException(
                f"database error: {first} (is the schema created? run `lora-compare db upgrade`)"
            ) from None

    return wrapper  # type: ignore[return-value]


#: Group options a user may also give after the subcommand (`lora-compare sql "..." --database-url X`).
_ANYWHERE = ("--database-url", "--broker-url")


def _hoist(args: list[str], names: tuple[str, ...] = _ANYWHERE) -> list[str]:
    """`args` with every `NAME VALUE` / `NAME=VALUE` of `names` moved to the front, where the group
    parses it; nothing after a `--` is touched."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg.split("=", 1)[0] in names and ("=" in arg or i + 1 < len(args)):
            taken = 1 if "=" in arg else 2
            front.extend(args[i:i + taken])
            i += taken
            continue
        rest.append(arg)
        i += 1
    return front + rest


class _Group(click.Group):
    """A group whose connection options are accepted before or after the subcommand (DESIGN.md)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist(list(args)))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--database-url", envvar="LORA_COMPARE_DATABASE_URL", default=DEFAULT_DATABASE_URL,
              show_default=True,
              help="SQLAlchemy URL: sqlite:///file.db or postgresql://user:pw@host/db (before or after the command).")
@click.option("--broker-url", envvar="LORA_COMPARE_BROKER_URL", default=DEFAULT_BROKER_URL, show_default=True,
              help="Celery broker URL (Redis) for submit, worker, retry (before or after the command).")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.version_option(package_name="lora-compare")
@click.pass_context
def cli(ctx: click.Context, database_url: str, broker_url: str, verbose: int) -> None:
    """Compare a base causal LM with its LoRA adapters on an evaluation set, side by side in SQL."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = Settings.from_env()
    ctx.obj = Context(Settings(database_url=database_url, broker_url=broker_url, cache_dir=base.cache_dir,
                               model_roots=base.model_roots))


pass_context = click.make_pass_decorator(Context)


# --- running ---------------------------------------------------------------------------------


def _progress_printer(enabled: bool) -> Callable[[RunProgress], None]:
    """A progress bar redrawn in place on a terminal; elsewhere (logs, CI) one line per change."""
    last: dict[str, Any] = {"line": "", "state": None}
    interactive = sys.stderr.isatty()

    def show(progress: RunProgress) -> None:
        if not enabled:
            return
        line = display.progress_line(progress)
        state = (progress.status, progress.rows_done, dict(progress.chunks))
        if interactive:
            click.echo("\r" + line.ljust(len(last["line"])), nl=False, err=True)
            if progress.status in ("completed", "failed", "cancelled"):
                click.echo("", err=True)
        elif state != last["state"]:
            click.echo(line, err=True)
        last["line"], last["state"] = line, state

    return show


def _summary(sessions: sessionmaker[Session], run_id: int) -> str:
    with sessions() as session:
        summary = variant_summary(session, run_id)
        run = get_run(session, run_id)
    assert run is not None
    rows = []
    for s in summary:
        accuracy = f"{s['correct']}/{s['scored']} = {s['accuracy']:.1%}" if s["scored"] else "no reference"
        differs = "-" if s["differs_from_base"] is None else f"{s['differs_from_base']}/{s['rows']}"
        mean = f"{s['mean_output_tokens']:.1f}" if s["mean_output_tokens"] is not None else "-"
        rows.append([s["variant"], s["rows"], accuracy, differs, mean])
    table = display.to_table(["variant", "rows", "score", "differs from base", "mean tokens"], rows)
    head = f"run {run.id} ({run.name}): {run.status}"
    if run.error:
        head += f": {run.error}"
    return f"{head}\n{table}"


def _run_here(obj: Context, config: Path, *, device: str | None, quiet: bool) -> int:
    from contract.config import load_config
    from worker.demo_model import prepare_demo_model
    from worker.runner import run_embedded

    sessions = obj.sessions(migrate=True)
    if load_config(config).model.is_demo:
        prepare_demo_model(obj.settings.demo_model_dir)
    prepared = prepare_run(config, obj.settings)
    with sessions.begin() as session:
        run_id = register_run(session, prepared)
    click.echo(f"run {run_id}: {len(prepared.examples)} examples x {1 + len(prepared.adapters)} variants", err=True)
    final = run_embedded(sessions, obj.settings, run_id, device=device, on_progress=_progress_printer(not quiet))
    click.echo(_summary(sessions, run_id))
    click.echo(run_id)
    if final.status != "completed":
        click.echo(f"Error: run {run_id} {final.status}: {final.error or 'see lora-compare status'}", err=True)
        sys.exit(1)
    return run_id


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@pass_context
@_errors
def run(obj: Context, config: Path, device: str, quiet: bool) -> None:
    """Run CONFIG end to end in this process (embedded mode) and print a summary, then the run id."""
    _run_here(obj, config, device=device, quiet=quiet)


@cli.command()
@click.option("--config", "config", type=click.Path(path_type=Path), default=DEMO_CONFIG, show_default=True,
              help="The demo config to run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@pass_context
@_errors
def demo(obj: Context, config: Path, device: str, quiet: bool) -> None:
    """Prepare the bundled SmolLM2-135M-Instruct model and demo adapter, then run the demo end to end."""
    if not config.is_file():
        raise click.ClickException(f"{config}: the demo config is missing")
    _run_here(obj, config, device=device, quiet=quiet)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="Broker queue for this run's chunks.")
@click.option("--wait", is_flag=True, help="Wait for the run to finish, showing progress.")
@pass_context
@_errors
def submit(obj: Context, config: Path, queue: str, wait: bool) -> None:
    """Validate CONFIG, record the run in SQL and queue one job per chunk; print the run id."""
    sessions = obj.sessions(migrate=True)
    prepared = prepare_run(config, obj.settings, require_base=False)
    with sessions.begin() as session:
        run_id = register_run(session, prepared)
        chunks = list(range(get_run(session, run_id).n_chunks))  # type: ignore[union-attr]
    sent = enqueue_chunks(make_client(obj.settings.broker_url), run_id, chunks, queue=queue)
    click.echo(f"run {run_id}: {len(prepared.examples)} examples, {sent} chunks queued on '{queue}'", err=True)
    if wait:
        _watch(sessions, run_id)
        click.echo(_summary(sessions, run_id))
    click.echo(run_id)


@cli.command()
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--queues", default=DEFAULT_QUEUE, show_default=True, help="Comma-separated queues to consume.")
@click.option("--max-adapters", default=32, show_default=True, help="Adapters kept resident (LRU).")
@click.option("--max-attempts", default=DEFAULT_MAX_ATTEMPTS, show_default=True,
              help="Starts of a chunk before it is failed.")
@click.option("--visibility-timeout", default=DEFAULT_VISIBILITY_TIMEOUT_S, show_default=True,
              help="Seconds before Redis redelivers an unacknowledged chunk; longer than the slowest chunk.")
@click.option("--hostname", default=None, help="Worker name (default: host:pid).")
@click.option("--model-root", "model_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Load models and adapters only from under this folder (repeatable; env LORA_COMPARE_MODEL_ROOTS).")
@pass_context
@_errors
def worker(obj: Context, device: str, queues: str, max_adapters: int, max_attempts: int,
           visibility_timeout: int, hostname: str | None, model_roots: tuple[Path, ...]) -> None:
    """A GPU worker: one Celery process (solo pool) with the model and adapters resident."""
    from dataclasses import replace

    from worker.runner import serve

    if model_roots:
        obj.settings = replace(obj.settings, model_roots=model_roots)

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    serve(obj.sessions(migrate=True), obj.settings, device=device,
          queues=[q.strip() for q in queues.split(",") if q.strip()], max_adapters=max_adapters,
          max_attempts=max_attempts, visibility_timeout_s=visibility_timeout, hostname=hostname)


# --- watching ----------------------------------------------------------------------------------


def _progress(sessions: sessionmaker[Session], run_id: int) -> RunProgress:
    with sessions() as session:
        progress = run_progress(session, run_id)
    if progress is None:
        raise RunNotFoundError(f"no run with id {run_id}")
    return progress


def _watch(sessions: sessionmaker[Session], run_id: int, interval: float = 1.0) -> RunProgress:
    show = _progress_printer(True)
    while True:
        progress = _progress(sessions, run_id)
        show(progress)
        if progress.status in ("completed", "failed", "cancelled"):
            return progress
        time.sleep(interval)


@cli.command()
@click.argument("run_id", required=False, type=int)
@click.option("--watch", is_flag=True, help="Refresh until the run ends.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--limit", default=20, show_default=True, help="How many recent runs to list without RUN.")
@pass_context
@_errors
def status(obj: Context, run_id: int | None, watch: bool, fmt: str, limit: int) -> None:
    """Runs and their progress: chunks and rows done/total, failures, rows/s."""
    sessions = obj.sessions()
    if run_id is None:
        with sessions() as session:
            ids = recent_run_ids(session, limit)
        items = [_progress(sessions, i) for i in ids]
        if fmt == "json":
            click.echo(display.to_json([p.to_json() for p in items]))
            return
        rows = [[p.id, p.name, p.status, f"{p.rows_done}/{p.rows_total}",
                 f"{p.chunks.get('done', 0)}/{p.chunks_total}", p.chunks.get("failed", 0),
                 f"{p.rows_per_s:.2f}" if p.rows_per_s else "", p.created_at.strftime("%Y-%m-%d %H:%M")]
                for p in items]
        click.echo(display.to_table(["run", "name", "status", "rows", "chunks", "failed", "rows/s", "created"], rows))
        return
    progress = _watch(sessions, run_id) if watch else _progress(sessions, run_id)
    if fmt == "json":
        click.echo(display.to_json_object(progress.to_json()))
        return
    if not watch:
        click.echo(display.progress_line(progress))
    click.echo(f"variants: {', '.join(progress.variants)}")
    for note, chunks in progress.engine_notes.items():
        click.echo(f"exact fallback ({chunks} chunk{'s' if chunks != 1 else ''}): {note}")
    if progress.error:
        click.echo(f"error: {progress.error}")
    for failed in progress.failed_chunks:
        click.echo(f"chunk {failed['chunk']} failed after {failed['attempts']} attempt(s): {failed['error']}")


# --- reading results ---------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", type=int)
@click.option("--variant", "variants", multiple=True, help="Only these variants (repeatable); base is kept.")
@click.option("--only-diff", is_flag=True, help="Only examples where an adapter's output differs from base.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "jsonl", "csv"]), default="table",
              show_default=True)
@click.option("--limit", type=int, default=None, help="At most this many examples.")
@pass_context
@_errors
def results(obj: Context, run_id: int, variants: tuple[str, ...], only_diff: bool, fmt: str,
            limit: int | None) -> None:
    """Outputs of RUN side by side, one example per row."""
    sessions = obj.sessions()
    with sessions() as session:
        if get_run(session, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        names = [v.name for v in run_variants(session, run_id)]
        records = side_by_side(session, run_id)
    unknown = [v for v in variants if v not in names]
    if unknown:
        raise UserError(f"run {run_id} has no variant {', '.join(unknown)} (it has {', '.join(names)})")
    shown = ["base", *[n for n in names if n != "base" and (not variants or n in variants)]]
    if only_diff:
        records = [r for r in records if any(
            v in r["variants"] and "base" in r["variants"]
            and r["variants"][v]["output"] != r["variants"]["base"]["output"] for v in shown[1:])]
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
                + [r["variants"].get(v, {}).get(f) for v in shown for f in fields] for r in records]
        if fmt == "csv":
            click.echo(display.to_csv(columns, rows))
        else:
            narrow = ["example_idx", "reference"] + [f"{v}.{f}" for v in shown for f in ("prediction", "correct")]
            keep = [columns.index(c) for c in narrow]
            click.echo(display.to_table(narrow, [[row[i] for i in keep] for row in rows], max_cell=40))


def _report_inputs(sessions: sessionmaker[Session], run_id: int) -> tuple[Any, list[str], list[dict[str, Any]]]:
    with sessions() as session:
        run = get_run(session, run_id)
        if run is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        names = [v.name for v in run_variants(session, run_id)]
        records = side_by_side(session, run_id)
    return run, names, records


def _elapsed(run: Any) -> float | None:
    if run.started_at is None or run.finished_at is None:
        return None
    return (run.finished_at - run.started_at).total_seconds() or None


@cli.command()
@click.argument("run_id", type=int)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report to this file.")
@pass_context
@_errors
def report(obj: Context, run_id: int, fmt: str, html_file: Path | None) -> None:
    """Per-variant scores with 95% intervals and paired comparisons of each adapter with base."""
    from .report import Verified, build_report, comparison_rows, variant_rows, verified_line

    sessions = obj.sessions()
    run, names, records = _report_inputs(sessions, run_id)
    with sessions() as session:
        verified = {name: Verified(name, v.sampled, v.agreed, v.device, v.dtype)
                    for name, v in latest_verifications(session, run_id).items()}
    result = build_report(run_id, records, names, elapsed_s=_elapsed(run), verified=verified)
    if html_file is not None:
        from .html_report import render_html

        meta = {"name": run.name, "status": run.status, "base": run.base_model, "dataset": run.dataset_path,
                "examples": run.n_examples}
        html_file.write_text(render_html(result, records, meta), encoding="utf-8")
        click.echo(f"wrote {html_file}", err=True)
    if fmt == "json":
        click.echo(display.to_json_object(result.to_json()))
        return
    click.echo(f"run {run_id} ({run.name}): {run.status}, {run.n_examples} examples")
    if not result.has_scores:
        click.echo("no references: this run has no scores; changed outputs and lengths only")
    columns, rows = variant_rows(result)
    click.echo(display.to_table(columns, rows))
    if result.comparisons:
        click.echo("")
        columns, rows = comparison_rows(result.comparisons)
        click.echo(display.to_table(columns, rows))
    line = verified_line(result)
    if line:
        click.echo(f"\n{line}")
    if result.rows_per_s:
        click.echo(f"\nthroughput: {result.rows_per_s:.2f} rows/s, {result.tokens_per_s:.1f} generated tokens/s")


@cli.command()
@click.argument("run_a", type=int)
@click.argument("run_b", type=int)
@click.option("--variant-a", default=None, help="Variant of RUN_A (default: its only adapter).")
@click.option("--variant-b", default=None, help="Variant of RUN_B (default: its only adapter).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_context
@_errors
def compare(obj: Context, run_a: int, run_b: int, variant_a: str | None, variant_b: str | None, fmt: str) -> None:
    """Paired statistics of a variant of RUN_B against a variant of RUN_A on the same dataset."""
    from .report import compare_runs, comparison_rows

    sessions = obj.sessions()
    run_1, names_a, records_a = _report_inputs(sessions, run_a)
    run_2, names_b, records_b = _report_inputs(sessions, run_b)
    if run_1.dataset_sha256 != run_2.dataset_sha256 or run_1.n_examples != run_2.n_examples:
        raise UserError(f"runs {run_a} and {run_b} are not on the same dataset "
                            f"({run_1.dataset_path} vs {run_2.dataset_path}); their examples cannot be paired")
    chosen = []
    for run_id, names, variant, flag in ((run_a, names_a, variant_a, "--variant-a"),
                                         (run_b, names_b, variant_b, "--variant-b")):
        adapters = [n for n in names if n != "base"]
        if variant is None:
            if len(adapters) != 1:
                raise UserError(f"run {run_id} has adapters {', '.join(adapters)}: choose one with {flag}")
            variant = adapters[0]
        if variant not in names:
            raise UserError(f"run {run_id} has no variant {variant} (it has {', '.join(names)})")
        chosen.append(variant)
    result = compare_runs(records_a, chosen[0], records_b, chosen[1], run_a=run_a, run_b=run_b)
    if fmt == "json":
        click.echo(display.to_json_object({"run_a": run_a, "variant_a": chosen[0], "run_b": run_b,
                                           "variant_b": chosen[1], "paired": result.paired, **result.to_json()}))
        return
    columns, rows = comparison_rows([result])
    click.echo(display.to_table(columns, rows))


@cli.command()
@click.argument("run_id", type=int)
@click.option("--sample", default=20, show_default=True, type=click.IntRange(min=1),
              help="Examples to regenerate, drawn with --seed; the same ones for every variant.")
@click.option("--device", default=None, help="Where to regenerate (default: where the run's chunks ran).")
@click.option("--seed", default=0, show_default=True, help="Seed of the draw of examples.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@pass_context
@_errors
def verify(obj: Context, run_id: int, sample: int, device: str | None, seed: int, fmt: str) -> None:
    """Regenerate a sample of RUN's rows with plain PEFT, one prompt at a time, on the run's device and dtype;
    print the agreement per variant and, for each disagreement, the logit gap at the first differing token
    (a near-tie shows a small gap, a bug a large one). The figures are recorded; `report` shows them."""
    from worker.verify import plan_verification, record_verification, run_verification

    from .report import agreement_share, agreement_text

    sessions = obj.sessions(migrate=True)
    with sessions() as session:
        if get_run(session, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        plan = plan_verification(session, obj.settings, run_id, sample=sample, device=device, seed=seed)
    click.echo(f"run {run_id}: regenerating {len(plan.examples)} examples x {len(plan.targets)} variants with plain "
               f"PEFT on {plan.device}, {plan.dtype}", err=True)
    result = run_verification(plan, on_variant=lambda v: click.echo(
        f"  {v.variant}: {agreement_text(v.agreed, v.sampled)} reproduced", err=True))
    with sessions.begin() as session:
        record_verification(session, result)
    if fmt == "json":
        click.echo(display.to_json_object(result.to_json()))
        return
    click.echo(f"run {run_id}: {len(result.examples)} examples regenerated alone with plain PEFT on {result.device}, "
               f"{result.dtype}")
    click.echo(display.to_table(["variant", "sampled", "agreed", "agreement"],
                                [[v.variant, v.sampled, v.agreed, agreement_share(v.agreed, v.sampled)]
                                 for v in result.variants]))
    found = [d for v in result.variants for d in v.disagreements]
    if not found:
        return

    def token(text: str | None, token_id: int | None) -> str:
        if text is None:
            return "(ended)"
        return repr(text) if token_id is None else f"{text!r} ({token_id})"

    click.echo("\ndisagreements: first differing token; gap = its logit for plain PEFT's token minus the run's")
    click.echo(display.to_table(
        ["variant", "example_idx", "token_position", "plain_token", "run_token", "gap"],
        [[d.variant, d.example_idx, "-" if d.position is None else d.position, token(d.plain_text, d.plain_token),
          token(d.run_text, d.run_token), "-" if d.gap is None else d.gap] for d in found]))
    if any(d.position is None for d in found):
        click.echo("rows stored without token ids are compared by text: their whole outputs are shown, without a gap")


@cli.command()
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds before the query is stopped.")
@pass_context
@_errors
def sql(obj: Context, query: str, fmt: str, timeout_s: float) -> None:
    """Run one read-only SQL QUERY against the results database (writes, ATTACH and pragmas are refused)."""
    result = run_readonly(obj.settings.database_url, query, timeout_s=timeout_s)
    if fmt == "json":
        click.echo(display.to_json(result.records()))
    elif fmt == "csv":
        click.echo(display.to_csv(result.columns, result.rows))
    else:
        click.echo(display.to_table(result.columns, result.rows))


# --- managing runs -----------------------------------------------------------------------------


@cli.command()
@click.argument("run_id", type=int)
@pass_context
@_errors
def cancel(obj: Context, run_id: int) -> None:
    """Stop RUN's queued work: no further chunks are generated (chunks in progress finish)."""
    sessions = obj.sessions()
    with sessions.begin() as session:
        if get_run(session, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        count = cancel_run(session, run_id)
    click.echo(f"run {run_id}: cancelled {count} queued chunk(s)")


@cli.command()
@click.argument("run_id", type=int)
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True)
@click.option("--here", is_flag=True, help="Run the requeued chunks in this process instead of on the broker.")
@click.option("--device", default="auto", show_default=True, help="With --here: auto, cpu, cuda, ...")
@pass_context
@_errors
def retry(obj: Context, run_id: int, queue: str, here: bool, device: str) -> None:
    """Requeue RUN's failed, cancelled and unfinished chunks (outputs already written are kept)."""
    sessions = obj.sessions(migrate=True)
    with sessions.begin() as session:
        if get_run(session, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        ids = requeue_run(session, run_id)
    if not ids:
        click.echo(f"run {run_id}: nothing to retry", err=True)
    elif here:
        from worker.runner import run_embedded

        run_embedded(sessions, obj.settings, run_id, device=device, on_progress=_progress_printer(True))
        click.echo(_summary(sessions, run_id))
    else:
        enqueue_chunks(make_client(obj.settings.broker_url), run_id, ids, queue=queue)
        click.echo(f"run {run_id}: requeued chunk(s) {', '.join(map(str, ids))}", err=True)
    click.echo(run_id)


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@pass_context
@_errors
def db_upgrade(obj: Context) -> None:
    """Apply every pending migration (safe to run any time; keeps all data)."""
    revision = upgrade(obj.engine)
    click.echo(f"database at revision {revision}")


def main() -> None:
    cli(prog_name="lora-compare")
