"""Options and arguments several commands share, declared once here (name, type, choices, help)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from contract.queue import DEFAULT_QUEUE

F = TypeVar("F", bound=Callable[..., Any])

#: What `--device` takes, in its help.
DEVICES = "auto, cpu, cuda, cuda:1, ..."


def device_option(*, default: str | None = "auto", help: str = DEVICES) -> Callable[[F], F]:
    """`--device`: where a model runs (`run`, `demo`, `worker`, `retry --here`, `verify`)."""
    return click.option("--device", default=default, show_default=default is not None, help=help)


def format_option(*choices: str) -> Callable[[F], F]:
    """`--format` (the parameter `fmt`) among `choices`; the first is the default."""
    return click.option("--format", "fmt", type=click.Choice(list(choices)), default=choices[0], show_default=True)


def queue_option(help: str | None = None) -> Callable[[F], F]:
    """`--queue`: the broker queue a run's chunks go on."""
    return click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help=help)


#: `-q/--quiet`: no progress bar (the commands that run a model here).
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")

#: RUN: a run id.
run_argument = click.argument("run_id", type=int)
