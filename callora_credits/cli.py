"""``flask credits …``: migrations, balances, the OpenAPI document."""

from __future__ import annotations

import json

import click
from sqlalchemy.engine import Engine

from . import migrate
from .config import config
from .core.money import AmountError, format_units, parse_amount
from .errors import CreditsError
from .extension import current_ledger, engine_for
from .http.blueprint import credits_bp

__all__: list[str] = []

cli = credits_bp.cli


def _engine() -> Engine:
    """The engine the credits tables live on (``CREDITS_BIND_KEY``)."""
    return engine_for(config())


def _where(engine: Engine) -> str:
    """`` on bind 'key' (url)`` when the tables are on a bind, else nothing."""
    bind_key = config().bind_key
    if bind_key is None:
        return ""
    return f" on bind {bind_key!r} ({engine.url.render_as_string(hide_password=True)})"


@cli.group("db")
def db_group() -> None:
    """Apply the library's migrations to the app's database (or CREDITS_BIND_KEY's bind)."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the credits tables to REVISION (default: head)."""
    engine = _engine()
    migrate.upgrade(engine, revision)
    click.echo(f"credits schema at {migrate.current(engine)}{_where(engine)}")


@db_group.command("downgrade")
@click.argument("revision", default="base")
def db_downgrade(revision: str) -> None:
    """Downgrade the credits tables to REVISION (default: base, i.e. drop them)."""
    engine = _engine()
    migrate.downgrade(engine, revision)
    click.echo(f"credits schema at {migrate.current(engine) or 'base'}{_where(engine)}")


@db_group.command("current")
def db_current() -> None:
    """Print the applied revision and the newest shipped one."""
    engine = _engine()
    applied = migrate.current(engine)
    click.echo(f"{applied or 'base'} (head: {migrate.head()}){_where(engine)}")


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


@cli.command("topup")
@click.argument("user_id")
@click.argument("amount")
@click.option("--reference", default=None, help="External payment id; credits at most once.")
@click.option("--description", default=None)
def topup(user_id: str, amount: str, reference: str | None, description: str | None) -> None:
    """Credit AMOUNT USDC (e.g. 10.5) to USER_ID."""
    ledger = current_ledger()
    try:
        units = parse_amount(amount, max_units=ledger.config.max_amount_units)
        entry = ledger.top_up(
            user_id, units, reference=reference, description=description, actor_id="cli"
        )
    except (AmountError, CreditsError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{entry.id} seq {entry.seq}: +{format_units(entry.amount_units)} -> "
        f"{format_units(entry.balance_after_units)}"
    )


@cli.command("history")
@click.argument("user_id")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def history(user_id: str, limit: int) -> None:
    """Print USER_ID's newest ledger entries."""
    page = current_ledger().history(user_id, limit=limit)
    for entry in page.entries:
        click.echo(
            f"{entry.seq:>6} {entry.created_at:%Y-%m-%d %H:%M:%S} {entry.type:<12} "
            f"{format_units(entry.amount_units):>22} {format_units(entry.balance_after_units):>22}"
            f" {entry.id} {entry.reference or ''}"
        )
    if page.has_more:
        click.echo("… (more: raise --limit)")


@cli.command("reconcile")
@click.option("--user", "user_id", default=None, help="Check only this user.")
def reconcile(user_id: str | None) -> None:
    """Check every balance against its ledger; exit 1 on any mismatch."""
    report = current_ledger().reconcile(user_id)
    for mismatch in report.mismatches:
        click.echo(f"MISMATCH {mismatch.user_id}: {mismatch.problem}", err=True)
    click.echo(
        f"checked {report.accounts} accounts, {report.entries} entries: "
        f"{'ok' if report.ok else f'{len(report.mismatches)} mismatches'}"
    )
    if not report.ok:
        raise SystemExit(1)


@cli.command("expire-holds")
def expire_holds() -> None:
    """Mark pending holds past their expiry as expired (tidiness only)."""
    count = current_ledger().expire_holds()
    click.echo(f"marked {count} holds expired")


@cli.command("prune")
def prune() -> None:
    """Delete idempotency keys past CREDITS_IDEMPOTENCY_TTL_SECONDS."""
    count = current_ledger().prune_idempotency_keys()
    click.echo(f"deleted {count} expired idempotency keys")


@cli.command("openapi")
@click.option("--prefix", default="/api/billing", show_default=True)
def openapi(prefix: str) -> None:
    """Print the OpenAPI document."""
    from .http.openapi import build_document

    click.echo(json.dumps(build_document(prefix), indent=2))
