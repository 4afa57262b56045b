"""Commands that create, run or change runs: run, demo, submit, worker, cancel, retry, verify.

What needs the model (worker/) is done by `embedded`, imported inside the commands that need it.
"""

from __future__ import annotations

from pathlib import Path

import click

from contract.errors import BrokerUnavailableError, RunNotFoundError, UserError
from contract.queue import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT_S,
    check_broker,
    enqueue_chunks,
    make_client,
)
from contract.settings import DEFAULT_MAX_ADAPTERS
from db.enums import EMBEDDED_QUEUE
from db.runs import cancel_run, delete_run, get_run, requeue_run

from .. import display
from ..submit import prepare_run, register_run
from . import DEMO_CONFIG, Context, cli, pass_context
from .options import DEVICES, device_option, format_option, queue_option, quiet_option, run_argument
from .watching import summary, watch


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@device_option()
@quiet_option
@pass_context
def run(obj: Context, config: Path, device: str, quiet: bool) -> None:
    """Run CONFIG end to end in this process (embedded mode) and print a summary, then the run id."""
    from .embedded import run_here

    run_here(obj, config, device=device, quiet=quiet)


@cli.command()
@click.option("--config", "config", type=click.Path(path_type=Path), default=DEMO_CONFIG, show_default=True,
              help="The demo config to run.")
@click.option("--export", "export_to", type=click.Path(file_okay=False, allow_dash=True, path_type=Path),
              default=None, help="Instead of running it: prepare the demo model and write it, the adapter, the "
              "dataset and a config into this folder, laid out as docs/deploying.md says for /data "
              "(`-`: a tar stream on stdout).")
@device_option()
@quiet_option
@pass_context
def demo(obj: Context, config: Path, export_to: Path | None, device: str, quiet: bool) -> None:
    """Prepare the bundled SmolLM2-135M-Instruct model and demo adapter, then run the demo end to end."""
    from .embedded import export_demo, run_here

    if not config.is_file():
        raise click.ClickException(f"{config}: the demo config is missing")
    if export_to is not None:
        export_demo(obj, config, export_to)
        return
    run_here(obj, config, device=device, quiet=quiet)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@queue_option(help="Broker queue for this run's chunks.")
@click.option("--wait", is_flag=True, help="Wait for the run to finish, showing progress.")
@pass_context
def submit(obj: Context, config: Path, queue: str, wait: bool) -> None:
    """Validate CONFIG, record the run in SQL and queue one job per chunk; print the run id."""
    if queue == EMBEDDED_QUEUE:
        raise UserError(f"--queue {queue}: that name marks runs generated in-process; choose another queue name")
    sessions = obj.sessions(migrate=True)
    prepared = prepare_run(config, obj.settings, require_base=False)
    # Atomic: the broker must answer before the run is recorded, and a run whose messages could not all
    # be sent is removed again, so no run is left `queued` with nothing in the queue (docs/deploying.md).
    client = make_client(obj.settings.broker_url)
    check_broker(client)
    with sessions.begin() as session:
        run_id = register_run(session, prepared, queue=queue)
        chunks = list(range(get_run(session, run_id).n_chunks))  # type: ignore[union-attr]
    try:
        sent = enqueue_chunks(client, run_id, chunks, queue=queue)
    except BrokerUnavailableError as err:
        try:
            with sessions.begin() as session:
                delete_run(session, run_id)
        except Exception as cleanup:  # noqa: BLE001 - the database went too: say what is left behind
            raise BrokerUnavailableError(f"{err}; run {run_id} was recorded but could not be removed "
                                         f"({' '.join(str(cleanup).split())[:200]}): `lora-compare retry "
                                         f"{run_id}` queues it once the broker answers") from None
        raise BrokerUnavailableError(f"{err}; nothing was recorded") from None
    click.echo(f"run {run_id}: {len(prepared.examples)} examples, {sent} chunks queued on '{queue}'", err=True)
    if wait:
        watch(sessions, run_id)
        click.echo(summary(sessions, run_id))
    click.echo(run_id)


