"""Credit grants through the Python API, on every engine.

- The consumption order: every combination of priority, expiry, category and
  creation order, charged in steps, drawn exactly as an order computed here
  (independently of the library) says.
- Time, on a clock the test controls: an expiry between two reads changes
  the read without a write; the next operation writes the due entries first,
  at their instants; ``settle_grants`` writes everything once, run twice and
  run concurrently.
- Holds pin grants across expiry and void; refunds go back to the grants a
  debit drew from, last drawn first, and leave at once where the grant died.
- Scheduled grants count against the balance limit and enter at their time.

State is judged with plain SQL (``tests/invariants.py``), never by the
library's own ``reconcile()`` alone.
"""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import CLOCK_START as START
from conftest import Clock
from flask import Flask
from invariants import ledger_problems, snapshot

from callora_credits import current_ledger
from callora_credits.core.ledger import Ledger
from callora_credits.db.models import LedgerEntry
from callora_credits.errors import (
    BalanceLimitExceeded,
    GrantNotActive,
    InsufficientCredits,
    ValidationError,
)

U = 10_000_000


@pytest.fixture
def ledger(app: Flask, clock: Clock) -> Iterator[Ledger]:
    with app.app_context():
        yield current_ledger()


def engine_of(app: Flask) -> Any:
    return app.extensions["sqlalchemy"].engines[None]


def exact(app: Flask, user_id: str, clock: Clock) -> None:
    """The independent checks from the raw tables, and the library's own."""
    problems = ledger_problems(engine_of(app), user_id, clock.now)
    assert problems == [], "\n".join(problems)
    with app.app_context():
        report = current_ledger().reconcile(user_id)
    assert report.ok, report.mismatches


def entries(app: Flask, user_id: str) -> list[Any]:
    return snapshot(engine_of(app), user_id).entries


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


# --- the consumption order -------------------------------------------------------


def expected_order(grants: list[dict[str, Any]]) -> list[str]:
    """The order of the rules, written out here on its own."""

    def key(g: dict[str, Any]) -> tuple[Any, ...]:
        expires = g["expires_at"]
        return (
            g["priority"],
            0 if expires is not None else 1,
            expires or START,
            0 if g["category"] == "promotional" else 1,
            g["effective_at"],
            g["created"],
        )

    return [g["id"] for g in sorted(grants, key=key)]


