"""`session=`: ledger operations inside the host's own transaction."""

from __future__ import annotations

from datetime import datetime

import pytest
import sqlalchemy as sa
from invariants import ledger_problems
from sqlalchemy.orm import Session

from callora_credits import current_ledger, signals
from callora_credits.db.models import Account
from callora_credits.errors import InsufficientCredits


def test_joined_operations_commit_and_roll_back_with_the_host(app, user_id):
    received = []

    def on_top_up(sender, entry):
        received.append(entry.amount_units)

    with app.app_context(), signals.credits_topped_up.connected_to(on_top_up):
        ledger = current_ledger()
        engine = app.extensions["sqlalchemy"].engine
        with Session(engine) as session:
            ledger.top_up(user_id, 5, session=session)
            assert received == []  # not before the host commits
            session.rollback()
        assert received == []
        assert ledger.find_by_user_id(user_id) is None

        with Session(engine) as session:
            ledger.top_up(user_id, 7, session=session)
            session.commit()
        assert received == [7]
        assert ledger.find_by_user_id(user_id).balance_units == 7


def test_joined_replay_returns_the_first_entry(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        engine = app.extensions["sqlalchemy"].engine
        with Session(engine) as session:
            first = ledger.top_up(user_id, 3, idempotency_key="host-k", session=session)
            second = ledger.top_up(user_id, 3, idempotency_key="host-k", session=session)
            session.commit()
        assert first.id == second.id
        assert ledger.find_by_user_id(user_id).balance_units == 3


def test_host_pending_work_is_untouched(app, engine_name, user_id):
    """Without session=, an operation neither commits nor rolls back host work."""
    if engine_name == "sqlite":
        pytest.skip("SQLite has one writer: an open host write would block the ledger")
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        ledger = current_ledger()
        db.session.execute(
            sa.insert(Account.__table__).values(
                user_id=f"{user_id}_host",
                balance_units=0,
                last_seq=0,
                created_at=datetime(2026, 1, 1),
                updated_at=datetime(2026, 1, 1),
            )
        )
        ledger.top_up(user_id, 1)
        db.session.rollback()
        assert ledger.find_by_user_id(f"{user_id}_host") is None
        assert ledger.find_by_user_id(user_id).balance_units == 1


def test_a_refused_joined_operation_leaves_nothing_behind(app, user_id):
    """The host catches the 402 and commits: no half-done debit is committed."""
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10)
        ledger.hold(user_id, 8)
        engine = app.extensions["sqlalchemy"].engine
        with Session(engine) as session:
            with pytest.raises(InsufficientCredits):
                ledger.charge(user_id, 5, session=session)  # balance covers it, holds don't
            session.commit()
        assert ledger.find_by_user_id(user_id).balance_units == 10
        assert ledger.reconcile(user_id).ok
        assert ledger_problems(ledger.engine, user_id) == []
