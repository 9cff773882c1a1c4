"""The rows and signals of posting, adjustments and the balance setting, and of
the hold and grant moves, pinned where mutation testing found them unpinned.

Every test reads the tables as written after each operation, on every engine,
and asserts the figures a correct move leaves.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import assert_only_debits_refundable
from test_mutants_moves import T0, account, clean, entries, grant_ids, grants

from callora_credits import current_ledger, signals
from callora_credits.core.money import UNITS_PER_USDC
from callora_credits.db.models import LedgerEntry

U = UNITS_PER_USDC


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


# --- holds: their signals, and a hold placed once an expired one is written ------------


def test_holds_send_their_signals_and_an_expired_hold_frees_room_for_a_new_one(
    app, clock, user_id
):
    sent: list[tuple[Any, ...]] = []

    def created(sender: Any, **kw: Any) -> None:
        if kw["hold"].user_id == user_id:
            sent.append(("created", kw["hold"].id, kw["hold"].status))

    def captured(sender: Any, **kw: Any) -> None:
        if kw["hold"].user_id == user_id:
            sent.append(("captured", kw["hold"].id, kw["hold"].status, kw["entry"].id))

    def released(sender: Any, **kw: Any) -> None:
        if kw["hold"].user_id == user_id:
            sent.append(("released", kw["hold"].id, kw["hold"].status))

    pairs = [
        (signals.hold_created, created),
        (signals.hold_captured, captured),
        (signals.hold_released, released),
    ]
    for signal, receiver in pairs:
        signal.connect(receiver)
    try:
        with app.app_context():
            ledger = current_ledger()
            ledger.top_up(user_id, 5 * U)
            first = ledger.hold(user_id, 5 * U, expires_in_seconds=60)
            clock.advance(60)
            # The first hold's expiry is due: written, it leaves room for this one.
            second = ledger.hold(user_id, 5 * U, expires_in_seconds=60, metadata={"o": "2"})
            assert ledger.get_hold(first.id).status == "expired"
            assert account(ledger, user_id)["held"] == 5 * U
            taken = ledger.capture(second.id, 2 * U)
            assert taken.transaction_id is not None
            capture_entry = entries(ledger, user_id)[-1]
            assert (capture_entry[1], capture_entry[2], capture_entry[9]) == (
                "hold_capture",
                -2 * U,
                {"o": "2"},
            )
            third = ledger.hold(user_id, U)
            freed = ledger.release(third.id)
            assert (freed.status, freed.captured_units) == ("released", 0)
            after = account(ledger, user_id)
            assert (after["balance"], after["held"]) == (3 * U, 0)
            clean(ledger, user_id, clock)
    finally:
        for signal, receiver in pairs:
            signal.disconnect(receiver)
    assert sent == [
        ("created", first.id, "pending"),
        ("created", second.id, "pending"),
        ("captured", second.id, "captured", taken.transaction_id),
        ("created", third.id, "pending"),
        ("released", third.id, "released"),
    ]


# --- grants: when they start, what they refuse, and their signals ---------------------


def test_a_grant_effective_now_or_before_starts_now_and_a_later_one_is_scheduled(
    app, clock, user_id
):
    created: list[tuple[str, str]] = []
    voided: list[tuple[str, str, Any]] = []

    def on_created(sender: Any, **kw: Any) -> None:
        if kw["grant"].user_id == user_id:
            created.append((kw["grant"].id, kw["grant"].status))

    def on_voided(sender: Any, **kw: Any) -> None:
        if kw["grant"].user_id == user_id:
            entry = kw["entry"]
            voided.append(
                (kw["grant"].id, kw["grant"].status, None if entry is None else entry.id)
            )

    signals.grant_created.connect(on_created)
    signals.grant_voided.connect(on_voided)
    try:
        with app.app_context():
            ledger = current_ledger()
            past = ledger.grant(user_id, U, effective_at=aware(T0) - timedelta(days=1))
            assert (past.status, past.effective_at) == ("active", aware(T0))
            now = ledger.grant(user_id, U, effective_at=aware(T0))
            assert (now.status, now.effective_at) == ("active", aware(T0))
            later = ledger.grant(
                user_id,
                2 * U,
                effective_at=aware(T0) + timedelta(seconds=30),
                expires_at=aware(T0) + timedelta(seconds=90),
                metadata={"m": "1"},
                description="soon",
            )
            assert (later.status, later.amount_units, later.remaining_units) == (
                "scheduled",
                2 * U,
                2 * U,
            )
            assert later.expires_at == aware(T0) + timedelta(seconds=90)
            assert (later.metadata, later.description) == ({"m": "1"}, "soon")
            assert account(ledger, user_id)["balance"] == 2 * U
            assert account(ledger, user_id)["scheduled"] == 2 * U
            used = ledger.grant(user_id, U)
            ledger.charge(user_id, 3 * U)
            # A depleted grant cannot be voided; a scheduled one is voided with no entry.
            assert ledger.get_grant(past.id).status == "depleted"
            void_later = ledger.void_grant(later.id)
            assert void_later.status == "voided"
            assert account(ledger, user_id)["scheduled"] == 0
            clock.advance(30)
            assert ledger.get_grant(later.id).status == "voided"
            assert account(ledger, user_id)["balance"] == 0
            clean(ledger, user_id, clock)
    finally:
        signals.grant_created.disconnect(on_created)
        signals.grant_voided.disconnect(on_voided)
    assert created == [
        (past.id, "active"),
        (now.id, "active"),
        (later.id, "scheduled"),
        (used.id, "active"),
    ]
    assert voided == [(later.id, "voided", None)]


def test_only_charges_and_captures_can_be_refunded(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        topup = ledger.top_up(user_id, 5 * U)
        assert_only_debits_refundable(ledger, topup.id)
        hold = ledger.hold(user_id, 2 * U)
        captured = ledger.capture(hold.id)
        back = ledger.refund(captured.transaction_id, U)
        assert (back.type, back.amount_units, back.refund_of) == (
            "refund",
            U,
            captured.transaction_id,
        )
        assert [(a.grant_id, a.amount_units) for a in back.allocations] == [(topup.grant_id, U)]
        assert account(ledger, user_id)["balance"] == 4 * U
        clean(ledger, user_id, clock)


# --- what settling tells, and who asked for what leaves a dead grant -----------------


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {"CREDITS_MAX_BALANCE_USDC": "20", "CREDITS_LOW_BALANCE_USDC": "5"}


def test_settling_sends_the_expiry_and_the_low_balance_of_the_account(app, clock, user_id):
    sent: list[tuple[Any, ...]] = []

    def expired(sender: Any, **kw: Any) -> None:
        sent.append(("expired", kw.get("grant_id"), kw.get("entry") is not None))

    def low(sender: Any, **kw: Any) -> None:
        sent.append(("low", kw.get("user_id"), kw.get("balance_units")))

    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 4 * U)
        promo = ledger.grant(user_id, 2 * U, expires_at=aware(T0) + timedelta(seconds=10))
        clock.advance(10)
        signals.grant_expired.connect(expired)
        signals.balance_low.connect(low)
        try:
            ledger.charge(user_id, 1)  # writes the expiry first
        finally:
            signals.grant_expired.disconnect(expired)
            signals.balance_low.disconnect(low)
        assert [s for s in sent if s[1] in (promo.id, user_id)] == [
            ("expired", promo.id, True),
            ("low", user_id, 4 * U),
        ]
        assert account(ledger, user_id)["balance"] == 4 * U - 1
        clean(ledger, user_id, clock)


def written_by(ledger: Any, user_id: str) -> list[tuple[str, int, str | None]]:
    """Type, amount and actor of each of the user's entries, in order."""
    t = LedgerEntry.__table__
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.type, t.c.amount_units, t.c.actor_id)
            .where(t.c.user_id == user_id)
            .order_by(t.c.seq)
        ).all()
    return [(r.type, int(r.amount_units), r.actor_id) for r in rows]


