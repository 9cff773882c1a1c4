"""`flask credits …` on every engine."""

from __future__ import annotations

import json

import sqlalchemy as sa

from callora_credits import current_ledger
from callora_credits.db.models import Account


def test_topup_balance_history(app, user_id):
    runner = app.test_cli_runner()
    result = runner.invoke(args=["credits", "topup", user_id, "12.5", "--reference", "r1"])
    assert result.exit_code == 0, result.output
    assert "+12.5000000" in result.output
    again = runner.invoke(args=["credits", "topup", user_id, "1", "--reference", "r1"])
    assert again.exit_code != 0
    assert "reference" in again.output.lower()
    balance = runner.invoke(args=["credits", "balance", user_id])
    assert "balance 12.5000000" in balance.output
    history = runner.invoke(args=["credits", "history", user_id])
    assert "topup" in history.output
    assert "r1" in history.output
    bad = runner.invoke(args=["credits", "topup", user_id, "1.123456789"])
    assert bad.exit_code != 0


def test_reconcile_reports_a_tampered_balance(app, user_id):
    runner = app.test_cli_runner()
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 50)
        ledger.charge(user_id, 20)
        assert ledger.reconcile(user_id).ok
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
