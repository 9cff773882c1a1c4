"""`flask credits …` on every engine."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from conftest import Databases, make_app
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.db.models import Account

U = 10_000_000


def test_topup_balance_history(app, user_id):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["credits", "topup", user_id, "12.5", "--reference", "r1"])
    assert result.exit_code == 0, result.output
    assert "+12.5000000" in result.output
    again = runner.invoke(args=["credits", "topup", user_id, "1", "--reference", "r1"])
    assert again.exit_code == 1
    assert "reference" in again.output.lower()
    balance = runner.invoke(args=["credits", "balance", user_id])
    assert "balance 12.5000000" in balance.output
    history = runner.invoke(args=["credits", "history", user_id])
    assert "topup" in history.output
    assert "r1" in history.output
    bad = runner.invoke(args=["credits", "topup", user_id, "1.123456789"])
    assert bad.exit_code == 1
    assert "balance 12.5000000" in runner.invoke(args=["credits", "balance", user_id]).output


def test_reconcile_reports_a_tampered_balance(app, user_id):
    runner = app.test_cli_runner()
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 50)
        ledger.charge(user_id, 20)
        assert ledger.reconcile(user_id).ok
        assert ledger_problems(ledger.engine, user_id) == []
    clean = runner.invoke(args=["credits", "reconcile", "--user", user_id])
    assert clean.exit_code == 0, clean.output
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.begin() as conn:
            t = Account.__table__
            conn.execute(sa.update(t).where(t.c.user_id == user_id).values(balance_units=31))
        report = current_ledger().reconcile(user_id)
        assert not report.ok
        assert {m.user_id for m in report.mismatches} == {user_id}
        assert ledger_problems(engine, user_id) == [
            "balance 31 != SUM(amount_units) 30",
            "balance 31 != remaining + held of its grants 30",
        ]
        dirty = runner.invoke(args=["credits", "reconcile", "--user", user_id])
        assert dirty.exit_code == 1
        assert user_id in dirty.output
        with engine.begin() as conn:
            conn.execute(sa.update(t).where(t.c.user_id == user_id).values(balance_units=30))


def test_prune_deletes_only_expired_keys(app, user_id):
    app.config["CREDITS_IDEMPOTENCY_TTL_SECONDS"] = 0
    with app.app_context():
        current_ledger().top_up(user_id, 1, idempotency_key="soon-expired")
    result = app.test_cli_runner().invoke(args=["credits", "prune"])
    assert result.exit_code == 0
    assert "deleted" in result.output
    assert int(result.output.split()[1]) >= 1


def test_openapi_command_prints_the_document(app):
    result = app.test_cli_runner().invoke(args=["credits", "openapi"])
    assert json.loads(result.output)["openapi"] == "3.1.0"


def _listed(output: str) -> dict[str, str]:
    """The ``Commands:`` section of a help page: name -> the text shown."""
    section = output.split("Commands:\n", 1)[1]
    rows = [line.split(None, 1) for line in section.splitlines() if line.strip()]
    return {row[0]: row[1] if len(row) > 1 else "" for row in rows}


def test_help_lists_every_command_with_its_whole_summary(app):
    """Click cuts a docstring's first line at a width or at "e.g."; a short
    summary per command is shown whole (80 columns, click's default)."""
    runner = app.test_cli_runner()
    group = app.cli.commands["credits"]
    pages = {
        group: runner.invoke(args=["credits", "--help"]),
        group.commands["db"]: runner.invoke(args=["credits", "db", "--help"]),
        app.cli: runner.invoke(args=["--help"]),
    }
    for parent, page in pages.items():
        assert page.exit_code == 0, page.output
        listed = _listed(page.output)
        for name, command in parent.commands.items():
            if parent is app.cli and name != "credits":
                continue
            summary = command.short_help
            assert summary, f"{name} has no short_help"
            assert summary.endswith("."), summary
            assert len(summary) <= 50, f"{name}: {summary!r} may wrap on a narrow terminal"
            assert listed[name] == summary, page.output
    assert set(_listed(pages[group].output)) == {
        "balance",
        "db",
        "expire-holds",
        "grants",
        "history",
        "openapi",
        "prune",
        "reconcile",
        "settle-grants",
        "topup",
        "usage",
    }


@pytest.fixture
def fresh_app(engine_name, tmp_path):
    """An app on a migrated database of its own, so counts are exact."""
    dbs = Databases(tmp_path / "fresh")
    app = make_app(dbs.url(engine_name))
    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()
    dbs.drop_all()


def test_counts_are_pluralised(fresh_app):
    app = fresh_app
    runner = app.test_cli_runner()

    def said(*args: str) -> str:
        result = runner.invoke(args=["credits", *args])
        assert result.exit_code == 0, result.output
        return result.output.strip()

    def move_clock(delta: timedelta) -> None:
        app.extensions["callora_credits"].clock = lambda: datetime.now(timezone.utc) + delta

    assert said("reconcile") == "checked 0 accounts, 0 entries: ok"
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up("pl_a", 10 * U)
        assert said("reconcile") == "checked 1 account, 1 entry: ok"
        ledger.top_up("pl_a", 10 * U)
        ledger.top_up("pl_b", 10 * U)
        assert said("reconcile") == "checked 2 accounts, 3 entries: ok"

        ledger.hold("pl_a", U, expires_in_seconds=1)
        move_clock(timedelta(seconds=2))
        # The expired hold's credit goes back to an active grant (no entry).
        assert said("expire-holds") == "settled what was due: 1 event written"
        assert said("expire-holds") == "settled what was due: 0 events written"
        soon = datetime.now(timezone.utc) + timedelta(seconds=5)
        ledger.grant("pl_a", U, expires_at=soon)
        move_clock(timedelta(seconds=6))
        assert said("settle-grants") == "settled what was due: 1 event written"
        soon = datetime.now(timezone.utc) + timedelta(seconds=8)
        ledger.grant("pl_a", U, expires_at=soon)
        ledger.grant("pl_b", U, expires_at=soon)
        move_clock(timedelta(seconds=10))
        assert said("expire-holds") == "settled what was due: 2 events written"

        move_clock(timedelta(days=2))
        said("prune")  # every key so far
        assert said("prune") == "deleted 0 expired idempotency keys"
        move_clock(timedelta(0))
        ledger.top_up("pl_a", U, idempotency_key="pl-1")
        move_clock(timedelta(days=4))
        assert said("prune") == "deleted 1 expired idempotency key"
        move_clock(timedelta(days=4))
        ledger.top_up("pl_a", U, idempotency_key="pl-2")
        ledger.top_up("pl_a", U, idempotency_key="pl-3")
        move_clock(timedelta(days=8))
        assert said("prune") == "deleted 2 expired idempotency keys"

        t = Account.__table__
        with ledger.engine.begin() as conn:
            conn.execute(sa.update(t).where(t.c.user_id == "pl_b").values(last_seq=99))
        dirty = runner.invoke(args=["credits", "reconcile"])
        assert dirty.exit_code == 1
        assert dirty.output.splitlines()[-1] == "checked 2 accounts, 12 entries: 1 mismatch"