def test_charges_draw_in_the_consumption_order(app, ledger, clock, user_id):
    # Every combination of two priorities, three expiries (none, soon, later),
    # two categories; created in a shuffled order, one second apart (so
    # creation order and effective_at differ from the id order).
    rng = random.Random(7)
    combos = list(itertools.product((10, 50), (None, 5, 9), ("paid", "promotional")))
    rng.shuffle(combos)
    made: list[dict[str, Any]] = []
    for created, (priority, expiry_hours, category) in enumerate(combos):
        clock.advance(1)
        expires = None if expiry_hours is None else START + hours(expiry_hours)
        amount = (created + 1) * U
        if category == "paid":
            entry = ledger.top_up(user_id, amount, priority=priority, expires_at=expires)
            grant_id = entry.grant_id
        else:
            grant_id = ledger.grant(
                user_id, amount, category=category, priority=priority, expires_at=expires
            ).id
        made.append(
            {
                "id": grant_id,
                "priority": priority,
                "expires_at": expires,
                "category": category,
                "effective_at": clock.now,
                "created": created,
                "left": amount,
            }
        )
    order = expected_order(made)
    by_id = {g["id"]: g for g in made}
    total = sum(g["left"] for g in made)
    # Charge in uneven steps until the balance is gone; each charge must draw
    # from the front of the order, in order, exactly what is left there.
    steps = [3 * U + 1, 7 * U, U // 2, 11 * U, 13 * U + 5]
    spent = 0
    while spent < total:
        units = min(steps[len(steps) and spent % len(steps)], total - spent)
        entry = ledger.charge(user_id, units)
        want = []
        left = units
        for grant_id in order:
            if left == 0:
                break
            part = min(by_id[grant_id]["left"], left)
            if part:
                want.append((grant_id, part))
                by_id[grant_id]["left"] -= part
                left -= part
        got = [(a.grant_id, a.amount_units) for a in entry.allocations]
        assert got == want
        spent += units
    exact(app, user_id, clock)
    with pytest.raises(InsufficientCredits):
        ledger.charge(user_id, 1)


def test_effective_time_then_creation_breaks_ties(app, ledger, clock, user_id):
    # Same priority, expiry and category: the earlier effective_at first, and
    # at one effective_at, the one created first.
    late = ledger.grant(user_id, 2 * U, effective_at=START + hours(1))
    first = ledger.grant(user_id, 2 * U)
    second = ledger.grant(user_id, 2 * U)
    clock.advance(2 * 3600)
    entry = ledger.charge(user_id, 5 * U)
    assert [(a.grant_id, a.amount_units) for a in entry.allocations] == [
        (first.id, 2 * U),
        (second.id, 2 * U),
        (late.id, U),
    ]
    exact(app, user_id, clock)


# --- time ------------------------------------------------------------------------


def test_an_expiry_changes_reads_without_a_write(app, ledger, clock, user_id):
    ledger.top_up(user_id, 10 * U)
    promo = ledger.grant(user_id, 4 * U, expires_at=START + hours(1))
    before = ledger.find_by_user_id(user_id)
    assert (before.balance_units, before.promotional_units, before.paid_units) == (
        14 * U,
        4 * U,
        10 * U,
    )
    assert before.next_expiry is not None
    assert (before.next_expiry.at, before.next_expiry.amount_units) == (START + hours(1), 4 * U)
    written = snapshot(engine_of(app), user_id)
    clock.set(START + hours(1))  # the instant it expires
    after = ledger.find_by_user_id(user_id)
    assert (after.balance_units, after.promotional_units, after.next_expiry) == (10 * U, 0, None)
    assert after.updated_at == before.updated_at
    grant = ledger.get_grant(promo.id)
    assert (grant.status, grant.remaining_units) == ("expired", 0)
    assert [g.id for g in ledger.grants(user_id, status="expired").items] == [promo.id]
    # Nothing was written by any of those reads.
    assert snapshot(engine_of(app), user_id) == written


def test_the_next_operation_writes_the_due_entries_first(app, ledger, clock, user_id):
    ledger.top_up(user_id, 10 * U)
    a = ledger.grant(user_id, 3 * U, expires_at=START + hours(1))
    b = ledger.grant(user_id, 2 * U, expires_at=START + hours(2))
    scheduled = ledger.grant(user_id, 5 * U, effective_at=START + hours(1.5))
    clock.set(START + hours(3))
    charge = ledger.charge(user_id, U)
    rows = entries(app, user_id)
    assert [(r.type, int(r.amount_units), r.grant_id) for r in rows[3:]] == [
        ("expiration", -3 * U, a.id),
        ("grant", 5 * U, scheduled.id),
        ("expiration", -2 * U, b.id),
        ("charge", -U, None),
    ]
    naive = [r.created_at for r in rows[3:]]
    assert naive == [
        (START + hours(1)).replace(tzinfo=None),
        (START + hours(1.5)).replace(tzinfo=None),
        (START + hours(2)).replace(tzinfo=None),
        (START + hours(3)).replace(tzinfo=None),
    ]
    assert [int(r.balance_after_units) for r in rows[3:]] == [12 * U, 17 * U, 15 * U, 14 * U]
    assert charge.seq == 7
    assert ledger.get_grant(scheduled.id).transaction_id == rows[4].id
    exact(app, user_id, clock)


def test_settle_grants_writes_everything_once(app, ledger, clock, user_id):
    users = [user_id, user_id + "-b", user_id + "-c"]
    for user in users:
        ledger.top_up(user, 5 * U)
        ledger.grant(user, 2 * U, expires_at=START + hours(1))
        ledger.grant(user, 3 * U, effective_at=START + hours(2))
        ledger.hold(user, U, expires_in_seconds=600)
    clock.set(START + hours(4))
    counts: list[int] = []
    errors: list[BaseException] = []

    def settle() -> None:
        try:
            with app.app_context():
                counts.append(current_ledger().settle_grants())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=settle) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # Per user: the hold expired first and gave its pin back to the
    # promotional grant, which then expired whole; then the activation.
    # (Other tests' accounts in this database may have had things due too.)
    assert sum(counts) >= 2 * len(users)
    assert ledger.settle_grants() == 0
    for user in users:
        kinds = [(r.type, int(r.amount_units)) for r in entries(app, user)]
        assert kinds == [
            ("topup", 5 * U),
            ("grant", 2 * U),
            ("expiration", -2 * U),
            ("grant", 3 * U),
        ]
        assert ledger.find_by_user_id(user).balance_units == 8 * U
        hold_rows = snapshot(engine_of(app), user).holds
        assert [h.status for h in hold_rows] == ["expired"]
        exact(app, user, clock)


