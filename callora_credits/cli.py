"""``flask credits …``: migrations, balances, checks, the OpenAPI document.

The group is registered on the app by ``credits_bp`` and is also a
``flask.commands`` plugin (see ``setup.py``), so ``flask credits`` exists even
when the app cannot be imported, and can then say why in one line (a missing
database driver) instead of Flask's ``No such command 'credits'``.
"""

from __future__ import annotations

import json
import traceback
from datetime import datetime
from typing import Any

import click
from flask import Flask, current_app
from flask.cli import AppGroup, ScriptInfo
from sqlalchemy.engine import Engine

from . import migrate
from .config import config
from .core.money import AmountError, format_units, parse_amount
from .core.usage import Granularity
from .errors import CreditsError, ServiceUnavailable
from .extension import EXTENSION_KEY, current_ledger, engine_for
from .http.blueprint import credits_bp

__all__ = ["CreditsGroup", "cli", "missing_driver_message"]

#: What to do about a missing driver, by the module SQLAlchemy's dialect
#: imports. The extras install psycopg 3 and PyMySQL, which the bare
#: ``postgresql://`` (on SQLAlchemy 2.0) and ``mysql://`` do not use.
_DRIVER_FIXES = {
    "psycopg2": "write postgresql+psycopg://… and install callora-credits[postgres]",
    "psycopg": "install callora-credits[postgres]",
    "MySQLdb": "write mysql+pymysql://… and install callora-credits[mysql]",
    "pymysql": "install callora-credits[mysql]",
}
_SUPPORTED = (
    "write postgresql+psycopg://… (extra postgres), mysql+pymysql://… (extra mysql) or sqlite:///…"
)


def missing_driver_message(error: BaseException) -> str | None:
    """One line naming the extra to install, when ``error`` is a missing driver.

    ``error`` is what loading the app raised; the driver's
    :class:`ModuleNotFoundError` may be its cause or context (Flask wraps an
    import error in the app module). ``None`` for anything else.
    """
    seen: set[int] = set()
    found: BaseException | None = error
    while found is not None and id(found) not in seen:
        seen.add(id(found))
        if isinstance(found, ModuleNotFoundError) and _raised_by_sqlalchemy(found):
            fix = _DRIVER_FIXES.get(found.name or "", _SUPPORTED)
            name = found.name
            return f"The database URL needs the driver {name}, which is not installed: {fix}."
        found = found.__cause__ or found.__context__
    return None


def _raised_by_sqlalchemy(error: ModuleNotFoundError) -> bool:
    # A dialect imports its driver in import_dbapi(); the same module missing
    # anywhere else is the host's own import, not a database URL.
    return any(frame.name == "import_dbapi" for frame in traceback.extract_tb(error.__traceback__))


class CreditsGroup(AppGroup):
    """The ``flask credits`` group: loads the app itself before any command.

    So a missing database driver, or an app without ``credits_bp``, is one
    ``Error:`` line and exit status 1 rather than a traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        if not current_app:
            ctx.with_resource(_load_app(ctx).app_context())
        if EXTENSION_KEY not in current_app.extensions:
            raise click.ClickException(
                "callora_credits is not set up on this app: call "
                'app.register_blueprint(credits_bp, url_prefix="/api/billing") in it.'
            )
        try:
            return super().invoke(ctx)
        except ServiceUnavailable as exc:
            raise _refused(exc) from None


#: ``EX_TEMPFAIL`` (sysexits.h): a temporary failure, worth running again.
EXIT_TEMPFAIL = 75


class _TemporaryFailure(click.ClickException):
    """One ``Error:`` line and exit status 75: run the same command again later."""

    exit_code = EXIT_TEMPFAIL


def _refused(exc: Exception) -> click.ClickException:
    """What a command answers when the ledger refuses it: exit status 75 if
    the database is unavailable (a retry may succeed), else 1."""
    if isinstance(exc, ServiceUnavailable):
        return _TemporaryFailure(
            f"the database is unavailable ({exc.reason}) after the retries; run the "
            "command again later."
        )
    return click.ClickException(str(exc))


def _load_app(ctx: click.Context) -> Flask:
    try:
        return ctx.ensure_object(ScriptInfo).load_app()
    except Exception as exc:
        message = missing_driver_message(exc)
        if message is None:
            raise
        raise click.ClickException(message) from None


cli = CreditsGroup(
    "credits",
    help="The credits ledger of this app: its tables, balances and checks.",
    short_help="Manage the credits ledger and its tables.",
)
credits_bp.cli = cli


def _engine() -> Engine:
    """The engine the credits tables live on (``CREDITS_BIND_KEY``)."""
    return engine_for(config())


def _where(engine: Engine) -> str:
    """`` on bind 'key' (url)`` when the tables are on a bind, else nothing."""
    bind_key = config().bind_key
    if bind_key is None:
        return ""
    return f" on bind {bind_key!r} ({engine.url.render_as_string(hide_password=True)})"


#: What --since and --until accept: a date, or a date and a UTC time.
_WHEN_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M"]


def _count(number: int, singular: str, plural: str | None = None) -> str:
    """``1 account``, ``2 accounts``; ``plural`` for the irregular ones."""
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


@cli.group("db", short_help="Create, upgrade or drop the credits tables.")
def db_group() -> None:
    """Apply the library's own migrations to the credits database.

    That is the app's default database, or the bind CREDITS_BIND_KEY names.
    """


@db_group.command("upgrade", short_help="Create or upgrade the credits tables.")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the credits tables to REVISION (default: head)."""
    engine = _engine()
    migrate.upgrade(engine, revision)
    click.echo(f"credits schema at {migrate.current(engine)}{_where(engine)}")