@cli.command()
@device_option()
@click.option("--queues", default=DEFAULT_QUEUE, show_default=True, help="Comma-separated queues to consume.")
@click.option("--max-adapters", default=DEFAULT_MAX_ADAPTERS, show_default=True, help="Adapters kept resident (LRU).")
@click.option("--max-attempts", default=DEFAULT_MAX_ATTEMPTS, show_default=True,
              help="Starts of a chunk before it is failed.")
@click.option("--visibility-timeout", default=DEFAULT_VISIBILITY_TIMEOUT_S, show_default=True,
              help="Seconds before Redis redelivers an unacknowledged chunk; longer than the slowest chunk.")
@click.option("--hostname", default=None, help="Worker name (default: host:pid).")
@click.option("--model-root", "model_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Load models and adapters only from under this folder (repeatable; env LORA_COMPARE_MODEL_ROOTS).")
@pass_context
def worker(obj: Context, device: str, queues: str, max_adapters: int, max_attempts: int,
           visibility_timeout: int, hostname: str | None, model_roots: tuple[Path, ...]) -> None:
    """A GPU worker: one Celery process (solo pool) with the model and adapters resident."""
    from .embedded import serve

    serve(obj, device=device, queues=[q.strip() for q in queues.split(",") if q.strip()], max_adapters=max_adapters,
          max_attempts=max_attempts, visibility_timeout_s=visibility_timeout, hostname=hostname,
          model_roots=model_roots)


@cli.command()
@run_argument
@pass_context
def cancel(obj: Context, run_id: int) -> None:
    """Stop RUN's queued work: no further chunks are generated (chunks in progress finish)."""
    sessions = obj.sessions()
    with sessions.begin() as session:
        if get_run(session, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        count = cancel_run(session, run_id)
    click.echo(f"run {run_id}: cancelled {count} queued chunk(s)")


@cli.command()
@run_argument
@queue_option()
@click.option("--here", is_flag=True, help="Run the requeued chunks in this process instead of on the broker.")
@device_option(help=f"With --here: {DEVICES}")
@pass_context
def retry(obj: Context, run_id: int, queue: str, here: bool, device: str) -> None:
    """Requeue RUN's failed, cancelled and unfinished chunks (outputs already written are kept)."""
    sessions = obj.sessions(migrate=True)
    if not here:
        check_broker(make_client(obj.settings.broker_url))
    with sessions.begin() as session:
        if get_run(session, run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id}")
        ids = requeue_run(session, run_id, queue=EMBEDDED_QUEUE if here else queue)
    if not ids:
        click.echo(f"run {run_id}: nothing to retry", err=True)
    elif here:
        from .embedded import retry_here

        retry_here(sessions, obj.settings, run_id, device=device)
    else:
        enqueue_chunks(make_client(obj.settings.broker_url), run_id, ids, queue=queue)
        click.echo(f"run {run_id}: requeued chunk(s) {', '.join(map(str, ids))}", err=True)
    click.echo(run_id)


@cli.command()
@run_argument
@click.option("--sample", default=20, show_default=True, type=click.IntRange(min=1),
              help="Examples to regenerate, drawn with --seed; the same ones for every variant.")
@device_option(default=None, help="Where to regenerate (default: where the run's chunks ran).")
@click.option("--seed", default=0, show_default=True, help="Seed of the draw of examples.")
@format_option("table", "json")
@pass_context
def verify(obj: Context, run_id: int, sample: int, device: str | None, seed: int, fmt: str) -> None:
    """Regenerate a sample of RUN's rows with plain PEFT, one prompt at a time, on the run's device and dtype;
    print the agreement per variant and, for each disagreement, the logit gap at the first differing token
    (a near-tie shows a small gap, a bug a large one). The figures are recorded; `report` shows them."""
    from ..report import agreement_share
    from .embedded import verify as regenerate

    result = regenerate(obj.sessions(migrate=True), obj.settings, run_id, sample=sample, device=device, seed=seed)
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