# --- holds across expiry and void ---------------------------------------------------


def test_a_capture_spends_a_grant_that_expired_and_the_rest_expires(app, ledger, clock, user_id):
    ledger.top_up(user_id, 2 * U)
    promo = ledger.grant(user_id, 5 * U, expires_at=START + hours(1))
    hold = ledger.hold(user_id, 4 * U, expires_in_seconds=2 * 3600)
    assert ledger.get_grant(promo.id).held_units == 4 * U
    clock.set(START + hours(1.5))
    # Expired, but what the hold pinned stays (and is capturable).
    assert ledger.find_by_user_id(user_id).balance_units == 6 * U
    captured = ledger.capture(hold.id, U)
    assert captured.status == "captured"
    rows = entries(app, user_id)
    assert [(r.type, int(r.amount_units), r.grant_id) for r in rows[2:]] == [
        ("expiration", -U, promo.id),  # the unheld 1 at 13:00
        ("hold_capture", -U, None),
        ("expiration", -3 * U, promo.id),  # the uncaptured 3, back to a dead grant
    ]
    entry = ledger.get_entry(captured.transaction_id)
    assert [(a.grant_id, a.amount_units) for a in entry.allocations] == [(promo.id, U)]
    balance = ledger.find_by_user_id(user_id)
    assert (balance.balance_units, balance.held_units, balance.promotional_units) == (
        2 * U,
        0,
        0,
    )
    exact(app, user_id, clock)


def test_a_release_after_a_void_leaves_at_once(app, ledger, clock, user_id):
    paid = ledger.top_up(user_id, 3 * U)
    hold = ledger.hold(user_id, 2 * U)
    voided = ledger.void_grant(paid.grant_id)
    assert (voided.status, voided.remaining_units, voided.held_units) == ("voided", 0, 2 * U)
    assert ledger.find_by_user_id(user_id).balance_units == 2 * U
    ledger.release(hold.id)
    rows = entries(app, user_id)
    assert [(r.type, int(r.amount_units)) for r in rows] == [
        ("topup", 3 * U),
        ("void", -U),
        ("void", -2 * U),
    ]
    assert ledger.find_by_user_id(user_id).balance_units == 0
    with pytest.raises(GrantNotActive):
        ledger.void_grant(paid.grant_id)
    exact(app, user_id, clock)


def test_a_hold_expiry_gives_its_pins_back(app, ledger, clock, user_id):
    ledger.top_up(user_id, 5 * U)
    promo = ledger.grant(user_id, 2 * U, expires_at=START + hours(2))
    ledger.hold(user_id, 3 * U, expires_in_seconds=3600)
    assert ledger.find_by_user_id(user_id).available_units == 4 * U
    clock.set(START + hours(1))
    balance = ledger.find_by_user_id(user_id)
    assert (balance.held_units, balance.available_units) == (0, 7 * U)
    assert ledger.get_grant(promo.id).remaining_units == 2 * U
    clock.set(START + hours(3))
    assert ledger.find_by_user_id(user_id).balance_units == 5 * U
    ledger.charge(user_id, U)
    exact(app, user_id, clock)


# --- refunds ------------------------------------------------------------------------


def test_refunds_go_back_last_drawn_first(app, ledger, clock, user_id):
    paid = ledger.top_up(user_id, 5 * U)
    promo = ledger.grant(user_id, 3 * U, expires_at=START + hours(1))
    charge = ledger.charge(user_id, 6 * U)  # promo 3, then paid 3
    first = ledger.refund(charge.id, 2 * U)
    assert [(a.grant_id, a.amount_units) for a in first.allocations] == [(paid.grant_id, 2 * U)]
    clock.set(START + hours(2))  # the promotional grant has expired
    second = ledger.refund(charge.id)
    assert [(a.grant_id, a.amount_units) for a in second.allocations] == [
        (paid.grant_id, U),
        (promo.id, 3 * U),
    ]
    rows = entries(app, user_id)
    assert [(r.type, int(r.amount_units)) for r in rows[-2:]] == [
        ("refund", 4 * U),
        ("expiration", -3 * U),
    ]
    assert ledger.find_by_user_id(user_id).balance_units == 5 * U
    exact(app, user_id, clock)


