"""``flask credits …``: migrations, balances, the OpenAPI document."""

from __future__ import annotations

import json

import click
from flask import current_app
from sqlalchemy.engine import Engine

from . import migrate
from .blueprint import credits_bp
from .extension import current_ledger
from .money import format_units

__all__: list[str] = []

cli = credits_bp.cli


def _engine() -> Engine:
    engine: Engine = current_app.extensions["sqlalchemy"].engine
    return engine


@cli.group("db")
def db_group() -> None:
    """Apply the library's migrations to the app's database."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the credits tables to REVISION (default: head)."""
    migrate.upgrade(_engine(), revision)
    click.echo(f"credits schema at {migrate.current(_engine())}")


@db_group.command("downgrade")
@click.argument("revision", default="base")
def db_downgrade(revision: str) -> None:
    """Downgrade the credits tables to REVISION (default: base, i.e. drop them)."""
    migrate.downgrade(_engine(), revision)
    click.echo(f"credits schema at {migrate.current(_engine()) or 'base'}")


@db_group.command("current")
def db_current() -> None:
    """Print the applied revision and the newest shipped one."""
    applied = migrate.current(_engine())
    click.echo(f"{applied or 'base'} (head: {migrate.head()})")


@cli.command("balance")
@click.argument("user_id")
def balance(user_id: str) -> None:
    """Print USER_ID's balance, held and available amounts."""
    found = current_ledger().find_by_user_id(user_id)
    if found is None:
        click.echo(f"{user_id}: no balance (0.0000000)")
        return
    click.echo(
        f"{user_id}: balance {format_units(found.balance_units)} "
        f"held {format_units(found.held_units)} "
        f"available {format_units(found.available_units)}"
    )


@cli.command("openapi")
@click.option("--prefix", default="/api/billing", show_default=True)
def openapi(prefix: str) -> None:
    """Print the OpenAPI document."""
    from .openapi import build_document

    click.echo(json.dumps(build_document(prefix), indent=2))
