"""The rows and signals of posting, adjustments and the balance setting, and of
the hold and grant moves, pinned where mutation testing found them unpinned.

Every test reads the tables as written after each operation, on every engine,
and asserts the figures a correct move leaves.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from conftest import Clock
from test_mutants_moves import T0, account, clean, entries, grant_ids, grants

from callora_credits import current_ledger, signals
from callora_credits.core.money import UNITS_PER_USDC

U = UNITS_PER_USDC


@pytest.fixture
def clock(app: Any) -> Clock:
    stopped = Clock(T0.replace(tzinfo=timezone.utc))
    app.extensions["callora_credits"].clock = stopped
    return stopped


def aware(naive: datetime) -> datetime:
    return naive.replace(tzinfo=timezone.utc)


# --- adjustments and the balance setting ----------------------------------------------


def test_adjustments_and_balance_settings_write_paid_grants_and_debits(app, clock, user_id):
    sent: list[tuple[str, Any]] = []

    def on(name: str) -> Any:
        def receive(sender: Any, **kw: Any) -> None:
            entry = kw["entry"]
            if entry.user_id == user_id:
                sent.append((name, entry.id))

        return receive

    receivers = {
        "topped_up": (signals.credits_topped_up, on("topped_up")),
        "charged": (signals.credits_charged, on("charged")),
        "adjusted": (signals.credits_adjusted, on("adjusted")),
    }
    for signal, receiver in receivers.values():
        signal.connect(receiver)
    try:
        with app.app_context():
            ledger = current_ledger()
            topup = ledger.top_up(user_id, 5 * U, priority=20)
            up = ledger.adjust(user_id, 2 * U, "goodwill", actor_id="admin_1")
            assert (up.type, up.amount_units, up.balance_after_units) == (
                "adjustment",
                2 * U,
                7 * U,
            )
            assert up.description == "goodwill"
            assert up.grant_id is not None
            down = ledger.adjust(user_id, -3 * U, "chargeback")
            assert (down.type, down.amount_units, down.balance_after_units) == (
                "adjustment",
                -3 * U,
                4 * U,
            )
            assert down.description == "chargeback"
            assert down.grant_id is None
            charge = ledger.charge(user_id, U)
            assert ledger.update_balance(user_id, 3 * U) is None
            raised = ledger.update_balance(user_id, 6 * U)
            assert raised is not None
            assert (raised.type, raised.amount_units, raised.balance_after_units) == (
                "adjustment",
                3 * U,
                6 * U,
            )
            assert raised.description == "balance set"
            lowered = ledger.update_balance(user_id, U, "to one")
            assert lowered is not None
            assert (lowered.type, lowered.amount_units, lowered.balance_after_units) == (
                "adjustment",
                -5 * U,
                U,
            )
            assert lowered.description == "to one"
            fresh = f"{user_id}_new"
            created = ledger.update_balance(fresh, 2 * U)
            assert created is not None
            assert (created.amount_units, created.balance_after_units) == (2 * U, 2 * U)
            assert account(ledger, fresh)["balance"] == 2 * U
            assert ledger.update_balance(f"{user_id}_empty", 0) is None

            paid, goodwill, set_up = grant_ids(ledger, user_id)
            assert up.grant_id == goodwill
            assert raised.grant_id == set_up
            # Adjustments credit paid grants of the default priority, drawn
            # after the top-up (priority 20); debits draw in that order.
            assert grants(ledger, user_id) == [
                (1, "topup", "paid", 20, 5 * U, 0, 0, "active", None),
                (2, "adjustment", "paid", 50, 2 * U, 0, 0, "active", None),
                (3, "adjustment", "paid", 50, 3 * U, U, 0, "active", None),
            ]
            assert ledger.get_grant(goodwill).description is None
            assert ledger.get_grant(goodwill).expires_at is None
            assert ledger.get_grant(goodwill).metadata == {}
            found = entries(ledger, user_id)
            assert [(e[1], e[2], e[8], e[10]) for e in found] == [
                ("topup", 5 * U, None, []),
                ("adjustment", 2 * U, "goodwill", []),
                ("adjustment", -3 * U, "chargeback", [(paid, 3 * U)]),
                ("charge", -U, None, [(paid, U)]),
                ("adjustment", 3 * U, "balance set", []),
                ("adjustment", -5 * U, "to one", [(paid, U), (goodwill, 2 * U), (set_up, 2 * U)]),
            ]
            assert account(ledger, user_id)["balance"] == U
            clean(ledger, user_id, clock)
    finally:
        for signal, receiver in receivers.values():
            signal.disconnect(receiver)
    assert sent == [
        ("topped_up", topup.id),
        ("adjusted", up.id),
        ("adjusted", down.id),
        ("charged", charge.id),
        ("adjusted", raised.id),
        ("adjusted", lowered.id),
    ]