# --- scheduled grants and the limit -----------------------------------------------


def test_scheduled_grants_count_against_the_limit(app, ledger, clock, user_id):
    app.config["CREDITS_MAX_BALANCE_USDC"] = "10"
    ledger = current_ledger()
    ledger.top_up(user_id, 4 * U)
    scheduled = ledger.grant(user_id, 5 * U, effective_at=START + hours(1))
    assert scheduled.status == "scheduled"
    assert scheduled.transaction_id is None
    assert ledger.find_by_user_id(user_id).balance_units == 4 * U
    with pytest.raises(BalanceLimitExceeded):
        ledger.top_up(user_id, 2 * U)
    ledger.top_up(user_id, U)
    clock.set(START + hours(1))
    assert ledger.find_by_user_id(user_id).balance_units == 10 * U
    assert ledger.get_grant(scheduled.id).status == "active"
    exact(app, user_id, clock)


def test_bad_grants_change_nothing(app, ledger, clock, user_id):
    ledger.top_up(user_id, U)
    before = snapshot(engine_of(app), user_id)
    bad: list[dict[str, Any]] = [
        {"category": "gift"},
        {"priority": 101},
        {"priority": True},
        {"priority": 5.0},
        {"expires_at": START - hours(1)},
        {"expires_at": START},
        {"effective_at": START + hours(2), "expires_at": START + hours(1)},
        {"expires_at": datetime(2026, 7, 1)},  # naive
        {"effective_at": "2026-07-01T00:00:00Z"},
    ]
    for kwargs in bad:
        with pytest.raises(ValidationError):
            ledger.grant(user_id, U, **kwargs)
    with pytest.raises(ValidationError):
        ledger.top_up(user_id, U, expires_at=START)
    with pytest.raises(ValidationError):
        ledger.top_up(user_id, U, priority=-1)
    assert snapshot(engine_of(app), user_id) == before


def test_entries_written_before_grants_are_refunded_into_a_paid_grant(app, ledger, clock, user_id):
    # A charge from before grants existed has no allocations.
    ledger.top_up(user_id, 5 * U)
    charge = ledger.charge(user_id, 2 * U)
    al = sa.table("credits_allocations", sa.column("entry_id"))
    with engine_of(app).begin() as conn:
        conn.execute(sa.delete(al).where(al.c.entry_id == charge.id))
        # ... and its grant figures are as the migration would have left them.
        g = sa.table(
            "credits_grants",
            sa.column("user_id"),
            sa.column("amount_units"),
            sa.column("origin"),
        )
        conn.execute(
            sa.update(g)
            .where(g.c.user_id == user_id)
            .values(amount_units=3 * U, origin="migration")
        )
    refund = ledger.refund(charge.id)
    assert len(refund.allocations) == 1
    made = ledger.get_grant(refund.allocations[0].grant_id)
    assert (made.category, made.amount_units, made.expires_at) == ("paid", 2 * U, None)
    assert made.transaction_id == refund.id
    t = LedgerEntry.__table__
    with engine_of(app).connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).where(t.c.user_id == user_id)).scalar()
    assert count == 3


# --- reconcile sees what breaks the grants ----------------------------------------


def _tamper(app: Flask, statement: Any) -> None:
    with engine_of(app).begin() as conn:
        conn.execute(statement)


