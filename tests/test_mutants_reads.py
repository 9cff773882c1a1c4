"""What the reads show and what settlement writes, pinned where mutation
testing of settlement, reading, the ledger API, pagination and money found
them unpinned.

Each test compares what a read returns with the rows as written (entries,
their allocations, grants), on every engine.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clock
from test_mutants_moves import account

from callora_credits import current_ledger, signals
from callora_credits.core.money import UNITS_PER_USDC
from callora_credits.core.pagination import decode_hold_cursor, encode_cursor
from callora_credits.core.settlement import settle_all
from callora_credits.db.models import Account, AllocationRow, HoldRow
from callora_credits.errors import ValidationError

U = UNITS_PER_USDC
T0 = datetime(2026, 6, 1, 12, 0)  # naive UTC, as stored


def aware(seconds: float) -> datetime:
    return (T0 + timedelta(seconds=seconds)).replace(tzinfo=timezone.utc)


def drawn(ledger: Any, entry_id: str) -> list[tuple[str, int]]:
    """The allocation rows of one entry, in order."""
    al = AllocationRow.__table__
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            sa.select(al).where(al.c.entry_id == entry_id).order_by(al.c.position)
        ).all()
    return [(r.grant_id, int(r.amount_units)) for r in rows]


def test_every_entry_read_shows_the_grants_it_drew_from(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        paid = ledger.top_up(user_id, 10 * U)
        promo = ledger.grant(user_id, 5 * U, priority=10)
        charge = ledger.charge(user_id, 7 * U)
        hold = ledger.hold(user_id, 2 * U)
        ledger.capture(hold.id, U)
        debit = ledger.adjust(user_id, -U, "chargeback")
        refund = ledger.refund(charge.id, 3 * U)
        page = ledger.history(user_id, limit=100)
        by_type = {entry.type: entry for entry in page.items}
        assert set(by_type) >= {"topup", "grant", "charge", "hold_capture", "adjustment", "refund"}
        for type_ in ("charge", "hold_capture", "adjustment", "refund"):
            entry = by_type[type_]
            rows = drawn(ledger, entry.id)
            assert rows, type_
            assert [(a.grant_id, a.amount_units) for a in entry.allocations] == rows
            again = ledger.get_entry(entry.id)
            assert again is not None
            assert again.allocations == entry.allocations
        assert [(a.grant_id, a.amount_units) for a in by_type["charge"].allocations] == [
            (promo.id, 5 * U),
            (paid.grant_id, 2 * U),
        ]
        assert debit.allocations == by_type["adjustment"].allocations
        assert refund.allocations == by_type["refund"].allocations


def test_a_status_filter_reads_past_the_first_two_hundred_grants(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        oldest = [ledger.grant(user_id, U) for _ in range(2)]
        for grant in oldest:
            ledger.void_grant(grant.id)
        for _ in range(203):
            ledger.grant(user_id, U)
        voided = ledger.grants(user_id, status="voided", limit=1)
        assert [g.id for g in voided.items] == [oldest[1].id]
        assert voided.next_cursor is not None
        rest = ledger.grants(user_id, status="voided", limit=1, cursor=voided.next_cursor)
        assert ([g.id for g in rest.items], rest.next_cursor) == ([oldest[0].id], None)
        both = ledger.grants(user_id, status="voided", limit=2)
        assert ([g.id for g in both.items], both.next_cursor) == (
            [oldest[1].id, oldest[0].id],
            None,
        )
        active = ledger.grants(user_id, limit=100)
        assert len(active.items) == 100
        assert active.next_cursor is not None
        seen = [g.id for g in active.items]
        while active.next_cursor is not None:
            active = ledger.grants(user_id, limit=100, cursor=active.next_cursor)
            seen += [g.id for g in active.items]
        assert len(seen) == len(set(seen)) == 203


def test_a_grant_closing_a_batch_is_shown_once_when_the_filter_reads_on(app, clock, user_id):
    # Newest first: 199 voided grants, then `newer` as the 200th row (the last
    # of the first statement's batch), then `older`. Reading the active ones
    # goes on from the 200th row, never from the one before it.
    with app.app_context():
        ledger = current_ledger()
        older = ledger.grant(user_id, U)
        newer = ledger.grant(user_id, U)
        for _ in range(199):
            ledger.void_grant(ledger.grant(user_id, U).id)
        page = ledger.grants(user_id, status="active", limit=10)
        assert ([g.id for g in page.items], page.next_cursor) == ([newer.id, older.id], None)


def test_settling_every_account_writes_each_due_event_once(app, user_id):
    # Long before any other test's clock, so that no other account is due.
    start = datetime(1991, 1, 1, tzinfo=timezone.utc)
    app.extensions["callora_credits"].clock = Clock(start)
    first, second = user_id, f"{user_id}b"
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(first, 10 * U)
        expiring = ledger.grant(first, 5 * U, expires_at=start + timedelta(seconds=60))
        ledger.top_up(second, 4 * U)
        hold = ledger.hold(second, 2 * U, expires_in_seconds=30)
        scheduled = ledger.grant(
            second, 3 * U, effective_at=start + timedelta(seconds=90), reference="later"
        )
        later = (start + timedelta(seconds=120)).replace(tzinfo=None)
        with ledger.engine.begin() as conn:
            assert settle_all(conn, later, batch=1, held_total=False) == 3
        with ledger.engine.begin() as conn:
            assert settle_all(conn, later, batch=1) == 0
        a = Account.__table__
        with ledger.engine.connect() as conn:
            rows = {
                r.user_id: r
                for r in conn.execute(sa.select(a).where(a.c.user_id.in_([first, second])))
            }
        assert (int(rows[first].balance_units), int(rows[first].last_seq)) == (10 * U, 3)
        assert rows[first].next_due_at is None
        # Without the held total, the column is left as it was.
        assert int(rows[second].held_units) == 2 * U
        assert (int(rows[second].balance_units), int(rows[second].last_seq)) == (7 * U, 2)
        assert (int(rows[second].scheduled_units), rows[second].next_due_at) == (0, None)
        expired = ledger.history(first, limit=1).items[0]
        assert (expired.type, expired.amount_units, expired.balance_after_units) == (
            "expiration",
            -5 * U,
            10 * U,
        )
        assert (expired.grant_id, expired.created_at) == (
            expiring.id,
            start + timedelta(seconds=60),
        )
        credited = ledger.history(second, limit=1).items[0]
        assert (credited.type, credited.amount_units, credited.balance_after_units) == (
            "grant",
            3 * U,
            7 * U,
        )
        assert (credited.grant_id, credited.reference, credited.hold_id) == (
            scheduled.id,
            "later",
            None,
        )
        assert credited.created_at == start + timedelta(seconds=90)
        assert ledger.get_hold(hold.id).status == "expired"
        active = ledger.get_grant(scheduled.id)
        assert (active.status, active.transaction_id) == ("active", credited.id)


def test_settling_every_account_frees_what_expired_holds_kept(app, user_id):
    # Long before any other test's clock, so that no other account is due.
    start = datetime(1992, 1, 1, tzinfo=timezone.utc)
    app.extensions["callora_credits"].clock = Clock(start)
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.hold(user_id, 2 * U, expires_in_seconds=30)
        ledger.hold(user_id, 3 * U, expires_in_seconds=300)
        later = (start + timedelta(seconds=60)).replace(tzinfo=None)
        with ledger.engine.begin() as conn:
            assert settle_all(conn, later) == 1
        after = account(ledger, user_id)
        # The held total is kept with the schema's: only the live hold's 3 USDC.
        assert (after["balance"], after["held"]) == (10 * U, 3 * U)
        assert after["due"] == (start + timedelta(seconds=300)).replace(tzinfo=None)


def test_a_balance_read_while_something_is_due_is_the_balance_written_after(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        soon = ledger.grant(user_id, 2 * U, priority=10, expires_at=aware(100))
        same = ledger.grant(user_id, 3 * U, priority=20, expires_at=aware(100))
        ledger.grant(user_id, U, priority=30, expires_at=aware(200))
        scheduled = ledger.grant(
            user_id, 4 * U, priority=40, effective_at=aware(10), expires_at=aware(50)
        )
        ledger.hold(user_id, U)
        before = ledger.find_by_user_id(user_id)
        assert before.next_expiry is not None
        assert (before.next_expiry.at, before.next_expiry.amount_units) == (aware(100), 4 * U)
        assert (before.promotional_units, before.held_units) == (6 * U, U)
        clock.advance(20)  # the scheduled grant is due, not yet written
        assert ledger.get_grant(scheduled.id).status == "active"
        assert scheduled.id in [g.id for g in ledger.grants(user_id, status="active").items]
        due = ledger.find_by_user_id(user_id)
        figures = (
            due.balance_units,
            due.held_units,
            due.paid_units,
            due.promotional_units,
            due.next_expiry,
        )
        assert figures[:4] == (20 * U, U, 10 * U, 10 * U)
        assert due.next_expiry is not None
        assert (due.next_expiry.at, due.next_expiry.amount_units) == (aware(50), 4 * U)
        ledger.settle_grants()
        written = ledger.find_by_user_id(user_id)
        assert (
            written.balance_units,
            written.held_units,
            written.paid_units,
            written.promotional_units,
            written.next_expiry,
        ) == figures
        clock.advance(40)  # the scheduled grant has expired, unwritten
        late = ledger.find_by_user_id(user_id)
        assert (late.balance_units, late.promotional_units) == (16 * U, 6 * U)
        assert late.next_expiry is not None
        # The held unit came from the soonest grant: 1 + 3 expire together.
        assert (late.next_expiry.at, late.next_expiry.amount_units) == (aware(100), 4 * U)
        assert ledger.get_grant(soon.id).held_units == U
        assert ledger.get_grant(same.id).remaining_units == 3 * U
        clock.advance(10 * 365 * 86400)  # leave nothing due for another test's sweep
        ledger.settle_grants()


def test_a_hold_cursor_with_a_stamp_strptime_would_read_is_still_refused():
    # strptime reads "%d" from " 1"; only digits are a stamp this module wrote.
    forged = encode_cursor("h", "202606 1120000000000", "hold_0a")
    with pytest.raises(ValidationError):
        decode_hold_cursor(forged)
    assert decode_hold_cursor(encode_cursor("h", "20260601120000000000", "hold_0a")) == (
        datetime(2026, 6, 1, 12, 0),
        "hold_0a",
    )


def test_a_read_while_something_is_due_sums_every_paid_grant_and_counts_one_unit(
    app, clock, user_id
):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 2 * U)
        ledger.top_up(user_id, 3 * U)
        ledger.grant(user_id, 1, expires_at=aware(100))
        ledger.grant(user_id, U, effective_at=aware(10))
        clock.advance(20)  # the second grant is due, not yet written
        due = ledger.find_by_user_id(user_id)
        assert (due.balance_units, due.paid_units, due.promotional_units) == (
            6 * U + 1,
            5 * U,
            U + 1,
        )
        assert due.next_expiry is not None
        assert (due.next_expiry.at, due.next_expiry.amount_units) == (aware(100), 1)
        clock.advance(10 * 365 * 86400)  # leave nothing due for another test's sweep
        ledger.settle_grants()


# --- what settling writes and signals ------------------------------------------------------


def _hear_expiries(app: Any) -> tuple[list[dict[str, Any]], Any]:
    heard: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        heard.append(kwargs)

    signals.grant_expired.connect(receiver, sender=app)
    return heard, receiver


def test_settled_expiries_are_plain_entries_and_a_pin_returning_late_carries_its_hold(
    app, clock, user_id
):
    heard, receiver = _hear_expiries(app)
    try:
        with app.app_context():
            ledger = current_ledger()
            promo = ledger.grant(user_id, 5 * U, reference="camp-1", expires_at=aware(60))
            hold = ledger.hold(user_id, 2 * U, expires_in_seconds=300)
            clock.advance(61)
            assert ledger.settle_grants() >= 1
            expired = ledger.history(user_id, limit=1).items[0]
            assert (expired.type, expired.amount_units, expired.grant_id) == (
                "expiration",
                -3 * U,
                promo.id,
            )
            # No reference (the grant's is the grant entry's), no hold, no
            # metadata, no allocations; an id the API reads back.
            assert (expired.reference, expired.hold_id, expired.metadata) == (None, None, {})
            assert expired.allocations == ()
            assert expired.id.startswith("ctx_")
            assert ledger.get_entry(expired.id) == expired
            ours = [kw for kw in heard if kw.get("grant_id") == promo.id]
            assert [(kw["entry"].id, kw["entry"].allocations) for kw in ours] == [(expired.id, ())]
            # The hold expires later: its pin goes back to the expired grant
            # and leaves at once, in the hold's name; the grant expired once.
            clock.advance(240)
            assert ledger.settle_grants() >= 1
            back = ledger.history(user_id, limit=1).items[0]
            assert (back.type, back.amount_units, back.hold_id, back.reference) == (
                "expiration",
                -2 * U,
                hold.id,
                None,
            )
            assert len([kw for kw in heard if kw.get("grant_id") == promo.id]) == 1
            assert ledger.find_by_user_id(user_id).balance_units == 0
    finally:
        signals.grant_expired.disconnect(receiver, sender=app)


def test_a_grant_expiring_while_all_of_it_is_held_signals_without_an_entry(app, clock, user_id):
    heard, receiver = _hear_expiries(app)
    try:
        with app.app_context():
            ledger = current_ledger()
            promo = ledger.grant(user_id, 2 * U, expires_at=aware(60))
            ledger.hold(user_id, 2 * U, expires_in_seconds=300)
            clock.advance(61)
            assert ledger.settle_grants() >= 1
            assert [kw for kw in heard if kw.get("grant_id") == promo.id] == [
                {"grant_id": promo.id, "entry": None}
            ]
            assert [e.type for e in ledger.history(user_id).items] == ["grant"]
    finally:
        signals.grant_expired.disconnect(receiver, sender=app)


def test_holds_expiring_at_one_instant_give_back_in_the_order_they_were_placed(
    app, clock, user_id
):
    # Six holds placed a second apart, all expiring at the same instant, all
    # pinned to a grant that has expired by then: each pin leaves with its
    # own entry, oldest hold first (not in the order of their random ids).
    with app.app_context():
        ledger = current_ledger()
        ledger.grant(user_id, 6 * U, expires_at=aware(60))
        placed = []
        for step in range(6):
            placed.append(ledger.hold(user_id, U, expires_in_seconds=600 - step).id)
            clock.advance(1)
        clock.set(aware(600))
        assert ledger.settle_grants() >= 1
        back = [e for e in ledger.history(user_id, limit=20).items if e.hold_id is not None]
        assert [e.hold_id for e in reversed(back)] == placed
        assert {e.type for e in back} == {"expiration"}


def test_ids_have_the_documented_prefix_and_a_hold_expiry_is_due_on_its_account(
    app, clock, user_id
):
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, 5 * U)
        given = ledger.grant(user_id, U)
        later = ledger.grant(user_id, U, effective_at=aware(3600))
        hold = ledger.hold(user_id, 2 * U, expires_in_seconds=60)
        ids = [(top_up.id, "ctx"), (given.id, "grant"), (later.id, "grant"), (hold.id, "hold")]
        for found, prefix in ids:
            assert re.fullmatch(prefix + r"_[0-9a-f]{24}", found), found
        # The hold made its expiry the account's next due time: settling at
        # that instant writes it, with no other event to bring it forward.
        clock.advance(60)
        assert ledger.settle_grants() >= 1
        h = HoldRow.__table__
        with ledger.engine.connect() as conn:
            status = conn.execute(sa.select(h.c.status).where(h.c.id == hold.id)).scalar()
        after = account(ledger, user_id)
        assert (status, after["held"]) == ("expired", 0)
        assert after["due"] == T0 + timedelta(seconds=3600)  # the scheduled grant


def test_a_capture_refused_while_something_is_due_settles_and_still_frees_its_hold(
    app, clock, user_id
):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.grant(user_id, 2 * U, effective_at=aware(60))
        hold = ledger.hold(user_id, 3 * U, expires_in_seconds=600)
        clock.advance(61)
        # The activation is due: the capture's first update is refused, the
        # activation is written, and the capture tried again, releasing the hold.
        captured = ledger.capture(hold.id)
        assert (captured.status, captured.captured_units) == ("captured", 3 * U)
        after = account(ledger, user_id)
        assert (after["balance"], after["held"]) == (9 * U, 0)


def test_a_grant_with_one_unit_left_is_still_drawn_first(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        promo = ledger.grant(user_id, 1, priority=10)
        charge = ledger.charge(user_id, 1)
        assert [(a.grant_id, a.amount_units) for a in charge.allocations] == [(promo.id, 1)]


def test_a_top_up_names_its_expiry_when_it_is_not_a_usable_instant(app, user_id):
    with app.app_context(), pytest.raises(ValidationError) as raised:
        current_ledger().top_up(user_id, U, expires_at=datetime(2100, 1, 1))  # naive
    assert [d["field"] for d in raised.value.details] == ["expires_at"]


def test_a_top_up_refused_for_its_expiry_leaves_its_key_unused(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        key = f"{user_id}-topup"
        with pytest.raises(ValidationError):
            ledger.top_up(user_id, U, expires_at=datetime(2100, 1, 1), idempotency_key=key)
        entry = ledger.top_up(user_id, U, idempotency_key=key)
        assert (entry.type, entry.amount_units) == ("topup", U)
