"""A concurrent mix with holds lets through exactly what the money allows.

Three rounds, each released together from twelve threads: holds and charges
racing for one balance; captures and releases racing for each hold while
top-ups land; then holds and charges draining what is left. Every request's
outcome is either the one success the money allows or the one refusal that
names why (``INSUFFICIENT_CREDITS`` for want of money, ``HOLD_NOT_PENDING``
for a hold another thread resolved first): any other error fails the test,
and the number of successes in each round is exact.

On PostgreSQL it also runs through a PgBouncer in transaction pooling mode.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from conftest import through_pgbouncer_too
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.core.records import Hold
from callora_credits.errors import HoldAmountExceeded, HoldNotPending, InsufficientCredits

WORKERS = 12
WAIT = 60  # seconds a barrier waits before it is declared broken


def race(app: Any, tasks: list[Callable[[Any], Any]]) -> list[Any]:
    """Run ``tasks`` (each given the ledger) from ``WORKERS`` threads released
    together, round-robin; each task's result or exception, in task order."""
    results: list[Any] = [None] * len(tasks)
    barrier = threading.Barrier(WORKERS)

    def work(worker: int) -> None:
        with app.app_context():
            ledger = current_ledger()
            barrier.wait(timeout=WAIT)
            for index in range(worker, len(tasks), WORKERS):
                try:
                    results[index] = tasks[index](ledger)
                except BaseException as exc:  # judged by the caller
                    results[index] = exc

    threads = [threading.Thread(target=work, args=(n,)) for n in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def refused(results: list[Any], allowed: type[BaseException]) -> int:
    """How many results are ``allowed`` refusals; any other exception fails."""
    others = [r for r in results if isinstance(r, BaseException) and not isinstance(r, allowed)]
    assert others == [], others[:3]
    return sum(isinstance(r, allowed) for r in results)


def balance(app: Any, user_id: str) -> tuple[int, int, int]:
    with app.app_context():
        shown = current_ledger().find_by_user_id(user_id)
    assert shown is not None
    return shown.balance_units, shown.held_units, shown.available_units


@through_pgbouncer_too
def test_holds_charges_captures_and_releases_let_through_what_the_money_allows(app, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 500)

    # Round 1: 24 reservations and debits of 50 on 500: exactly ten succeed.
    def spend(kind: str) -> Callable[[Any], Any]:
        if kind == "hold":
            return lambda ledger: ledger.hold(user_id, 50, metadata={"round": "1"})
        return lambda ledger: ledger.charge(user_id, 50)

    kinds = ["hold", "charge"] * WORKERS
    first = race(app, [spend(kind) for kind in kinds])
    assert refused(first, InsufficientCredits) == 14
    holds = [r for r in first if isinstance(r, Hold)]
    charges = sum(
        1
        for r, kind in zip(first, kinds, strict=True)
        if kind == "charge" and not isinstance(r, BaseException)
    )
    assert len(holds) + charges == 10
    assert balance(app, user_id) == (500 - 50 * charges, 50 * len(holds), 0)

    # A capture beyond the hold is refused before any race, and changes nothing.
    with app.app_context():
        ledger = current_ledger()
        for hold in holds:
            try:
                ledger.capture(hold.id, 51)
            except HoldAmountExceeded:
                continue
            raise AssertionError(f"captured 51 of a hold of 50: {hold.id}")
    assert balance(app, user_id) == (500 - 50 * charges, 50 * len(holds), 0)

    # Round 2: for every hold, a capture (of 0, 20 or all of it) races a
    # release, and exactly one of the two wins; twelve top-ups of 50 land.
    wanted = [(0, 20, None)[n % 3] for n in range(len(holds))]

    def capture(hold: Hold, units: int | None) -> Callable[[Any], Any]:
        return lambda ledger: ledger.capture(hold.id, units)

    def release(hold: Hold) -> Callable[[Any], Any]:
        return lambda ledger: ledger.release(hold.id)

    tasks: list[Callable[[Any], Any]] = []
    for hold, units in zip(holds, wanted, strict=True):
        tasks += [capture(hold, units), release(hold)]
    tasks += [lambda ledger: ledger.top_up(user_id, 50) for _ in range(WORKERS)]
    second = race(app, tasks)
    assert refused(second, HoldNotPending) == len(holds)
    captured = 0
    for n, (hold, units) in enumerate(zip(holds, wanted, strict=True)):
        by_capture, by_release = second[2 * n], second[2 * n + 1]
        winners = [r for r in (by_capture, by_release) if isinstance(r, Hold)]
        assert len(winners) == 1, (hold.id, by_capture, by_release)
        won = winners[0]
        if won is by_capture and units != 0:
            expected = 50 if units is None else units
            assert (won.status, won.captured_units) == ("captured", expected)
            captured += expected
        else:
            assert (won.status, won.captured_units) == ("released", 0)
    assert all(r.type == "topup" for r in second[2 * len(holds) :])
    left = 500 - 50 * charges - captured + 50 * WORKERS
    assert balance(app, user_id) == (left, 0, left)

    # Round 3: reservations and debits of 10 drain what is left, exactly.
    kinds = ["hold", "charge"] * (left // 10 // 2 + WORKERS)
    third = race(
        app,
        [
            (lambda ledger: ledger.hold(user_id, 10))
            if kind == "hold"
            else (lambda ledger: ledger.charge(user_id, 10))
            for kind in kinds
        ],
    )
    assert refused(third, InsufficientCredits) == len(kinds) - left // 10
    drained = Counter(
        kind for r, kind in zip(third, kinds, strict=True) if not isinstance(r, BaseException)
    )
    assert drained["hold"] + drained["charge"] == left // 10
    assert balance(app, user_id) == (left - 10 * drained["charge"], 10 * drained["hold"], 0)

    with app.app_context():
        ledger = current_ledger()
        assert ledger.reconcile(user_id).ok
        engine = ledger.engine
    problems = ledger_problems(engine, user_id)
    assert problems == [], "\n".join(problems)