def test_reconcile_checks_the_grants(app, ledger, clock, user_id):
    paid = ledger.top_up(user_id, 10 * U)
    promo = ledger.grant(user_id, 5 * U)
    charge = ledger.charge(user_id, 7 * U)
    hold = ledger.hold(user_id, 2 * U)
    exact(app, user_id, clock)
    g = sa.table(
        "credits_grants", sa.column("id"), sa.column("remaining_units"), sa.column("held_units")
    )
    al = sa.table(
        "credits_allocations", sa.column("entry_id"), sa.column("hold_id"), sa.column("position")
    )
    h = sa.table("credits_holds", sa.column("id"), sa.column("status"))
    cases = [
        # A grant's remaining moved with no entry to explain it.
        (
            sa.update(g)
            .where(g.c.id == paid.grant_id)
            .values(remaining_units=g.c.remaining_units + 1),
            sa.update(g)
            .where(g.c.id == paid.grant_id)
            .values(remaining_units=g.c.remaining_units - 1),
            ["balance", "grant"],
        ),
        # A debit's allocation lost.
        (
            sa.delete(al).where(al.c.entry_id == charge.id, al.c.position == 1),
            None,
            ["allocations add up", "grant"],
        ),
    ]
    for tamper, undo, words in cases:
        _tamper(app, tamper)
        report = ledger.reconcile(user_id)
        text = " | ".join(m.problem for m in report.mismatches)
        assert not report.ok
        for word in words:
            assert word in text, text
        if undo is not None:
            _tamper(app, undo)
    # A pending hold whose pinned amount the grants no longer show.
    _tamper(app, sa.update(h).where(h.c.id == hold.id).values(status="released"))
    report = ledger.reconcile(user_id)
    assert any("pending holds reserve" in m.problem for m in report.mismatches)
    assert promo.id


# --- concurrency while grants expire ------------------------------------------------


def test_mixed_load_while_grants_expire(app, ledger, clock, user_id):
    """Threads charge, hold, capture, release, refund, grant and void on one
    user with several grants while the clock moves past their expiries."""
    ledger.top_up(user_id, 40 * U)
    for n in range(6):
        ledger.grant(
            user_id,
            (n + 2) * U,
            priority=(n * 37) % 101,
            expires_at=START + timedelta(minutes=5 + 7 * n),
            category="paid" if n % 3 == 0 else "promotional",
        )
    errors: list[BaseException] = []
    lock = threading.Lock()
    done: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with app.app_context():
                mine = current_ledger()
                for _ in range(25):
                    kind = rng.choice(
                        ["charge", "charge", "hold", "grant", "refund", "void", "tick"]
                    )
                    try:
                        if kind == "charge":
                            entry = mine.charge(user_id, rng.randint(1, 3 * U))
                            with lock:
                                done.append(entry.id)
                        elif kind == "hold":
                            hold = mine.hold(
                                user_id,
                                rng.randint(1, 2 * U),
                                expires_in_seconds=rng.randint(30, 900),
                            )
                            if rng.random() < 0.5:
                                mine.capture(hold.id, rng.randint(0, hold.amount_units))
                            elif rng.random() < 0.5:
                                mine.release(hold.id)
                        elif kind == "grant":
                            starts = clock.now + timedelta(minutes=rng.randint(0, 3))
                            try:
                                mine.grant(
                                    user_id,
                                    rng.randint(1, 2 * U),
                                    effective_at=starts,
                                    expires_at=starts + timedelta(minutes=rng.randint(3, 20)),
                                )
                            except ValidationError as exc:
                                # Another thread moved the clock past it meanwhile.
                                if exc.details[0]["field"] != "expires_at":
                                    raise
                        elif kind == "refund":
                            with lock:
                                target = rng.choice(done) if done else None
                            if target is not None:
                                mine.refund(target, 1)
                        elif kind == "void":
                            page = mine.grants(user_id)
                            if page.items:
                                mine.void_grant(rng.choice(page.items).id)
                        else:
                            with lock:
                                clock.advance(rng.randint(10, 120))
                    except (InsufficientCredits, GrantNotActive):
                        pass
                    except Exception as exc:  # a refund past what is left, a hold gone
                        if type(exc).__name__ not in (
                            "RefundExceedsCharge",
                            "HoldNotPending",
                            "BalanceLimitExceeded",
                        ):
                            raise
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [], errors
    clock.advance(3600)
    ledger.settle_grants()
    exact(app, user_id, clock)
    balance = ledger.find_by_user_id(user_id)
    assert balance.balance_units >= 0
    assert balance.paid_units + balance.promotional_units == balance.balance_units


