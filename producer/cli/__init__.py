"""The `lora-compare` command line (Click).

Library code raises; the group (`_Group.invoke`) turns the project's errors into one line on stderr
and a non-zero exit, for every command, those added later included. Data goes to stdout; progress and
logs go to stderr. A command that creates a run prints the run id alone on the last line of stdout.

The commands live by purpose: `running` (run, demo, submit, worker, cancel, retry, verify), `reading`
(status, results, report, compare, sql), `database` (db upgrade); `options` holds the option
decorators several commands share. `embedded` is the only module of producer/ that imports worker/,
and only inside its functions: torch, transformers and peft are loaded only by the commands that run
a model (`run`, `demo`, `worker`, `retry --here`, `verify`), never by `--help`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from contract.errors import LoraCompareError
from contract.settings import (
    BROKER_PASSWORD_ENV,
    DATABASE_PASSWORD_ENV,
    DEFAULT_BROKER_URL,
    DEFAULT_DATABASE_URL,
    Settings,
    with_password,
)
from db.engine import make_engine, session_factory
from db.migrate import upgrade
from db.readonly import QueryError

#: The demo's config, shipped inside the package (producer/demo/) with its dataset and adapter, so an
#: installed lora-compare runs the demo from any folder; examples/ in a checkout links to these files.
DEMO_CONFIG = Path(__file__).resolve().parent.parent / "demo" / "demo.yaml"


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


def translate_errors(err: BaseException) -> click.ClickException | None:
    """The one-line `ClickException` for one of the project's errors (or an unreachable database), or
    None for anything else (a bug: its traceback is worth seeing)."""
    if isinstance(err, LoraCompareError):  # UserError, and a chunk error met by a command that generates
        return click.ClickException(str(err))
    if isinstance(err, QueryError):
        return click.ClickException(f"sql: {err}")
    if isinstance(err, OperationalError):
        first = str(err.orig if err.orig is not None else err).strip().splitlines()[0]
        return click.ClickException(f"database error: {first}")
    if isinstance(err, OSError) and err.filename is not None:  # a file we could not read or write
        return click.ClickException(f"{err.filename}: {err.strerror or err}")
    if isinstance(err, ProgrammingError):
        first = str(err.orig if err.orig is not None else err).strip().splitlines()[0]
        return click.ClickException(
            f"database error: {first} (is the schema created? run `lora-compare db upgrade`)")
    return None


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
    """The top-level group: its connection options are accepted before or after the subcommand
    (DESIGN.md), and every command under it (nested groups included) has its errors translated here."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist(list(args)))

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as err:
            translated = translate_errors(err)
            if translated is None:
                raise
            raise translated from None


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
    ctx.obj = Context(Settings(database_url=with_password(database_url, os.environ.get(DATABASE_PASSWORD_ENV)),
                               broker_url=with_password(broker_url, os.environ.get(BROKER_PASSWORD_ENV)),
                               cache_dir=base.cache_dir, model_roots=base.model_roots))


pass_context = click.make_pass_decorator(Context)


def main() -> None:
    cli(prog_name="lora-compare")


# The commands register themselves on `cli` when imported; they need `cli`, `Context` and `pass_context`
# above, hence the imports down here (`--help` lists the commands sorted by name).
from . import running, reading, database  # noqa: E402, F401, I001
