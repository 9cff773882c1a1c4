"""What reconcile and the rows' SQL must keep, pinned where mutation testing
of ``core/reconcile.py`` and the ``db`` row modules found it unpinned.

Every test that reads or writes the tables runs on every engine, against
real tables.
"""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from conftest import CLOCK_START as T0

from callora_credits import current_ledger
from callora_credits.core.money import UNITS_PER_USDC
from callora_credits.db import grant_rows, store

U = UNITS_PER_USDC


def test_a_dead_grant_still_holding_for_a_pending_hold_is_live(app, clock, user_id):
    """A grant that expired while pinned by a pending hold can still change
    the balance (the hold's capture or release moves its held part), so it is
    one of the live grants, down to a single held unit; once the hold is
    released it is not."""
    g = grant_rows.grants
    with app.app_context():
        ledger = current_ledger()
        dying = ledger.grant(user_id, U, expires_at=T0 + timedelta(seconds=5))
        hold = ledger.hold(user_id, 1, expires_in_seconds=3600)
        clock.advance(10)
        paid = ledger.top_up(user_id, U)
        with ledger.engine.begin() as conn:
            paid_grant = conn.execute(
                sa.select(g.c.id).where(g.c.transaction_id == paid.id)
            ).scalar()
            rows = {r.id: r for r in grant_rows.live_grants(conn, user_id)}
        assert set(rows) == {dying.id, paid_grant}
        assert (rows[dying.id].status, int(rows[dying.id].held_units)) == ("expired", 1)
        ledger.release(hold.id)
        with ledger.engine.begin() as conn:
            assert {r.id for r in grant_rows.live_grants(conn, user_id)} == {paid_grant}


def test_an_unsupported_engine_is_refused_by_name():
    """An engine the library does not support is refused before any SQL is
    sent, with its name in the message."""
    oracle = SimpleNamespace(dialect=SimpleNamespace(name="oracle"))
    with pytest.raises(RuntimeError) as refused:
        store.insert_account_if_missing(oracle, "user_1", T0)  # type: ignore[arg-type]
    assert str(refused.value) == "callora_credits does not support the oracle dialect"