def _grant_child(url: str, tests_dir: str, user_id: str, seed: int, out: Any) -> None:
    """One OS process: its own app, charging, holding, refunding and giving
    short-lived grants on the shared user for about three seconds."""
    import sys
    import time
    import traceback

    try:
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        from conftest import make_app

        app = make_app(url)
        rng = random.Random(seed)
        done: list[str] = []
        with app.app_context():
            ledger = current_ledger()
            stop = time.monotonic() + 3
            while time.monotonic() < stop:
                kind = rng.choice(["charge", "charge", "hold", "grant", "refund"])
                try:
                    if kind == "charge":
                        done.append(ledger.charge(user_id, rng.randint(1, U)).id)
                    elif kind == "hold":
                        hold = ledger.hold(user_id, rng.randint(1, U), expires_in_seconds=1)
                        if rng.random() < 0.5:
                            ledger.capture(hold.id, rng.randint(0, hold.amount_units))
                    elif kind == "grant":
                        now = datetime.now(timezone.utc)
                        ledger.grant(
                            user_id,
                            rng.randint(1, U),
                            expires_at=now + timedelta(milliseconds=rng.randint(200, 1500)),
                        )
                    elif done:
                        ledger.refund(rng.choice(done), 1)
                except (InsufficientCredits, GrantNotActive):
                    pass
                except Exception as exc:
                    if type(exc).__name__ not in ("RefundExceedsCharge", "HoldNotPending"):
                        raise
            app.extensions["sqlalchemy"].engine.dispose()
        out.put((seed, ""))
    except BaseException:
        out.put((seed, traceback.format_exc()))


def test_processes_while_grants_expire(databases, engine_name, user_id):
    """Processes on one user whose grants expire (on the real clock) while
    they charge, hold, capture, refund and give more short-lived grants."""
    if engine_name == "sqlite":
        pytest.skip("multi-process load targets the server engines; SQLite is embedded")
    import multiprocessing
    from pathlib import Path

    from conftest import make_app

    url = databases.url(engine_name)
    app = make_app(url)
    now = datetime.now(timezone.utc)
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 20 * U)
        for n in range(5):
            ledger.grant(user_id, 3 * U, expires_at=now + timedelta(seconds=1 + n / 2))
    mp = multiprocessing.get_context("spawn")
    out = mp.Queue()
    children = [
        mp.Process(
            target=_grant_child,
            args=(url, str(Path(__file__).parent), user_id, seed, out),
        )
        for seed in range(3)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert [error for _, error in results if error] == []
    with app.app_context():
        ledger = current_ledger()
        ledger.settle_grants()
        engine = app.extensions["sqlalchemy"].engine
        problems = ledger_problems(engine, user_id, datetime.now(timezone.utc))
        assert problems == [], "\n".join(problems)
        assert ledger.reconcile(user_id).ok
        kinds = {row.type for row in snapshot(engine, user_id).entries}
        assert "expiration" in kinds
        engine.dispose()


def test_refunds_across_a_void_leave_again(app, ledger, clock, user_id):
    paid = ledger.top_up(user_id, 4 * U)
    promo = ledger.grant(user_id, 3 * U)
    charge = ledger.charge(user_id, 5 * U)  # promo 3, then paid 2
    ledger.grant(user_id, U, reference="spare")
    other = ledger.charge(user_id, 2 * U, reference="c2")  # the spare 1, then paid 1
    voided = ledger.grant(user_id, 2 * U, priority=0)
    ledger.charge(user_id, U)  # from the priority-0 grant: 1 left in it
    ledger.void_grant(voided.id, reason="campaign withdrawn")  # its 1 leaves
    first = ledger.refund(charge.id, U)  # last drawn first: paid
    second = ledger.refund(charge.id)  # paid 1, then promo 3
    assert [(a.grant_id, a.amount_units) for a in first.allocations] == [(paid.grant_id, U)]
    assert [(a.grant_id, a.amount_units) for a in second.allocations] == [
        (paid.grant_id, U),
        (promo.id, 3 * U),
    ]
    refund = ledger.refund(ledger.history(user_id, type="charge").items[0].id)
    assert [(a.grant_id, a.amount_units) for a in refund.allocations] == [(voided.id, U)]
    rows = entries(app, user_id)
    assert [(r.type, int(r.amount_units), r.grant_id) for r in rows[-2:]] == [
        ("refund", U, None),
        ("void", -U, voided.id),
    ]
    assert other.allocations
    assert ledger.get_grant(voided.id).remaining_units == 0
    exact(app, user_id, clock)
