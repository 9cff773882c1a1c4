"""The held total on the account row follows every operation that changes
what is available, so the one conditional update that guards a hold, a
charge or a capture sees every reservation.

Judged by ``tests/invariants.py`` (the raw rows: the account's
``held_units`` equals what the pending holds reserve, within the balance)
and by the raw account row itself, never by the library alone.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import Clock
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.core.records import Hold
from callora_credits.db.models import Account, HoldRow
from callora_credits.errors import HoldNotPending, InsufficientCredits

WORKERS = 12
WAIT = 60


def row_held(ledger: Any, user_id: str) -> tuple[int, int]:
    """(balance_units, held_units) of the account row as written."""
    accounts = Account.__table__
    with ledger.engine.connect() as conn:
        row = conn.execute(
            sa.select(accounts.c.balance_units, accounts.c.held_units).where(
                accounts.c.user_id == user_id
            )
        ).one()
    return int(row[0]), int(row[1])


def test_held_total_follows_every_operation(app: Any, clock: Clock, user_id: str) -> None:
    with app.app_context():
        ledger = current_ledger()

        def check(balance: int, held: int) -> None:
            assert row_held(ledger, user_id) == (balance, held)
            shown = ledger.find_by_user_id(user_id)
            assert (shown.balance_units, shown.held_units) == (balance, held)
            assert ledger_problems(ledger.engine, user_id, clock.now) == []

        ledger.top_up(user_id, 100)
        check(100, 0)
        first = ledger.hold(user_id, 30)
        check(100, 30)
        second = ledger.hold(user_id, 20)
        check(100, 50)
        # What is available is balance - held, for a hold, a charge and a
        # negative adjustment alike.
        with pytest.raises(InsufficientCredits):
            ledger.hold(user_id, 51)
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 51)
        with pytest.raises(InsufficientCredits):
            ledger.adjust(user_id, -51, "too much")
        with pytest.raises(InsufficientCredits):
            ledger.update_balance(user_id, 49)
        check(100, 50)
        ledger.charge(user_id, 45)
        check(55, 50)
        ledger.adjust(user_id, -5, "correction")
        check(50, 50)
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 1)

        # A partial capture spends part and releases the whole hold.
        ledger.capture(first.id, 10)
        check(40, 20)
        ledger.release(second.id)
        check(40, 0)
        full = ledger.hold(user_id, 15)
        check(40, 15)
        ledger.capture(full.id)
        check(25, 0)

        # A hold's expiry: reads stop counting it at the instant, the row
        # keeps it until the expiry is written.
        ledger.hold(user_id, 25, expires_in_seconds=60)
        check(25, 25)
        clock.advance(60)
        assert ledger.find_by_user_id(user_id).held_units == 0
        assert row_held(ledger, user_id) == (25, 25)
        # Other tests' holds may fall due on the same clock: at least this one.
        assert ledger.expire_holds() >= 1
        check(25, 0)
        ledger.hold(user_id, 5, expires_in_seconds=1)
        clock.advance(1)
        ledger.hold(user_id, 25)  # writes the expiry first, then holds
        check(25, 25)


def test_voided_grant_under_a_hold(app: Any, clock: Clock, user_id: str) -> None:
    """Voiding a fully held grant changes no account figure; the hold's
    release then takes the held total down and the amount leaves."""
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 50)
        promo = ledger.grant(user_id, 10, priority=0)
        hold = ledger.hold(user_id, 10)
        assert row_held(ledger, user_id) == (60, 10)

        ledger.void_grant(promo.id)
        assert row_held(ledger, user_id) == (60, 10)
        assert ledger_problems(ledger.engine, user_id, clock.now) == []

        ledger.release(hold.id)
        assert row_held(ledger, user_id) == (50, 0)
        assert ledger_problems(ledger.engine, user_id, clock.now) == []


def test_a_tampered_held_total_is_caught(app: Any, user_id: str) -> None:
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 100)
        ledger.hold(user_id, 30)
        assert ledger_problems(ledger.engine, user_id) == []
        assert ledger.reconcile(user_id).ok

        accounts = Account.__table__
        with ledger.engine.begin() as conn:
            conn.execute(
                accounts.update().where(accounts.c.user_id == user_id).values(held_units=29)
            )

        problems = ledger_problems(ledger.engine, user_id)
        assert problems == ["account held_units 29 != pending holds reserve 30"]
        found = [m.problem for m in ledger.reconcile(user_id).mismatches]
        assert found == ["held total 0.0000029 != what pending holds reserve 0.0000030"]

        # Pending holds beyond the balance (rows edited by hand).
        holds = HoldRow.__table__
        with ledger.engine.begin() as conn:
            conn.execute(holds.update().where(holds.c.user_id == user_id).values(amount_units=101))
        assert "pending holds reserve 101 of a balance of 100" in ledger_problems(
            ledger.engine, user_id
        )
        found = [m.problem for m in ledger.reconcile(user_id).mismatches]
        assert "pending holds reserve 0.0000101, more than the balance 0.0000100" in found, found


def race(app: Any, tasks: list[Any]) -> list[Any]:
    """Run ``tasks`` (each given the ledger) from ``WORKERS`` threads
    released together; each task's result or exception, in task order."""
    results: list[Any] = [None] * len(tasks)
    barrier = threading.Barrier(WORKERS)

    def work(worker: int) -> None:
        with app.app_context():
            ledger = current_ledger()
            barrier.wait(timeout=WAIT)
            for index in range(worker, len(tasks), WORKERS):
                try:
                    results[index] = tasks[index](ledger)
                except BaseException as exc:  # judged below
                    results[index] = exc

    threads = [threading.Thread(target=work, args=(n,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_racing_holds_and_charges_never_overdraw(app: Any, user_id: str) -> None:
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 1000)

    def hold(ledger: Any) -> Any:
        return ledger.hold(user_id, 100)

    def charge(ledger: Any) -> Any:
        return ledger.charge(user_id, 100)

    # 36 holds and charges of 100 on 1000: exactly ten get through.
    first = race(app, [hold, charge] * 18)
    others = [r for r in first if isinstance(r, BaseException)]
    assert all(isinstance(r, InsufficientCredits) for r in others), others[:3]
    assert len(others) == 26
    holds = [r for r in first if isinstance(r, Hold)]

    # Releases and captures racing with new holds and charges on what they free.
    def resolve(index: int, held: Hold) -> Any:
        if index % 2:
            return lambda ledger: ledger.release(held.id)
        return lambda ledger: ledger.capture(held.id, 40)

    tasks = [resolve(n, held) for n, held in enumerate(holds)] + [hold, charge] * 8
    second = race(app, tasks)
    others = [r for r in second if isinstance(r, BaseException)]
    assert all(isinstance(r, InsufficientCredits | HoldNotPending) for r in others), others[:3]

    with app.app_context():
        ledger = current_ledger()
        balance, held = row_held(ledger, user_id)
        shown = ledger.find_by_user_id(user_id)
        assert shown.available_units >= 0
        assert (shown.balance_units, shown.held_units) == (balance, held)
        assert ledger_problems(ledger.engine, user_id) == []
        assert ledger.reconcile(user_id).ok
