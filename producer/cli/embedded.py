"""The commands' work that runs a model in this process: embedded runs, `retry --here`, the worker,
`verify`.

The only module of producer/ that imports worker/ (import-linter checks it), and only inside its
functions: worker/ loads torch, transformers and peft, which `--help` and the commands that only read
SQL must not pay for.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import RunNotFoundError
from contract.settings import Settings
from db.engine import WORKER_REPLY_TIMEOUT_S, WORKER_STATEMENT_TIMEOUT_S, make_engine, session_factory
from db.enums import EMBEDDED_QUEUE, RunStatus
from db.runs import get_run

from ..submit import prepare_run, register_run
from .watching import progress_printer, summary

if TYPE_CHECKING:
    from . import Context


def run_here(obj: Context, config: Path, *, device: str | None, quiet: bool) -> int:
    """Register CONFIG's run and generate it in this process; print the summary, then the run id.
    Exit code 1 when the run does not complete."""
    from contract.config import load_config
    from worker.demo_model import prepare_demo_model
    from worker.runner import run_embedded

    sessions = obj.sessions(migrate=True)
    if load_config(config).model.is_demo:
        prepare_demo_model(obj.settings.demo_model_dir)
    prepared = prepare_run(config, obj.settings)
    with sessions.begin() as session:
        run_id = register_run(session, prepared, queue=EMBEDDED_QUEUE)
    click.echo(f"run {run_id}: {len(prepared.examples)} examples x {1 + len(prepared.adapters)} variants", err=True)
    final = run_embedded(sessions, obj.settings, run_id, device=device, on_progress=progress_printer(not quiet))
    click.echo(summary(sessions, run_id))
    click.echo(run_id)
    if final.status != RunStatus.COMPLETED:
        click.echo(f"Error: run {run_id} {final.status}: {final.error or 'see lora-compare status'}", err=True)
        raise SystemExit(1)
    return run_id


def retry_here(sessions: sessionmaker[Session], settings: Settings, run_id: int, *, device: str) -> None:
    """Generate a run's requeued chunks in this process, then print its summary."""
    from worker.runner import run_embedded

    run_embedded(sessions, settings, run_id, device=device, on_progress=progress_printer(True))
    click.echo(summary(sessions, run_id))


def serve(obj: Context, *, device: str, queues: list[str], max_adapters: int, max_attempts: int,
          visibility_timeout_s: int, hostname: str | None, model_roots: tuple[Path, ...]) -> None:
    """Run a Celery worker (solo pool, model resident) until it is stopped."""
    import logging

    from worker.runner import serve as serve_queues

    if model_roots:
        obj.settings = replace(obj.settings, model_roots=model_roots)
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    obj.sessions(migrate=True)
    obj.engine.dispose()
    # The worker's own engine: a longer reply limit than the CLI's and a server-side statement timeout,
    # so a silent cut reaches the logged write-retry path instead of blocking the worker.
    engine = make_engine(obj.settings.database_url, reply_timeout_s=WORKER_REPLY_TIMEOUT_S,
                         statement_timeout_s=WORKER_STATEMENT_TIMEOUT_S)
    serve_queues(session_factory(engine), obj.settings, device=device, queues=queues, max_adapters=max_adapters,
                 max_attempts=max_attempts, visibility_timeout_s=visibility_timeout_s, hostname=hostname)


def verify(sessions: sessionmaker[Session], settings: Settings, run_id: int, *, sample: int, device: str | None,
           seed: int) -> Any:
    """Regenerate a sample of a run's rows with plain PEFT, record the agreement and return it (a
    `worker.verify.VerifyResult`); progress goes to stderr."""
    from worker.verify import plan_verification, record_verification, run_verification

    from ..report import agreement_text

    with sessions() as session:
        if get_run(session, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        plan = plan_verification(session, settings, run_id, sample=sample, device=device, seed=seed)
    click.echo(f"run {run_id}: regenerating {len(plan.examples)} examples x {len(plan.targets)} variants with plain "
               f"PEFT on {plan.device}, {plan.dtype}", err=True)
    result = run_verification(plan, on_variant=lambda v: click.echo(
        f"  {v.variant}: {agreement_text(v.agreed, v.sampled)} reproduced", err=True))
    with sessions.begin() as session:
        record_verification(session, result)
    return result


def export_demo(obj: Context, config: Path, target: Path) -> None:
    """Prepare the demo model (in the cache) and write the demo's files in the data-folder layout into
    `target`, or as a tar stream on stdout for `-`."""
    import sys

    from worker.demo_model import prepare_demo_model

    from ..demo_export import demo_layout, write_layout, write_tar

    files = demo_layout(prepare_demo_model(obj.settings.demo_model_dir), config)
    if str(target) == "-":
        write_tar(files, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        click.echo(f"exported the demo ({len(files)} files) as a tar stream", err=True)
        return
    write_layout(files, target)
    click.echo(f"exported the demo to {target}: submit {target / 'configs' / 'demo.yaml'}", err=True)
