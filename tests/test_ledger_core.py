"""The domain core through its Python API, on every engine."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from callora_credits import current_ledger, signals
from callora_credits.db.models import LedgerEntry
from callora_credits.errors import (
    BalanceLimitExceeded,
    DuplicateReference,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    RefundExceedsCharge,
)

U = 10_000_000  # units per USDC


def test_top_up_then_charge_moves_the_balance(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, 10 * U, reference="pay_1", actor_id="ops")
        assert (first.seq, first.amount_units, first.balance_after_units) == (1, 10 * U, 10 * U)
        charge = ledger.charge(user_id, 3 * U, description="call")
        assert (charge.seq, charge.amount_units, charge.balance_after_units) == (2, -3 * U, 7 * U)
        balance = ledger.find_by_user_id(user_id)
        assert balance is not None
        assert balance.balance_units == 7 * U


def test_charge_beyond_balance_is_refused_and_changes_nothing(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 1 * U)
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 1 * U + 1)
        assert ledger.find_by_user_id(user_id).balance_units == 1 * U
        assert len(ledger.history(user_id).items) == 1


def test_charge_of_unknown_user_is_insufficient(app, user_id):
    with app.app_context(), pytest.raises(InsufficientCredits):
        current_ledger().charge(user_id, 1)


def test_same_key_applies_once_and_replays_the_same_entry(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        a = ledger.top_up(user_id, 5 * U, idempotency_key="k1")
        b = ledger.top_up(user_id, 5 * U, idempotency_key="k1")
        assert a == b
        assert ledger.find_by_user_id(user_id).balance_units == 5 * U
        with pytest.raises(IdempotencyConflict):
            ledger.top_up(user_id, 6 * U, idempotency_key="k1")


def test_a_stored_402_replays_as_402_after_a_top_up(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 2 * U, idempotency_key="c1")
        ledger.top_up(user_id, 10 * U)
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 2 * U, idempotency_key="c1")
        assert ledger.find_by_user_id(user_id).balance_units == 10 * U


def test_duplicate_reference_is_refused_under_another_key(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, 1 * U, reference="stellar_tx_1")
        with pytest.raises(DuplicateReference) as caught:
            ledger.top_up(user_id, 1 * U, reference="stellar_tx_1")
        assert caught.value.details[0]["transaction_id"] == first.id
        assert ledger.find_by_user_id(user_id).balance_units == 1 * U


def test_balance_limit(app, user_id):
    app.config["CREDITS_MAX_BALANCE_USDC"] = "10"
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 6 * U)
        with pytest.raises(BalanceLimitExceeded):
            ledger.top_up(user_id, 5 * U)
        ledger.top_up(user_id, 4 * U)
        assert ledger.find_by_user_id(user_id).balance_units == 10 * U
        with pytest.raises(BalanceLimitExceeded):
            ledger.top_up(f"{user_id}_new", 11 * U)


def test_a_set_balance_is_bounded_by_the_balance_limit_not_the_amount_limit(host, user_id):
    from callora_credits.errors import ValidationError

    app = host(CREDITS_MAX_AMOUNT_USDC="10", CREDITS_MAX_BALANCE_USDC="1000")
    with app.app_context():
        ledger = current_ledger()
        # One adjustment of 500 USDC, fifty times what a request may carry.
        assert ledger.update_balance(user_id, 500 * U).amount_units == 500 * U
        with pytest.raises(BalanceLimitExceeded):
            ledger.update_balance(user_id, 1000 * U + 1)
        assert ledger.update_balance(user_id, 1000 * U).amount_units == 500 * U
        assert ledger.update_balance(user_id, 0).amount_units == -1000 * U
        # An adjustment names an amount, and keeps the per-request bound.
        with pytest.raises(ValidationError):
            ledger.adjust(user_id, 11 * U, reason="too large")
        assert ledger.find_by_user_id(user_id).balance_units == 0
        assert [e.amount_units for e in ledger.history(user_id).items] == [
            -1000 * U,
            500 * U,
            500 * U,
        ]


def test_partial_refunds_never_exceed_the_charge(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, 4 * U)
        part = ledger.refund(charge.id, 1 * U, reason="partial")
        assert (part.type, part.amount_units, part.refund_of) == ("refund", 1 * U, charge.id)
        with pytest.raises(RefundExceedsCharge):
            ledger.refund(charge.id, 3 * U + 1)
        rest = ledger.refund(charge.id)
        assert rest.amount_units == 3 * U
        with pytest.raises(RefundExceedsCharge):
            ledger.refund(charge.id)
        assert ledger.get_entry(charge.id).refunded_units == 4 * U
        assert ledger.find_by_user_id(user_id).balance_units == 10 * U
        with pytest.raises(NotFound):
            ledger.refund("ctx_missing")


def test_adjustments_are_signed_and_never_go_below_zero(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.adjust(user_id, 5 * U, "goodwill")
        entry = ledger.adjust(user_id, -2 * U, "chargeback")
        assert (entry.type, entry.amount_units, entry.balance_after_units) == (
            "adjustment",
            -2 * U,
            3 * U,
        )
        with pytest.raises(InsufficientCredits):
            ledger.adjust(user_id, -4 * U, "too much")
        assert ledger.update_balance(user_id, 9 * U).amount_units == 6 * U
        assert ledger.update_balance(user_id, 9 * U) is None
        assert ledger.find_by_user_id(user_id).balance_units == 9 * U


def test_history_pages_by_seq(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        for _ in range(5):
            ledger.top_up(user_id, 1 * U)
        seen = []
        page = ledger.history(user_id, limit=2)
        while True:
            seen += [e.seq for e in page.items]
            if not page.has_more:
                break
            page = ledger.history(user_id, limit=2, cursor=page.next_cursor)
        assert seen == [5, 4, 3, 2, 1]


def test_signals_fire_after_commit_only(app, user_id):
    received = []

    def on_charge(sender, entry):
        received.append(entry.id)

    with app.app_context(), signals.credits_charged.connected_to(on_charge):
        ledger = current_ledger()
        ledger.top_up(user_id, 1 * U)
        entry = ledger.charge(user_id, 1 * U)
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 1 * U)
    assert received == [entry.id]


def test_ledger_rows_match_the_balance(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 7 * U)
        ledger.charge(user_id, 2 * U)
        t = LedgerEntry.__table__
        with ledger.engine.connect() as conn:
            total = conn.execute(
                sa.select(sa.func.sum(t.c.amount_units)).where(t.c.user_id == user_id)
            ).scalar_one()
        assert total == ledger.find_by_user_id(user_id).balance_units


def test_refund_of_is_stored_on_the_entry(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10)
        charge = ledger.charge(user_id, 4)
        refund = ledger.refund(charge.id, 1)
        assert ledger.get_entry(refund.id).refund_of == charge.id
        assert ledger.history(user_id, type="refund").items[0].refund_of == charge.id


def test_duplicate_hold_reference_names_the_hold(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10)
        first = ledger.hold(user_id, 1, reference="job-7")
        with pytest.raises(DuplicateReference) as caught:
            ledger.hold(user_id, 1, reference="job-7")
        assert caught.value.details[0]["transaction_id"] == first.id


def test_an_expired_key_can_be_claimed_again(app, user_id):
    app.config["CREDITS_IDEMPOTENCY_TTL_SECONDS"] = 0
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, 5, idempotency_key="short-lived")
        second = ledger.top_up(user_id, 5, idempotency_key="short-lived")
        assert first.id != second.id
        assert ledger.find_by_user_id(user_id).balance_units == 10