def test_what_a_refund_gives_back_to_a_voided_grant_leaves_in_the_name_of_who_asked(
    app, clock, user_id
):
    with app.app_context():
        ledger = current_ledger()
        promo = ledger.grant(user_id, 2 * U)
        charge = ledger.charge(user_id, U)
        ledger.void_grant(promo.id)
        ledger.refund(charge.id, U, actor_id="admin_3")
        assert written_by(ledger, user_id) == [
            ("grant", 2 * U, None),
            ("charge", -U, None),
            ("void", -U, None),
            ("refund", U, "admin_3"),
            ("void", -U, "admin_3"),
        ]
        assert account(ledger, user_id)["balance"] == 0
        clean(ledger, user_id, clock)


def test_a_grant_scheduled_once_an_expiry_is_written_counts_the_balance_left(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.grant(user_id, 10 * U, expires_at=aware(T0) + timedelta(seconds=10))
        clock.advance(10)
        # The expiry is written under the account's lock first: 10 USDC are
        # left, and 10 more fit under the limit of 20.
        later = ledger.grant(user_id, 10 * U, effective_at=aware(T0) + timedelta(seconds=100))
        assert later.status == "scheduled"
        after = account(ledger, user_id)
        assert (after["balance"], after["scheduled"], after["seq"]) == (10 * U, 10 * U, 3)
        clean(ledger, user_id, clock)


def test_a_capture_signals_from_the_balance_before_and_a_spent_dead_pin_writes_no_entry(
    app, clock, user_id
):
    low: list[int] = []

    def on_low(sender: Any, **kw: Any) -> None:
        if kw["user_id"] == user_id:
            low.append(kw["balance_units"])

    signals.balance_low.connect(on_low)
    try:
        with app.app_context():
            ledger = current_ledger()
            ledger.top_up(user_id, 2 * U)
            promo = ledger.grant(user_id, 4 * U, expires_at=aware(T0) + timedelta(seconds=60))
            whole = ledger.hold(user_id, 4 * U, expires_in_seconds=300)
            part = ledger.hold(user_id, 2 * U, expires_in_seconds=300)
            clock.advance(60)
            # The expired grant's pin is spent whole: nothing of it is left to leave.
            ledger.capture(whole.id)
            assert low == [2 * U]
            assert [(e[1], e[2]) for e in entries(ledger, user_id)[2:]] == [
                ("hold_capture", -4 * U)
            ]
            assert ledger.get_grant(promo.id).status == "expired"
            ledger.release(part.id, actor_id="admin_4")
            assert [(e[1], e[2]) for e in entries(ledger, user_id)[2:]] == [
                ("hold_capture", -4 * U)
            ]
            assert account(ledger, user_id)["balance"] == 2 * U
            clean(ledger, user_id, clock)
    finally:
        signals.balance_low.disconnect(on_low)


def test_what_a_release_gives_back_to_an_expired_grant_leaves_in_the_name_of_who_asked(
    app, clock, user_id
):
    with app.app_context():
        ledger = current_ledger()
        ledger.grant(user_id, 3 * U, expires_at=aware(T0) + timedelta(seconds=60))
        hold = ledger.hold(user_id, 2 * U, expires_in_seconds=300)
        clock.advance(60)
        ledger.release(hold.id, actor_id="admin_5")
        assert written_by(ledger, user_id) == [
            ("grant", 3 * U, None),
            ("expiration", -U, None),
            ("expiration", -2 * U, "admin_5"),
        ]
        clean(ledger, user_id, clock)


def test_a_top_up_to_exactly_the_limit_is_taken(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        entry = ledger.top_up(user_id, 20 * U)
        assert entry.balance_after_units == 20 * U


def test_a_top_up_tried_again_after_settling_keeps_its_expiry_due(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.grant(user_id, 2 * U, effective_at=aware(T0) + timedelta(seconds=60))
        clock.advance(61)
        # The activation is due: the top-up's first update is refused, the
        # activation written, and the top-up tried again, its expiry now due.
        expiry = aware(T0) + timedelta(hours=1)
        ledger.top_up(user_id, 5 * U, expires_at=expiry)
        after = account(ledger, user_id)
        assert (after["balance"], after["due"]) == (7 * U, expiry.replace(tzinfo=None))


def test_adjustments_and_balance_settings_have_empty_metadata(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        made = [
            ledger.adjust(user_id, U, "goodwill"),
            ledger.adjust(user_id, -U // 2, "correction"),
            ledger.update_balance(user_id, 7 * U),
        ]
        for entry in made:
            assert entry is not None
            assert entry.metadata == {}
            assert ledger.get_entry(entry.id).metadata == {}


def test_the_grant_a_top_up_brings_in_keeps_no_metadata_of_its_own(app, clock, user_id):
    # The top-up's metadata is the entry's; only a grant given as a grant has
    # metadata of its own.
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, U, metadata={"order": "A-1"})
        given = ledger.grant(user_id, U, metadata={"campaign": "spring"})
        assert top_up.metadata == {"order": "A-1"}
        assert top_up.grant_id is not None
        assert ledger.get_grant(top_up.grant_id).metadata == {}
        assert ledger.get_grant(given.id).metadata == {"campaign": "spring"}


def test_a_hold_tried_again_after_settling_keeps_its_expiry_due(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 5 * U)
        ledger.grant(user_id, 2 * U, effective_at=aware(T0) + timedelta(seconds=60))
        clock.advance(61)
        # The activation is due: the hold's first update is refused, the
        # activation written, and the hold placed on the second try, its
        # expiry now the account's next due time.
        hold = ledger.hold(user_id, 3 * U, expires_in_seconds=600)
        after = account(ledger, user_id)
        assert (after["held"], after["due"]) == (3 * U, hold.expires_at.replace(tzinfo=None))


def test_top_ups_and_charges_keep_their_descriptions(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, 2 * U, description="card payment")
        charge = ledger.charge(user_id, U, description="GET /v1/search")
        assert (top_up.description, charge.description) == ("card payment", "GET /v1/search")
        assert [e.description for e in ledger.history(user_id).items] == [
            "GET /v1/search",
            "card payment",
        ]