@db_group.command("downgrade", short_help="Downgrade the credits tables; base drops them.")
@click.argument("revision", default="base")
def db_downgrade(revision: str) -> None:
    """Downgrade the credits tables to REVISION.

    The default, base, drops the credits tables and their data.
    """
    engine = _engine()
    migrate.downgrade(engine, revision)
    click.echo(f"credits schema at {migrate.current(engine) or 'base'}{_where(engine)}")


@db_group.command("current", short_help="Print the applied and the newest revision.")
def db_current() -> None:
    """Print the applied revision and the newest one this version ships."""
    engine = _engine()
    applied = migrate.current(engine)
    click.echo(f"{applied or 'base'} (head: {migrate.head()}){_where(engine)}")


@cli.command("balance", short_help="Print a user's balance, held and available.")
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


@cli.command("topup", short_help="Credit an amount of USDC to a user.")
@click.argument("user_id")
@click.argument("amount")
@click.option("--reference", default=None, help="External payment id; credits at most once.")
@click.option("--description", default=None, help="Free text kept on the entry.")
def topup(user_id: str, amount: str, reference: str | None, description: str | None) -> None:
    """Credit AMOUNT USDC to USER_ID.

    AMOUNT is written as in the API, without quotes: 25, 10.5, 0.0000001.
    """
    ledger = current_ledger()
    try:
        units = parse_amount(amount, max_units=ledger.config.max_amount_units)
        entry = ledger.top_up(
            user_id, units, reference=reference, description=description, actor_id="cli"
        )
    except (AmountError, CreditsError) as exc:
        raise _refused(exc) from None
    click.echo(
        f"{entry.id} seq {entry.seq}: +{format_units(entry.amount_units)} -> "
        f"{format_units(entry.balance_after_units)}"
    )


@cli.command("history", short_help="Print a user's newest ledger entries.")
@click.argument("user_id")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def history(user_id: str, limit: int) -> None:
    """Print USER_ID's newest ledger entries, newest first."""
    page = current_ledger().history(user_id, limit=limit)
    for entry in page.items:
        click.echo(
            f"{entry.seq:>6} {entry.created_at:%Y-%m-%d %H:%M:%S} {entry.type:<12} "
            f"{format_units(entry.amount_units):>22} {format_units(entry.balance_after_units):>22}"
            f" {entry.id} {entry.reference or ''}"
        )
    if page.has_more:
        click.echo("… (more: raise --limit)")


@cli.command("usage", short_help="Print a user's usage per day or hour.")
@click.argument("user_id")
@click.option(
    "--since",
    type=click.DateTime(_WHEN_FORMATS),
    default=None,
    help="Inclusive, UTC (default: 30 days before --until).",
)
@click.option(
    "--until",
    type=click.DateTime(_WHEN_FORMATS),
    default=None,
    help="Exclusive, UTC (default: now).",
)
@click.option(
    "--granularity", type=click.Choice(["day", "hour"]), default="day", show_default=True
)
def usage(
    user_id: str, since: datetime | None, until: datetime | None, granularity: Granularity
) -> None:
    """Print USER_ID's usage: one line per UTC day or hour, oldest first,
    then when the available balance runs out at the last 7 days' pace."""
    try:
        summary = current_ledger().usage(user_id, since, until, granularity)
    except ServiceUnavailable as exc:
        raise _refused(exc) from None
    except CreditsError as exc:
        details = "; ".join(f"{d.get('field')}: {d.get('message')}" for d in exc.details)
        raise click.ClickException(details or str(exc)) from None
    click.echo(
        f"{'start (UTC)':<16} {'debited':>20} {'credited':>20} {'expired':>20} {'entries':>7}"
    )
    stamp = "%Y-%m-%d %H:%M" if granularity == "hour" else "%Y-%m-%d"
    for bucket in summary.buckets:
        click.echo(
            f"{bucket.start.strftime(stamp):<16} {format_units(bucket.debited_units):>20} "
            f"{format_units(bucket.credited_units):>20} "
            f"{format_units(bucket.expired_units):>20} {bucket.count:>7}"
        )
    estimate = summary.depletion_estimate
    if estimate is None:
        click.echo("depletion: none (nothing debited in the last 7 days)")
    else:
        click.echo(
            f"depletion: {estimate.at:%Y-%m-%d %H:%M} UTC at "
            f"{format_units(estimate.daily_burn_units)} a day"
        )


