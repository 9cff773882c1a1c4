"""The exact rows each money move writes, pinned where mutation testing of
the moves and their SQL found them unpinned.

Every test reads the tables as written (the account, its grants, entries,
allocations and holds) after each operation, on every engine, and asserts
the figures a correct move leaves: balance, held total, seq, a grant's
remaining and held parts, an entry's amount, type, balance after and what it
drew from, a hold's status and captured amount.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clock
from invariants import ledger_problems
from sqlalchemy.dialects import postgresql, sqlite

from callora_credits import current_ledger, signals
from callora_credits.core.money import UNITS_PER_USDC
from callora_credits.db import entry_rows, grant_rows, hold_rows, key_rows, store
from callora_credits.db.constraints import violates
from callora_credits.db.models import (
    Account,
    AllocationRow,
    GrantRow,
    HoldRow,
    LedgerEntry,
)
from callora_credits.errors import (
    BalanceLimitExceeded,
    DuplicateReference,
    GrantNotActive,
    HoldAmountExceeded,
    HoldNotPending,
    InsufficientCredits,
    NotFound,
    RefundExceedsCharge,
    ValidationError,
)

U = UNITS_PER_USDC
T0 = datetime(2026, 6, 1, 12, 0)  # naive UTC, as stored


def at(seconds: float) -> datetime:
    """T0 + ``seconds``, naive UTC."""
    return T0 + timedelta(seconds=seconds)


def aware(seconds: float) -> datetime:
    return at(seconds).replace(tzinfo=timezone.utc)


def _naive(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def account(ledger: Any, user_id: str) -> dict[str, Any]:
    a = Account.__table__
    with ledger.engine.connect() as conn:
        row = conn.execute(sa.select(a).where(a.c.user_id == user_id)).one()
    return {
        "balance": int(row.balance_units),
        "held": int(row.held_units),
        "seq": int(row.last_seq),
        "scheduled": int(row.scheduled_units),
        "grants": int(row.last_grant_number),
        "due": _naive(row.next_due_at),
    }


def grants(ledger: Any, user_id: str) -> list[tuple[Any, ...]]:
    """Each grant: (number, origin, category, priority, amount, remaining,
    held, status, voided_at), in creation order."""
    g = GrantRow.__table__
    with ledger.engine.connect() as conn:
        rows = conn.execute(sa.select(g).where(g.c.user_id == user_id).order_by(g.c.number))
        return [
            (
                int(r.number),
                r.origin,
                r.category,
                int(r.priority),
                int(r.amount_units),
                int(r.remaining_units),
                int(r.held_units),
                r.status,
                _naive(r.voided_at),
            )
            for r in rows
        ]


def grant_ids(ledger: Any, user_id: str) -> list[str]:
    g = GrantRow.__table__
    with ledger.engine.connect() as conn:
        return list(
            conn.execute(
                sa.select(g.c.id).where(g.c.user_id == user_id).order_by(g.c.number)
            ).scalars()
        )


def entries(ledger: Any, user_id: str) -> list[tuple[Any, ...]]:
    """Each entry: (seq, type, amount, balance_after, grant_id, hold_id,
    refund_of, refunded, description, metadata, allocations)."""
    t, al = LedgerEntry.__table__, AllocationRow.__table__
    with ledger.engine.connect() as conn:
        rows = list(conn.execute(sa.select(t).where(t.c.user_id == user_id).order_by(t.c.seq)))
        parts = list(
            conn.execute(
                sa.select(al)
                .where(al.c.user_id == user_id, al.c.entry_id.is_not(None))
                .order_by(al.c.entry_id, al.c.position)
            )
        )
    drawn: dict[str, list[tuple[str, int, int]]] = {}
    for part in parts:
        drawn.setdefault(part.entry_id, []).append(
            (part.grant_id, int(part.amount_units), int(part.position))
        )
    return [
        (
            int(r.seq),
            r.type,
            int(r.amount_units),
            int(r.balance_after_units),
            r.grant_id,
            r.hold_id,
            r.refund_of,
            int(r.refunded_units),
            r.description,
            json.loads(r.metadata_json),
            [(grant, units) for grant, units, _ in drawn.get(r.id, [])],
        )
        for r in rows
    ]


def pins(ledger: Any, hold_id: str) -> list[tuple[str, int, int]]:
    al = AllocationRow.__table__
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(al).where(al.c.hold_id == hold_id).order_by(al.c.position)
        ).all()
    return [(r.grant_id, int(r.amount_units), int(r.position)) for r in rows]


def hold_row(ledger: Any, hold_id: str) -> tuple[Any, ...]:
    h = HoldRow.__table__
    with ledger.engine.connect() as conn:
        r = conn.execute(sa.select(h).where(h.c.id == hold_id)).one()
    return (
        r.status,
        int(r.amount_units),
        int(r.captured_units),
        _naive(r.resolved_at),
        r.transaction_id,
    )


def clean(ledger: Any, user_id: str, clock: Clock) -> None:
    assert ledger_problems(ledger.engine, user_id, clock.now) == []


# --- grants, charges, refunds and voids ---------------------------------------------


def test_grants_charges_refunds_and_voids_write_exact_rows(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        topup = ledger.top_up(user_id, 10 * U)
        promo = ledger.grant(
            user_id,
            5 * U,
            priority=10,
            expires_at=aware(100),
            reference="promo-1",
            description="welcome",
            metadata={"campaign": "spring"},
            actor_id="admin_1",
        )
        assert (promo.category, promo.priority, promo.status) == ("promotional", 10, "active")
        assert (promo.amount_units, promo.remaining_units, promo.held_units) == (5 * U, 5 * U, 0)
        assert (promo.reference, promo.description) == ("promo-1", "welcome")
        assert promo.metadata == {"campaign": "spring"}
        assert promo.expires_at == aware(100)
        assert promo.effective_at == aware(0)
        assert promo.created_at == aware(0)
        assert promo.voided_at is None
        later = ledger.grant(user_id, 3 * U, effective_at=aware(50), reference="later-1")
        assert (later.status, later.transaction_id, later.effective_at) == (
            "scheduled",
            None,
            aware(50),
        )
        paid, promo_id, later_id = grant_ids(ledger, user_id)
        assert promo.id == promo_id
        assert later.id == later_id
        assert account(ledger, user_id) == {
            "balance": 15 * U,
            "held": 0,
            "seq": 2,
            "scheduled": 3 * U,
            "grants": 3,
            "due": at(50),
        }
        assert grants(ledger, user_id) == [
            (1, "topup", "paid", 50, 10 * U, 10 * U, 0, "active", None),
            (2, "grant", "promotional", 10, 5 * U, 5 * U, 0, "active", None),
            (3, "grant", "promotional", 50, 3 * U, 3 * U, 0, "scheduled", None),
        ]
        with ledger.engine.connect() as conn:
            row = grant_rows.grant_row(conn, promo_id)
        assert (row.transaction_id, row.actor_id, row.reference) == (
            promo.transaction_id,
            "admin_1",
            "promo-1",
        )
        assert promo.transaction_id is not None

        charge = ledger.charge(user_id, 7 * U, metadata={"call": "c1"})
        assert account(ledger, user_id)["balance"] == 8 * U
        assert grants(ledger, user_id)[:2] == [
            (1, "topup", "paid", 50, 10 * U, 8 * U, 0, "active", None),
            (2, "grant", "promotional", 10, 5 * U, 0, 0, "active", None),
        ]
        first = ledger.refund(charge.id, U, reason="one back")
        assert [(a.grant_id, a.amount_units) for a in first.allocations] == [(paid, U)]
        second = ledger.refund(charge.id, 3 * U)
        assert [(a.grant_id, a.amount_units) for a in second.allocations] == [
            (paid, U),
            (promo_id, 2 * U),
        ]
        assert grants(ledger, user_id)[:2] == [
            (1, "topup", "paid", 50, 10 * U, 10 * U, 0, "active", None),
            (2, "grant", "promotional", 10, 5 * U, 2 * U, 0, "active", None),
        ]
        voided = ledger.void_grant(promo_id, reason="abuse", actor_id="admin_2")
        assert (voided.status, voided.remaining_units, voided.held_units) == ("voided", 0, 0)
        assert voided.voided_at == aware(0)
        assert voided.amount_units == 5 * U
        with pytest.raises(GrantNotActive) as caught:
            ledger.void_grant(promo_id)
        assert caught.value.message == "The grant is voided"
        scheduled_void = ledger.void_grant(later_id)
        assert (scheduled_void.status, scheduled_void.remaining_units) == ("voided", 0)
        with pytest.raises(NotFound) as missing:
            ledger.void_grant("grant_" + "0" * 24)
        assert missing.value.message == "No such grant"
        assert account(ledger, user_id) == {
            "balance": 10 * U,
            "held": 0,
            "seq": 6,
            "scheduled": 0,
            "grants": 3,
            "due": at(50),
        }
        # The rest of the charge goes back to the voided grant, and leaves.
        last = ledger.refund(charge.id)
        assert last.amount_units == 3 * U
        with pytest.raises(RefundExceedsCharge) as exceeded:
            ledger.refund(charge.id)
        assert exceeded.value.message == "At most 0.0000000 USDC of this charge can be refunded"
        assert grants(ledger, user_id) == [
            (1, "topup", "paid", 50, 10 * U, 10 * U, 0, "active", None),
            (2, "grant", "promotional", 10, 5 * U, 0, 0, "voided", at(0)),
            (3, "grant", "promotional", 50, 3 * U, 0, 0, "voided", at(0)),
        ]
        assert entries(ledger, user_id) == [
            (1, "topup", 10 * U, 10 * U, paid, None, None, 0, None, {}, []),
            (
                2,
                "grant",
                5 * U,
                15 * U,
                promo_id,
                None,
                None,
                0,
                "welcome",
                {"campaign": "spring"},
                [],
            ),
            (
                3,
                "charge",
                -7 * U,
                8 * U,
                None,
                None,
                None,
                7 * U,
                None,
                {"call": "c1"},
                [(promo_id, 5 * U), (paid, 2 * U)],
            ),
            (4, "refund", U, 9 * U, None, None, charge.id, 0, "one back", {}, [(paid, U)]),
            (
                5,
                "refund",
                3 * U,
                12 * U,
                None,
                None,
                charge.id,
                0,
                None,
                {},
                [(paid, U), (promo_id, 2 * U)],
            ),
            (6, "void", -2 * U, 10 * U, promo_id, None, None, 0, "abuse", {}, []),
            (
                7,
                "refund",
                3 * U,
                13 * U,
                None,
                None,
                charge.id,
                0,
                None,
                {},
                [(promo_id, 3 * U)],
            ),
            (8, "void", -3 * U, 10 * U, promo_id, None, None, 0, None, {}, []),
        ]
        assert topup.grant_id == paid
        assert account(ledger, user_id)["seq"] == 8
        clean(ledger, user_id, clock)


# --- holds: pins, captures, releases, and what goes back to a dead grant ------------


def test_a_capture_spends_its_pins_in_order_and_the_rest_goes_back(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.grant(user_id, 4 * U, expires_at=aware(60))
        paid, promo = grant_ids(ledger, user_id)
        hold = ledger.hold(user_id, 6 * U, expires_in_seconds=300, reference="h-1")
        assert (hold.status, hold.amount_units, hold.captured_units) == ("pending", 6 * U, 0)
        assert hold.expires_at == aware(300)
        assert pins(ledger, hold.id) == [(promo, 4 * U, 0), (paid, 2 * U, 1)]
        assert account(ledger, user_id) == {
            "balance": 14 * U,
            "held": 6 * U,
            "seq": 2,
            "scheduled": 0,
            "grants": 2,
            "due": at(60),
        }
        assert grants(ledger, user_id) == [
            (1, "topup", "paid", 50, 10 * U, 8 * U, 2 * U, "active", None),
            (2, "grant", "promotional", 50, 4 * U, 0, 4 * U, "active", None),
        ]
        with pytest.raises(InsufficientCredits):
            ledger.hold(user_id, 8 * U + 1)
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 8 * U + 1)
        clock.advance(61)
        # The promotional grant expired with all of it held: nothing leaves yet.
        with pytest.raises(HoldAmountExceeded) as exceeded:
            ledger.capture(hold.id, 6 * U + 1)
        assert exceeded.value.message == "The hold reserves 6.0000000 USDC; capture at most that"
        captured = ledger.capture(hold.id, 3 * U)
        assert (captured.status, captured.captured_units) == ("captured", 3 * U)
        assert captured.resolved_at == aware(61)
        assert captured.transaction_id is not None
        assert hold_row(ledger, hold.id) == (
            "captured",
            6 * U,
            3 * U,
            at(61),
            captured.transaction_id,
        )
        assert grants(ledger, user_id) == [
            (1, "topup", "paid", 50, 10 * U, 10 * U, 0, "active", None),
            (2, "grant", "promotional", 50, 4 * U, 0, 0, "expired", None),
        ]
        assert account(ledger, user_id) == {
            "balance": 10 * U,
            "held": 0,
            "seq": 4,
            "scheduled": 0,
            "grants": 2,
            "due": at(300),  # the hold's expiry, written when it was placed,
        }
        found = entries(ledger, user_id)
        assert found[2:] == [
            (
                3,
                "hold_capture",
                -3 * U,
                11 * U,
                None,
                hold.id,
                None,
                0,
                None,
                {},
                [(promo, 3 * U)],
            ),
            (4, "expiration", -U, 10 * U, promo, hold.id, None, 0, None, {}, []),
        ]
        assert found[2][0] == 3
        with pytest.raises(HoldNotPending) as again:
            ledger.capture(hold.id)
        assert again.value.message == "The hold is already captured"
        with pytest.raises(NotFound) as missing:
            ledger.release("hold_" + "0" * 24)
        assert missing.value.message == "No such hold"
        clean(ledger, user_id, clock)


def test_a_release_gives_back_live_pins_and_dead_ones_leave(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 2 * U)
        ledger.grant(user_id, 4 * U, expires_at=aware(60), metadata={"k": "v"})
        paid, promo = grant_ids(ledger, user_id)
        hold = ledger.hold(user_id, 5 * U, metadata={"order": "o1"})
        assert pins(ledger, hold.id) == [(promo, 4 * U, 0), (paid, U, 1)]
        clock.advance(60)
        released = ledger.release(hold.id)
        assert (released.status, released.captured_units, released.transaction_id) == (
            "released",
            0,
            None,
        )
        assert hold_row(ledger, hold.id) == ("released", 5 * U, 0, at(60), None)
        assert grants(ledger, user_id) == [
            (1, "topup", "paid", 50, 2 * U, 2 * U, 0, "active", None),
            (2, "grant", "promotional", 50, 4 * U, 0, 0, "expired", None),
        ]
        assert account(ledger, user_id) == {
            "balance": 2 * U,
            "held": 0,
            "seq": 3,
            "scheduled": 0,
            "grants": 2,
            "due": at(900),  # the default lifetime's end,
        }
        assert entries(ledger, user_id)[2:] == [
            (3, "expiration", -4 * U, 2 * U, promo, hold.id, None, 0, None, {}, []),
        ]
        with pytest.raises(HoldNotPending) as again:
            ledger.release(hold.id)
        assert again.value.message == "The hold is already released"
        clean(ledger, user_id, clock)


def test_a_whole_capture_spends_every_pin(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 3 * U)
        ledger.top_up(user_id, 3 * U, priority=10)
        low, first = grant_ids(ledger, user_id)
        hold = ledger.hold(user_id, 4 * U, expires_in_seconds=30)
        assert pins(ledger, hold.id) == [(first, 3 * U, 0), (low, U, 1)]
        captured = ledger.capture(hold.id)
        assert captured.captured_units == 4 * U
        assert entries(ledger, user_id)[2:] == [
            (
                3,
                "hold_capture",
                -4 * U,
                2 * U,
                None,
                hold.id,
                None,
                0,
                None,
                {},
                [(first, 3 * U), (low, U)],
            ),
        ]
        assert grants(ledger, user_id) == [
            (1, "topup", "paid", 50, 3 * U, 2 * U, 0, "active", None),
            (2, "topup", "paid", 10, 3 * U, 0, 0, "active", None),
        ]
        assert account(ledger, user_id)["held"] == 0
        late = ledger.hold(user_id, U, expires_in_seconds=30)
        clock.advance(30)
        with pytest.raises(HoldNotPending) as expired:
            ledger.capture(late.id)
        assert expired.value.message == "The hold has expired"
        clean(ledger, user_id, clock)


# --- the limit, and times that are refused ------------------------------------------


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {"CREDITS_MAX_BALANCE_USDC": "20", "CREDITS_LOW_BALANCE_USDC": "5"}


def test_the_limit_counts_scheduled_grants_and_refuses_with_its_figure(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        message = "The balance may not exceed 20.0000000 USDC"
        with pytest.raises(BalanceLimitExceeded) as over:
            ledger.top_up(user_id, 20 * U + 1)
        assert over.value.message == message
        ledger.top_up(user_id, 12 * U)
        ledger.grant(user_id, 5 * U, effective_at=aware(10))
        with pytest.raises(BalanceLimitExceeded) as scheduled:
            ledger.grant(user_id, 3 * U + 1, effective_at=aware(20))
        assert scheduled.value.message == message
        with pytest.raises(BalanceLimitExceeded) as credited:
            ledger.grant(user_id, 3 * U + 1)
        assert credited.value.message == message
        ledger.grant(user_id, 3 * U, effective_at=aware(5))
        assert account(ledger, user_id) == {
            "balance": 12 * U,
            "held": 0,
            "seq": 1,
            "scheduled": 8 * U,
            "grants": 3,
            "due": at(5),
        }
        clock.advance(10)
        # Both fell due: they enter the balance before the next move.
        charge = ledger.charge(user_id, U)
        assert (charge.seq, charge.balance_after_units) == (4, 19 * U)
        assert [e[1:4] for e in entries(ledger, user_id)[1:3]] == [
            ("grant", 3 * U, 15 * U),
            ("grant", 5 * U, 20 * U),
        ]
        assert account(ledger, user_id) == {
            "balance": 19 * U,
            "held": 0,
            "seq": 4,
            "scheduled": 0,
            "grants": 3,
            "due": None,
        }
        assert ledger.top_up(user_id, U).balance_after_units == 20 * U
        with pytest.raises(BalanceLimitExceeded):
            ledger.top_up(user_id, 1)
        clean(ledger, user_id, clock)


def test_an_expiry_now_or_before_is_refused_and_a_later_one_is_kept(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        for call in (
            lambda: ledger.top_up(user_id, U, expires_at=aware(0)),
            lambda: ledger.grant(user_id, U, expires_at=aware(0)),
            lambda: ledger.grant(user_id, U, effective_at=aware(-5), expires_at=aware(-1)),
        ):
            with pytest.raises(ValidationError) as caught:
                call()
            assert caught.value.details == [
                {
                    "field": "expires_at",
                    "message": "expires_at must be in the future",
                    "code": "range",
                }
            ]
        # An effective time in the past is now.
        past = ledger.grant(user_id, U, effective_at=aware(-5), expires_at=aware(1))
        assert (past.status, past.effective_at, past.expires_at) == ("active", aware(0), aware(1))
        entry = ledger.top_up(user_id, U, expires_at=aware(2), priority=7)
        assert account(ledger, user_id)["due"] == at(1)
        assert grants(ledger, user_id)[1][:6] == (2, "topup", "paid", 7, U, U)
        assert entry.grant_id == grant_ids(ledger, user_id)[1]
        clean(ledger, user_id, clock)


def test_a_refund_of_a_debit_that_drew_from_no_grant_becomes_a_paid_grant(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, 4 * U)
        al = AllocationRow.__table__
        with ledger.engine.begin() as conn:  # a charge written before grants existed
            conn.execute(sa.delete(al).where(al.c.entry_id == charge.id))
        clock.advance(1)
        sent: list[Any] = []

        def refunded(sender: Any, **kw: Any) -> None:
            sent.append(kw["entry"])

        signals.credits_refunded.connect(refunded)
        try:
            refund = ledger.refund(charge.id, U, reason="goodwill", actor_id="admin_1")
        finally:
            signals.credits_refunded.disconnect(refunded)
        assert sent == [refund]
        assert refund.actor_id == "admin_1"
        back = grant_ids(ledger, user_id)[1]
        assert re.fullmatch(r"grant_[0-9a-f]{24}", back)
        assert [(a.grant_id, a.amount_units) for a in refund.allocations] == [(back, U)]
        assert (refund.amount_units, refund.balance_after_units, refund.seq) == (U, 7 * U, 3)
        assert (refund.refund_of, refund.description, refund.metadata) == (
            charge.id,
            "goodwill",
            {},
        )
        rest = ledger.refund(charge.id)
        assert rest.amount_units == 3 * U
        again = grant_ids(ledger, user_id)[2]
        assert grants(ledger, user_id) == [
            (1, "topup", "paid", 50, 10 * U, 6 * U, 0, "active", None),
            (2, "refund", "paid", 50, U, U, 0, "active", None),
            (3, "refund", "paid", 50, 3 * U, 3 * U, 0, "active", None),
        ]
        record = ledger.get_grant(back)
        assert record is not None
        assert (record.transaction_id, record.reference, record.description) == (
            refund.id,
            None,
            None,
        )
        assert (record.effective_at, record.created_at, record.expires_at) == (
            aware(1),
            aware(1),
            None,
        )
        assert record.metadata == {}
        with ledger.engine.connect() as conn:
            assert grant_rows.grant_row(conn, back).actor_id == "admin_1"
            assert grant_rows.grant_row(conn, again).transaction_id == rest.id
        assert account(ledger, user_id) == {
            "balance": 10 * U,
            "held": 0,
            "seq": 4,
            "scheduled": 0,
            "grants": 3,
            "due": None,
        }
        assert ledger.get_entry(charge.id).refunded_units == 4 * U
        # The next charge draws the oldest grant of equal rank first.
        ledger.charge(user_id, 7 * U)
        assert [g[5] for g in grants(ledger, user_id)] == [0, 0, 3 * U]


def test_balance_signals_fire_when_crossing_the_threshold_and_at_zero(app, clock, user_id):
    seen: list[tuple[str, int]] = []

    def low(sender: Any, **kw: Any) -> None:
        if kw["user_id"] == user_id:
            seen.append(("low", kw["balance_units"]))

    def depleted(sender: Any, **kw: Any) -> None:
        if kw["user_id"] == user_id:
            seen.append(("depleted", kw["balance_units"]))

    signals.balance_low.connect(low)
    signals.balance_depleted.connect(depleted)
    try:
        with app.app_context():
            ledger = current_ledger()
            ledger.top_up(user_id, 6 * U)
            ledger.charge(user_id, U)  # 5: not below the threshold
            assert seen == []
            ledger.charge(user_id, 1)  # below it
            assert seen == [("low", 5 * U - 1)]
            ledger.charge(user_id, 1)  # already below
            assert seen == [("low", 5 * U - 1)]
            ledger.top_up(user_id, 2)
            grant = ledger.grant(user_id, U)  # 6 USDC
            ledger.void_grant(grant.id)  # 5: not below
            assert seen == [("low", 5 * U - 1)]
            hold = ledger.hold(user_id, 5 * U)
            ledger.capture(hold.id)  # 0: low and depleted
            assert seen == [("low", 5 * U - 1), ("low", 0), ("depleted", 0)]
            ledger.top_up(user_id, 4 * U)
            promo = ledger.grant(user_id, U, expires_at=aware(10))  # 5 USDC
            hold = ledger.hold(user_id, 5 * U)
            clock.advance(10)
            ledger.release(hold.id)  # the expired grant's 1 USDC leaves
            assert ledger.get_grant(promo.id).status == "expired"
            assert seen[3:] == [("low", 4 * U)]
            assert ledger.find_by_user_id(user_id).balance_units == 4 * U
    finally:
        signals.balance_low.disconnect(low)
        signals.balance_depleted.disconnect(depleted)


# --- the SQL functions, each on its own -----------------------------------------------


def test_the_balance_row_sums_grants_by_category_and_names_the_next_expiry(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        with ledger.engine.connect() as conn:
            assert store.balance_row(conn, user_id) is None
            assert store.account_row(conn, user_id) is None
        ledger.top_up(user_id, 3 * U)
        with ledger.engine.connect() as conn:
            row = store.balance_row(conn, user_id)
        assert (row.paid_units, row.promotional_units, row.next_expiry_at) == (3 * U, 0, None)
        assert row.next_expiry_units == 0
        ledger.top_up(user_id, 2 * U, expires_at=aware(50))
        ledger.grant(user_id, U, expires_at=aware(50))
        ledger.grant(user_id, 4 * U, expires_at=aware(80))
        ledger.grant(user_id, 7 * U, effective_at=aware(10))  # scheduled: not counted
        ledger.hold(user_id, 2 * U)  # pins the 50 s promotional grant, then the paid one
        with ledger.engine.connect() as conn:
            row = store.balance_row(conn, user_id)
            plain = store.account_row(conn, user_id)
        assert (row.user_id, int(row.balance_units), int(row.held_units)) == (
            user_id,
            10 * U,
            2 * U,
        )
        assert (int(row.paid_units), int(row.promotional_units)) == (5 * U, 5 * U)
        assert _naive(row.next_expiry_at) == at(50)
        assert int(row.next_expiry_units) == U  # 2 + 1 expire at 50 s; 2 of them are held
        assert (_naive(row.created_at), _naive(row.updated_at)) == (at(0), at(0))
        assert _naive(row.next_due_at) == at(10)
        assert (plain.user_id, int(plain.balance_units), int(plain.scheduled_units)) == (
            user_id,
            10 * U,
            7 * U,
        )


def test_due_accounts_are_the_ones_due_oldest_first_up_to_the_limit(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        others = [f"{user_id}_{n}" for n in range(3)]
        for n, other in enumerate(others):
            ledger.grant(other, U, expires_at=aware(30 - 10 * n))  # due at 30, 20, 10
        ledger.top_up(user_id, U)  # nothing due
        with ledger.engine.connect() as conn:
            mine = lambda now, limit: [  # noqa: E731
                u for u in store.due_accounts(conn, now, limit) if u.startswith(user_id)
            ]
            assert mine(at(9), 100) == []
            assert mine(at(10), 100) == [others[2]]
            assert mine(at(30), 100) == [others[2], others[1], others[0]]
        # The limit counts every account due (other tests' accounts too).
        with ledger.engine.connect() as conn:
            assert len(store.due_accounts(conn, at(30), 2)) == 2
            assert len(store.due_accounts(conn, at(30), 1)) == 1


def test_schedule_counts_up_to_the_limit_and_unschedule_takes_back(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 5 * U)
        with ledger.engine.begin() as conn:
            assert store.schedule(conn, user_id, 3 * U, 9 * U, at(40)) == 2
            assert store.schedule(conn, user_id, 1 * U, 9 * U, at(60)) == 3
            assert store.schedule(conn, user_id, 1, 9 * U, at(20)) is None
            row = store.account_row(conn, user_id)
            assert (int(row.scheduled_units), int(row.last_grant_number)) == (4 * U, 3)
            assert _naive(row.next_due_at) == at(40)
            assert store.schedule(conn, user_id, 0, 9 * U, at(20)) == 4
            assert _naive(store.account_row(conn, user_id).next_due_at) == at(20)
            store.unschedule(conn, user_id, 3 * U)
            assert int(store.account_row(conn, user_id).scheduled_units) == U
            store.settle_account(
                conn,
                user_id,
                balance_units=6 * U,
                last_seq=7,
                scheduled_units=0,
                next_due_at=None,
                held_units=None,
                now=at(5),
            )
            row = store.account_row(conn, user_id)
            assert (int(row.balance_units), int(row.last_seq), int(row.scheduled_units)) == (
                6 * U,
                7,
                0,
            )
            assert (row.next_due_at, _naive(row.updated_at), int(row.held_units)) == (
                None,
                at(5),
                0,
            )
            conn.rollback()


def test_hold_and_release_move_the_held_total_within_the_balance(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 5 * U)
        with ledger.engine.begin() as conn:
            assert store.hold(conn, "nobody_" + user_id, 1, at(0), at(10)) is False
            assert store.hold(conn, user_id, 3 * U, at(0), at(60)) is True
            assert store.hold(conn, user_id, 2 * U + 1, at(0), at(30)) is False
            assert store.hold(conn, user_id, 2 * U, at(0), at(30)) is True
            row = store.account_row(conn, user_id)
            assert (int(row.held_units), _naive(row.next_due_at)) == (5 * U, at(30))
            # Something due refuses every conditional update until settled.
            assert store.hold(conn, user_id, 0, at(30), at(90)) is False
            assert store.debit(conn, user_id, 0, at(30)) is None
            assert store.debit(conn, user_id, U, at(29), release=3 * U) == (4 * U, 2)
            assert store.debit(conn, user_id, 2 * U + 1, at(29)) is None
            store.release(conn, user_id, 2 * U)
            row = store.account_row(conn, user_id)
            assert (int(row.balance_units), int(row.held_units)) == (4 * U, 0)
            assert store.debit(conn, user_id, U, at(29), release=1) is None
            assert store.debit(conn, user_id, 4 * U, at(29)) == (0, 3)
            conn.rollback()


def test_entries_are_found_by_reference_of_their_user_and_type(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        topup = ledger.top_up(user_id, 5 * U, reference="r-1")
        charge = ledger.charge(user_id, U, reference="r-1")
        ledger.top_up(user_id + "x", U, reference="r-2")
        with ledger.engine.connect() as conn:
            assert entry_rows.entry_by_reference(conn, user_id, "topup", "r-1") == topup.id
            assert entry_rows.entry_by_reference(conn, user_id, "charge", "r-1") == charge.id
            assert entry_rows.entry_by_reference(conn, user_id, "topup", "r-2") is None
            assert entry_rows.entry_row(conn, charge.id).amount_units == -U
            assert entry_rows.entry_row(conn, charge.id, lock=True).user_id == user_id
            assert entry_rows.entry_row(conn, "ctx_missing") is None


def test_grant_rows_read_by_id_page_reference_and_liveness(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, U, reference="same")
        named = ledger.grant(user_id, U, reference="same")
        gone = ledger.grant(user_id, U)
        ledger.void_grant(gone.id)
        later = ledger.grant(user_id, U, effective_at=aware(30))
        used = ledger.grant(user_id, U, priority=1)
        held = ledger.grant(user_id, U, priority=0, expires_at=aware(5))
        ledger.charge(user_id, U + U // 2)  # uses "held" whole and half of "used"
        ids = grant_ids(ledger, user_id)
        with ledger.engine.connect() as conn:
            found = grant_rows.grant_by_reference(conn, user_id, "same")
            assert (found.id, found.transaction_id) == (named.id, named.transaction_id)
            assert grant_rows.grant_by_reference(conn, user_id + "x", "same") is None
            assert grant_rows.grant_rows(conn, []) == []
            assert sorted(r.id for r in grant_rows.grant_rows(conn, [ids[1], ids[1], ids[2]])) == (
                sorted([ids[1], ids[2]])
            )
            live = {r.id for r in grant_rows.live_grants(conn, user_id)}
            # A grant used up is still active as written.
            assert live == {ids[0], named.id, later.id, used.id, held.id}
            spendable = [r.id for r in grant_rows.spendable_grants(conn, user_id, at(0))]
            assert sorted(spendable) == sorted([ids[0], named.id, used.id])
            page = grant_rows.grant_page(conn, user_id, 2, None)
            assert [r.id for r in page] == [held.id, used.id]
            page = grant_rows.grant_page(conn, user_id, 10, int(page[-1].number))
            assert [r.id for r in page] == [later.id, gone.id, named.id, ids[0]]
            assert grant_rows.entry_allocations(conn, []) == {}
            assert grant_rows.hold_pins(conn, []) == {}


def test_allocations_are_read_in_the_order_written(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        for priority in (30, 20, 10):
            ledger.top_up(user_id, U, priority=priority)
        third, second, first = grant_ids(ledger, user_id)
        charge = ledger.charge(user_id, 2 * U + 1)
        small = ledger.charge(user_id, 1)
        hold = ledger.hold(user_id, U - 2)
        with ledger.engine.connect() as conn:
            assert grant_rows.entry_allocations(conn, [small.id, charge.id, small.id]) == {
                charge.id: [(first, U), (second, U), (third, 1)],
                small.id: [(third, 1)],
            }
            assert grant_rows.hold_pins(conn, [hold.id, "hold_none"]) == {
                hold.id: [(third, U - 2)]
            }


def test_hold_rows_by_reference_pending_and_expired(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        first = ledger.hold(user_id, U, reference="h-1", expires_in_seconds=60)
        clock.advance(1)
        second = ledger.hold(user_id, U, expires_in_seconds=30)
        third = ledger.hold(user_id, U, expires_in_seconds=30)
        done = ledger.hold(user_id, U)
        ledger.release(done.id)
        with ledger.engine.begin() as conn:
            assert hold_rows.hold_by_reference(conn, user_id, "h-1") == first.id
            assert hold_rows.hold_by_reference(conn, user_id + "x", "h-1") is None
            pending = {r.id for r in hold_rows.pending_holds_of(conn, user_id)}
            assert pending == {first.id, second.id, third.id}
            newest = sorted([second.id, third.id], reverse=True)
            page = hold_rows.pending_hold_rows(conn, user_id, at(30), 10, None)
            assert [r.id for r in page] == [*newest, first.id]
            assert [
                r.id for r in hold_rows.pending_hold_rows(conn, user_id, at(31), 10, None)
            ] == [first.id]
            after = (page[0].created_at, page[0].id)
            rest = hold_rows.pending_hold_rows(conn, user_id, at(30), 10, after)
            assert [r.id for r in rest] == [newest[1], first.id]
            assert [r.id for r in hold_rows.pending_hold_rows(conn, user_id, at(30), 1, None)] == [
                newest[0]
            ]
            hold_rows.expire_hold(conn, first.id, at(60))
            hold_rows.expire_hold(conn, done.id, at(60))
            assert hold_rows.hold_row(conn, first.id).status == "expired"
            assert _naive(hold_rows.hold_row(conn, first.id).resolved_at) == at(60)
            released = hold_rows.hold_row(conn, done.id, lock=True)
            assert (released.status, _naive(released.resolved_at)) == ("released", at(1))
            assert hold_rows.resolve_hold(conn, first.id, "captured", 1, at(61)) is False
            assert hold_rows.resolve_hold(conn, second.id, "captured", 5, at(20)) is True
            hold_rows.set_hold_transaction(conn, second.id, "ctx_x")
            row = hold_rows.hold_row(conn, second.id)
            assert (row.status, int(row.captured_units), _naive(row.resolved_at)) == (
                "captured",
                5,
                at(20),
            )
            assert (row.transaction_id, hold_rows.hold_row(conn, third.id).transaction_id) == (
                "ctx_x",
                None,
            )
            assert hold_rows.hold_row(conn, "hold_none") is None
            conn.rollback()


def test_idempotency_records_expire_at_their_instant(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()

        def record(key: str, expires: datetime) -> dict[str, Any]:
            return {
                "key_hash": key,
                "user_id": user_id,
                "actor_id": user_id,
                "method": "POST",
                "path": "/test",
                "idempotency_key": key,
                "fingerprint": "f" * 64,
                "status_code": 201,
                "response_body": "{}",
                "created_at": at(0),
                "expires_at": expires,
            }

        keys = [f"{user_id}-{n}".ljust(64, "0")[:64] for n in range(3)]
        with ledger.engine.begin() as conn:
            for n, key in enumerate(keys):
                key_rows.insert_idempotency(conn, record(key, at(10 * (n + 1))))
            found = key_rows.find_idempotency(conn, keys[0])
            assert (found.fingerprint, found.status_code, found.response_body) == (
                "f" * 64,
                201,
                "{}",
            )
            assert _naive(found.expires_at) == at(10)
            key_rows.delete_expired_key(conn, keys[1], at(19))
            assert key_rows.find_idempotency(conn, keys[1]) is not None
            key_rows.delete_expired_key(conn, keys[1], at(20))
            assert key_rows.find_idempotency(conn, keys[1]) is None
            assert key_rows.delete_expired_idempotency(conn, at(10)) >= 1
            assert key_rows.find_idempotency(conn, keys[0]) is None
            assert key_rows.find_idempotency(conn, keys[2]) is not None
            conn.rollback()


def test_a_duplicate_grant_reference_names_the_grant_and_its_entry(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        first = ledger.grant(user_id, U, reference="g-1")
        later = ledger.grant(user_id, U, reference="g-2", effective_at=aware(60))
        for reference, grant in (("g-1", first), ("g-2", later)):
            with pytest.raises(DuplicateReference) as caught:
                ledger.grant(user_id, 2 * U, reference=reference)
            assert caught.value.details == [
                {
                    "field": "reference",
                    "message": "This reference was already used",
                    "code": "duplicate_reference",
                    "grant_id": grant.id,
                    "transaction_id": grant.transaction_id,
                }
            ]
        assert later.transaction_id is None
        assert account(ledger, user_id)["balance"] == U


def test_a_driver_error_without_a_constraint_name_is_no_duplicate():
    class Diag:
        pass

    class Unnamed(Exception):
        diag = Diag()

    error = sa.exc.IntegrityError("INSERT …", {}, Unnamed("duplicate"))
    assert violates(error, entry_rows.ENTRY_REFERENCE) is False


def test_the_credit_upsert_as_built_brings_the_due_time_forward_and_waits_for_it(app, user_id):
    """Built again here, the upsert creates an account with its due time,
    counts scheduled grants against the limit, and refuses while something
    is due (at the due instant too)."""
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        builders = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
        if engine.dialect.name not in builders:
            return  # MariaDB: an UPDATE then an INSERT, run by the tests above
        upsert = store._upsert_credit(builders[engine.dialect.name])

        def credit(conn: Any, units: int, now: datetime, due: datetime | None) -> Any:
            params = {
                "p_user_id": user_id,
                "p_units": units,
                "p_limit": 10,
                "p_now": now,
                "p_due": due,
                "p_grants": 1,
            }
            found = conn.execute(upsert, params).first()
            return None if found is None else tuple(found)

        with engine.begin() as conn:
            assert credit(conn, 2, at(0), at(30)) == (2, 1, 1)
            row = store.account_row(conn, user_id)
            assert (_naive(row.next_due_at), int(row.scheduled_units)) == (at(30), 0)
            assert credit(conn, 2, at(1), at(20)) == (4, 2, 2)
            assert _naive(store.account_row(conn, user_id).next_due_at) == at(20)
            assert store.schedule(conn, user_id, 5, 10, at(40)) == 3
            assert credit(conn, 2, at(2), None) is None  # 4 + 5 scheduled + 2 > 10
            assert credit(conn, 1, at(2), None) == (5, 3, 4)
            assert credit(conn, 0, at(20), None) is None  # due at 20: settle first
            assert credit(conn, 0, at(19), None) == (5, 4, 5)
            conn.rollback()


def test_an_expired_or_depleted_grant_cannot_be_voided(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, U)
        expiring = ledger.grant(user_id, U, expires_at=aware(10), priority=90)
        used = ledger.grant(user_id, U, priority=1)
        ledger.charge(user_id, U)  # uses up the priority-1 grant
        clock.advance(10)
        for grant, status in ((expiring, "expired"), (used, "depleted")):
            with pytest.raises(GrantNotActive) as caught:
                ledger.void_grant(grant.id)
            assert caught.value.message == f"The grant is {status}"
        assert ledger.find_by_user_id(user_id).balance_units == U
        ledger.settle_grants()  # a refused void wrote nothing, its settling neither
        assert account(ledger, user_id)["balance"] == U
        assert [g[5:8] for g in grants(ledger, user_id)] == [
            (U, 0, "active"),
            (0, 0, "expired"),
            (0, 0, "active"),
        ]
        clean(ledger, user_id, clock)


def test_a_void_sends_the_grant_and_its_entry_and_records_who_asked(app, clock, user_id):
    sent: list[tuple[Any, Any]] = []

    def voided(sender: Any, **kw: Any) -> None:
        sent.append((kw["grant"], kw["entry"]))

    signals.grant_voided.connect(voided)
    try:
        with app.app_context():
            ledger = current_ledger()
            live = ledger.grant(user_id, 2 * U)
            later = ledger.grant(user_id, U, effective_at=aware(60))
            first = ledger.void_grant(live.id, reason="fraud", actor_id="admin_9")
            second = ledger.void_grant(later.id)
            entry = ledger.history(user_id).items[0]
    finally:
        signals.grant_voided.disconnect(voided)
    assert (entry.type, entry.amount_units, entry.actor_id) == ("void", -2 * U, "admin_9")
    assert (entry.description, entry.grant_id) == ("fraud", live.id)
    assert sent == [(first, entry), (second, None)]


def test_settling_an_account_with_nothing_due_writes_and_counts_nothing(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.grant(user_id, U, expires_at=aware(10))
        settle = partial(ledger._settle_one, user_id)
        assert ledger._run(partial(settle, at(0))) == 0
        assert ledger._run(partial(ledger._settle_one, user_id + "x", at(0))) == 0
        assert account(ledger, user_id)["seq"] == 1
        clock.advance(10)
        assert ledger._run(partial(settle, at(10))) == 1
        assert ledger._run(partial(settle, at(10))) == 0
        assert account(ledger, user_id)["seq"] == 2
