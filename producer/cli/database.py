"""`lora-compare db ...`: the database schema."""

from __future__ import annotations

import click

from db.migrate import upgrade

from . import Context, cli, pass_context


@cli.group()
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
@pass_context
def db_upgrade(obj: Context) -> None:
    """Apply every pending migration (safe to run any time; keeps all data)."""
    revision = upgrade(obj.engine)
    click.echo(f"database at revision {revision}")