@cli.command("reconcile", short_help="Check every balance against its ledger.")
@click.option("--user", "user_id", default=None, help="Check only this user.")
def reconcile(user_id: str | None) -> None:
    """Check every balance against its ledger.

    Exits with status 1 and one MISMATCH line per problem if any is found.
    """
    report = current_ledger().reconcile(user_id)
    for mismatch in report.mismatches:
        click.echo(f"MISMATCH {mismatch.user_id}: {mismatch.problem}", err=True)
    outcome = "ok" if report.ok else _count(len(report.mismatches), "mismatch", "mismatches")
    click.echo(
        f"checked {_count(report.accounts, 'account')}, "
        f"{_count(report.entries, 'entry', 'entries')}: {outcome}"
    )
    if not report.ok:
        raise SystemExit(1)


@cli.command("grants", short_help="Print a user's credit grants.")
@click.argument("user_id")
@click.option(
    "--status",
    type=click.Choice(["scheduled", "active", "depleted", "expired", "voided", "all"]),
    default=None,
    help="Only grants in this status, or all. Default: active and scheduled.",
)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def grants(user_id: str, status: str | None, limit: int) -> None:
    """Print USER_ID's grants, newest first, as of now.

    Columns: id, status, category, priority, amount, remaining, held, when it
    takes effect and when it expires (UTC).
    """
    try:
        page = current_ledger().grants(user_id, status=status, limit=limit)
    except CreditsError as exc:
        raise _refused(exc) from None
    if not page.items:
        which = {None: "active or scheduled ", "all": ""}.get(status, f"{status} ")
        click.echo(f"{user_id}: no {which}grants")
        return
    click.echo(
        f"{'id':<30} {'status':<9} {'category':<11} {'prio':>4} {'amount':>20} "
        f"{'remaining':>20} {'held':>20} {'effective (UTC)':<19} expires (UTC)"
    )
    for grant in page.items:
        expires = "never" if grant.expires_at is None else f"{grant.expires_at:%Y-%m-%d %H:%M:%S}"
        click.echo(
            f"{grant.id:<30} {grant.status:<9} {grant.category:<11} {grant.priority:>4} "
            f"{format_units(grant.amount_units):>20} {format_units(grant.remaining_units):>20} "
            f"{format_units(grant.held_units):>20} {grant.effective_at:%Y-%m-%d %H:%M:%S} "
            f"{expires}"
        )
    if page.has_more:
        click.echo("… (more: raise --limit)")


def _settle() -> None:
    count = current_ledger().settle_grants()
    click.echo(f"settled what was due: {_count(count, 'event')} written")


@cli.command("settle-grants", short_help="Write due grant expiries and activations.")
def settle_grants() -> None:
    """Write the ledger entries of what has fallen due on every account.

    Grants that expired or took effect, and holds that expired, one account
    per transaction. Reads are exact without it (they count what is due);
    this moves each account's history and updated_at along. Safe to run
    concurrently and repeatedly: nothing is written twice.
    """
    _settle()


@cli.command("expire-holds", short_help="Settle expired holds and all else due.")
def expire_holds() -> None:
    """Settle expired holds, and with them everything else due: settle-grants.

    An expired hold stops counting the moment it expires; this writes what
    its expiry gave back, and marks it expired.
    """
    _settle()


@cli.command("prune", short_help="Delete expired idempotency keys.")
def prune() -> None:
    """Delete idempotency keys older than CREDITS_IDEMPOTENCY_TTL_SECONDS."""
    count = current_ledger().prune_idempotency_keys()
    click.echo(f"deleted {_count(count, 'expired idempotency key')}")


@cli.command("openapi", short_help="Print the OpenAPI document.")
@click.option("--prefix", default="/api/billing", show_default=True)
def openapi(prefix: str) -> None:
    """Print the OpenAPI document, with paths under PREFIX."""
    from .http.openapi import build_document

    click.echo(json.dumps(build_document(prefix), indent=2))
