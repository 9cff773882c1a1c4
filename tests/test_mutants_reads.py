"""What the reads show and what settlement writes, pinned where mutation
testing of settlement, reading, the ledger API, pagination and money found
them unpinned.

Each test compares what a read returns with the rows as written (entries,
their allocations, grants), on every engine.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clock

from callora_credits import current_ledger
from callora_credits.core.money import UNITS_PER_USDC
from callora_credits.db.models import AllocationRow

U = UNITS_PER_USDC
T0 = datetime(2026, 6, 1, 12, 0)  # naive UTC, as stored


@pytest.fixture
def clock(app: Any) -> Clock:
    stopped = Clock(T0.replace(tzinfo=timezone.utc))
    app.extensions["callora_credits"].clock = stopped
    return stopped


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
