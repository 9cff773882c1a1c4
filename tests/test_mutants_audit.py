"""What the audit side of the money core must keep: the problems reconcile
names, the reads that are exact at an instant, and the events settlement writes.

Reconcile's problems are what ``flask credits reconcile`` prints, so each
test tampers the raw tables the way a bug or a hand edit would and asserts
the exact problems named, for that user and no other. Every test runs on
every engine.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from conftest import CLOCK_START as START
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.core.money import UNITS_PER_USDC, format_units
from callora_credits.db import grant_rows, hold_rows, store

U = UNITS_PER_USDC


def _tamper(app: Any, *statements: Any) -> None:
    with app.app_context(), app.extensions["sqlalchemy"].engine.begin() as conn:
        for statement in statements:
            conn.execute(statement)


def _one(app: Any, statement: Any) -> Any:
    with app.app_context(), app.extensions["sqlalchemy"].engine.connect() as conn:
        return conn.execute(statement).one()


def _problems(app: Any, *users: str) -> list[tuple[str, str]]:
    """What reconcile names for ``users``: of the first one alone, which must
    name nothing of anyone else, and of the whole database (the same)."""
    with app.app_context():
        ledger = current_ledger()
        alone = ledger.reconcile(users[0])
        whole = ledger.reconcile()
    named = [(m.user_id, m.problem) for m in alone.mismatches]
    assert {user for user, _ in named} <= {users[0]}
    # The debits are read in no set order: compare the problems, not their order.
    assert sorted(m.problem for m in whole.mismatches if m.user_id == users[0]) == sorted(
        m.problem for m in alone.mismatches
    )
    return [(m.user_id, m.problem) for m in whole.mismatches if m.user_id in users]


def _real(app: Any, user_id: str) -> list[str]:
    """The independent checker's view of the same rows."""
    with app.app_context():
        return ledger_problems(app.extensions["sqlalchemy"].engine, user_id)


def _grant_of(app: Any, entry_id: str) -> str:
    g = grant_rows.grants
    return str(_one(app, sa.select(g.c.id).where(g.c.transaction_id == entry_id)).id)


def _u(units: int) -> str:
    return format_units(units)


# --- reconcile: the grants must explain the balance ------------------------------------


def test_reconcile_names_a_grant_that_does_not_explain_the_balance(app, clock, user_id):
    other = user_id + "_other"
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, 10 * U)
        ledger.top_up(other, 10 * U)
        # A grant not yet started is no part of the balance: nothing to name.
        scheduled = ledger.grant(user_id, 5 * U, effective_at=START + timedelta(hours=1))
        assert ledger.find_by_user_id(user_id).balance_units == 10 * U
    assert _problems(app, user_id, other) == []
    g = grant_rows.grants
    paid = _grant_of(app, top_up.id)
    _tamper(app, sa.update(g).where(g.c.id == paid).values(remaining_units=9 * U))
    _tamper(app, sa.update(g).where(g.c.user_id == other).values(remaining_units=9 * U))
    assert _problems(app, user_id) == [
        (user_id, "balance 10.0000000 != its grants' remaining + held 9.0000000"),
        (
            user_id,
            f"grant {paid} of 10.0000000: remaining 9.0000000 + held 0.0000000 + taken out "
            "0.0000000 do not add up",
        ),
    ]
    assert _problems(app, other)[0] == (
        other,
        "balance 10.0000000 != its grants' remaining + held 9.0000000",
    )
    # A scheduled grant that holds or lost anything is named too.
    _tamper(
        app,
        sa.update(g).where(g.c.id == paid).values(remaining_units=10 * U),
        sa.update(g).where(g.c.id == scheduled.id).values(remaining_units=4 * U),
    )
    assert _problems(app, user_id) == [
        (
            user_id,
            f"grant {scheduled.id} of 5.0000000: remaining 4.0000000 + held 0.0000000 + "
            "taken out 0.0000000 do not add up",
        )
    ]
    _tamper(app, sa.update(g).where(g.c.id == scheduled.id).values(held_units=U))
    assert _problems(app, user_id) == [
        (user_id, "grants hold 1.0000000 but pending holds reserve 0.0000000"),
        (
            user_id,
            f"grant {scheduled.id} of 5.0000000: remaining 4.0000000 + held 1.0000000 + "
            "taken out 0.0000000 do not add up",
        ),
    ]


def test_reconcile_counts_a_started_grants_held_part_in_the_balance(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.hold(user_id, 4 * U)
    # Remaining 6 + held 4 explain the balance of 10.
    assert _problems(app, user_id) == []
    assert _real(app, user_id) == []


def test_reconcile_names_a_held_total_that_pending_holds_do_not_explain(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 4 * U)
        done = ledger.hold(user_id, U)
        ledger.release(done.id)
    a = store.accounts
    _tamper(app, sa.update(a).where(a.c.user_id == user_id).values(held_units=3 * U))
    assert _problems(app, user_id) == [
        (user_id, "held total 3.0000000 != what pending holds reserve 4.0000000"),
    ]
    _tamper(app, sa.update(a).where(a.c.user_id == user_id).values(held_units=4 * U))
    h = hold_rows.holds
    # A hold that reserves more than the balance: the held totals and the
    # grants disagree with it, and it is more than there is.
    _tamper(app, sa.update(h).where(h.c.id == hold.id).values(amount_units=10 * U + 1))
    assert _problems(app, user_id) == [
        (user_id, "held total 4.0000000 != what pending holds reserve 10.0000001"),
        (user_id, "pending holds reserve 10.0000001, more than the balance 10.0000000"),
        (user_id, "grants hold 4.0000000 but pending holds reserve 10.0000001"),
    ]
    # A reservation of exactly the balance is no problem in itself.
    g = grant_rows.grants
    _tamper(
        app,
        sa.update(h).where(h.c.id == hold.id).values(amount_units=10 * U),
        sa.update(a).where(a.c.user_id == user_id).values(held_units=10 * U),
        sa.update(g).where(g.c.user_id == user_id).values(remaining_units=0, held_units=10 * U),
    )
    assert _problems(app, user_id) == []


def test_reconcile_names_holds_the_grants_do_not_hold(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 4 * U)
    h = hold_rows.holds
    _tamper(app, sa.update(h).where(h.c.id == hold.id).values(status="released"))
    assert _problems(app, user_id) == [
        (user_id, "held total 4.0000000 != what pending holds reserve 0.0000000"),
        (user_id, "grants hold 4.0000000 but pending holds reserve 0.0000000"),
    ]


# --- reconcile: every debit and refund against its allocations -------------------------


def test_reconcile_names_a_debit_its_allocations_do_not_add_up_to(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, 3 * U)
        hold = ledger.hold(user_id, 2 * U)
        capture = ledger.capture(hold.id)
        debit = ledger.adjust(user_id, -U, reason="fix")
        credit = ledger.adjust(user_id, U, reason="fix")
        refund = ledger.refund(charge.id, U)
    assert _problems(app, user_id) == []
    paid = _grant_of(app, top_up.id)
    al = grant_rows.allocations
    entries = {
        "charge": (charge.id, -3 * U),
        "hold_capture": (capture.transaction_id, -2 * U),
        "adjustment": (debit.id, -U),
        "refund": (refund.id, U),
    }
    for type_, (entry_id, amount) in entries.items():
        _tamper(app, sa.update(al).where(al.c.entry_id == entry_id).values(amount_units=1))
        problems = _problems(app, user_id)
        assert problems[0] == (
            user_id,
            f"{type_} {entry_id} of {_u(amount)}: allocations add up to 0.0000001",
        ), type_
        assert len(problems) == 2  # and the grant it came from
        _tamper(
            app,
            sa.update(al).where(al.c.entry_id == entry_id).values(amount_units=abs(amount)),
        )
        assert _problems(app, user_id) == [], type_
    # A credit draws on nothing; a debit without allocations draws nothing.
    assert credit.amount_units == U
    _tamper(app, sa.delete(al).where(al.c.entry_id == charge.id))
    assert _problems(app, user_id) == [
        (user_id, f"charge {charge.id} of -3.0000000: allocations add up to 0.0000000"),
        (
            user_id,
            f"grant {paid} of 10.0000000: remaining 5.0000000 + held 0.0000000 + taken out "
            "2.0000000 do not add up",
        ),
    ]


def test_reconcile_skips_the_debits_written_before_grants_came_in(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, 10 * U)
        before = ledger.charge(user_id, 3 * U)
        clock.advance(1)
        after = ledger.charge(user_id, 2 * U)
        wrong = ledger.charge(user_id, U)
    paid = _grant_of(app, top_up.id)
    g, al, t = grant_rows.grants, grant_rows.allocations, store.entries
    at = _one(app, sa.select(t.c.created_at).where(t.c.id == before.id)).created_at
    # The grant folded in by the migration, at the instant of the first charge:
    # that charge (and anything before) has no allocations, and needs none.
    _tamper(
        app,
        sa.update(g)
        .where(g.c.id == paid)
        .values(origin="migration", created_at=at, amount_units=7 * U),
        sa.delete(al).where(al.c.entry_id == before.id),
    )
    assert _problems(app, user_id) == []
    # After it, a debit with none is named; so is one before it whose
    # allocations are there but wrong.
    _tamper(
        app,
        sa.delete(al).where(al.c.entry_id == after.id),
        sa.update(g).where(g.c.id == paid).values(amount_units=5 * U),
        sa.update(t).where(t.c.id == wrong.id).values(created_at=at),
        sa.update(al).where(al.c.entry_id == wrong.id).values(amount_units=U + 1),
        sa.update(g).where(g.c.id == paid).values(amount_units=5 * U + 1),
    )
    assert sorted(_problems(app, user_id)) == sorted(
        [
            (user_id, f"charge {after.id} of -2.0000000: allocations add up to 0.0000000"),
            (user_id, f"charge {wrong.id} of -1.0000000: allocations add up to 1.0000001"),
        ]
    )


# --- reconcile: each grant's amount against what went in and out of it ----------------


def test_reconcile_follows_expirations_voids_and_refunds_of_grants(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.grant(user_id, 5 * U, expires_at=START + timedelta(hours=1), priority=10)
        voided = ledger.grant(user_id, 4 * U, priority=90)
        charge = ledger.charge(user_id, 2 * U)  # the promotion keeps some to expire
        ledger.refund(charge.id, U)
        ledger.void_grant(voided.id)
        later = ledger.grant(user_id, 3 * U, effective_at=START + timedelta(hours=3))
        ledger.void_grant(later.id)  # before it started: never in the balance
        clock.advance(7200)
        ledger.settle_grants()
        types = [entry.type for entry in ledger.history(user_id, limit=100).items]
    assert {"expiration", "void", "refund"} <= set(types)
    assert _real(app, user_id) == []
    assert _problems(app, user_id) == []
    g = grant_rows.grants
    # The grant voided before it started must still show its whole amount.
    _tamper(app, sa.update(g).where(g.c.id == later.id).values(remaining_units=1))
    assert _problems(app, user_id) == [
        (user_id, "balance 10.0000000 != its grants' remaining + held 10.0000001"),
        (
            user_id,
            f"grant {later.id} of 3.0000000: remaining 0.0000001 + held 0.0000000 + taken out "
            "0.0000000 do not add up",
        ),
    ]


def test_reconcile_reads_an_account_whose_only_grant_has_not_started(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.grant(user_id, 5 * U, effective_at=START + timedelta(days=1))
        assert ledger.find_by_user_id(user_id).balance_units == 0
        report = ledger.reconcile(user_id)
    assert (report.accounts, report.entries, report.mismatches) == (1, 0, [])
    assert _real(app, user_id) == []


# --- reading: what a read shows once something is due equals what settling writes ---------


def _without_updated_at(balance: Any) -> dict[str, Any]:
    shown = dict(vars(balance))
    shown.pop("updated_at")
    return shown


def test_a_read_with_events_due_shows_what_settling_then_writes(app, clock, user_id):
    hours = timedelta(hours=1)
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        first = ledger.grant(user_id, 3 * U, expires_at=START + 2 * hours)
        second = ledger.grant(user_id, 2 * U, expires_at=START + 2 * hours)
        ledger.grant(user_id, 4 * U, expires_at=START + 3 * hours)
        ledger.grant(user_id, 5 * U, effective_at=START + hours / 2)
        held = ledger.grant(user_id, U, expires_at=START + hours * 1.5, priority=0)
        ledger.grant(user_id, 6 * U, effective_at=START + 5 * hours)
        ledger.hold(user_id, 2 * U, expires_in_seconds=86_400)  # on two grants
        clock.advance(3600)
        due = ledger.find_by_user_id(user_id)
        assert ledger.settle_grants() >= 1
        settled = ledger.find_by_user_id(user_id)
        assert _without_updated_at(due) == _without_updated_at(settled)
        # Wholly held, it leaves nothing at its expiry: not the next one.
        assert ledger.get_grant(held.id).held_units == U
        grants = {g.id: g for g in ledger.grants(user_id, status="all", limit=100).items}
    assert due.held_units == 2 * U
    assert due.paid_units + due.promotional_units == due.balance_units
    assert due.paid_units == 10 * U
    expiring = grants[first.id].remaining_units + grants[second.id].remaining_units
    assert due.next_expiry is not None
    assert (due.next_expiry.at, due.next_expiry.amount_units) == (START + 2 * hours, expiring)
    assert _real(app, user_id) == []


def test_every_debit_and_refund_read_back_shows_its_allocations(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, 3 * U)
        capture = ledger.capture(ledger.hold(user_id, 2 * U).id)
        ledger.adjust(user_id, -U, reason="fix")
        ledger.refund(charge.id, U)
        paid = _grant_of(app, top_up.id)
        shown = {
            entry.type: [(a.grant_id, a.amount_units) for a in entry.allocations]
            for entry in ledger.history(user_id, limit=100).items
        }
        assert ledger.get_entry(capture.transaction_id).allocations[0].amount_units == 2 * U
    assert shown["topup"] == []
    assert shown["charge"] == [(paid, 3 * U)]
    assert shown["hold_capture"] == [(paid, 2 * U)]
    assert shown["adjustment"] == [(paid, U)]
    assert shown["refund"] == [(paid, U)]


def test_a_page_of_grants_continues_where_the_last_one_stopped(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        made = [ledger.grant(user_id, U).id for _ in range(5)]
        ledger.void_grant(made[2])
        first = ledger.grants(user_id, limit=2)
        second = ledger.grants(user_id, limit=2, cursor=first.next_cursor)
    newest = [made[4], made[3], made[1], made[0]]
    assert [g.id for g in first.items] == newest[:2]
    assert [g.id for g in second.items] == newest[2:]
    # The last grant shown is the last one there is: no cursor to go on with.
    assert first.next_cursor is not None
    assert second.next_cursor is None


def test_the_grants_of_a_user_without_an_account_are_an_empty_page(app, user_id):
    with app.app_context():
        page = current_ledger().grants(user_id + "_nobody", status="all")
    assert (page.items, page.next_cursor) == ([], None)


def test_a_replayed_grant_is_the_same_grant(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        key = f"{user_id}-grant"
        first = ledger.grant(user_id, 2 * U, idempotency_key=key)
        again = ledger.grant(user_id, 2 * U, idempotency_key=key)
        assert again == first
        assert ledger.find_by_user_id(user_id).balance_units == 2 * U


# --- reconcile: rows that are missing altogether ---------------------------------------


def test_reconcile_names_an_account_whose_grants_are_all_gone(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 3 * U)
        # A hold of one unit: what the grants hold must be compared with it,
        # not with a default of one.
        ledger.hold(user_id, 1)
    g, al = grant_rows.grants, grant_rows.allocations
    _tamper(app, sa.delete(al).where(al.c.user_id == user_id))
    _tamper(app, sa.delete(g).where(g.c.user_id == user_id))
    problems = _problems(app, user_id)
    assert (user_id, "balance 3.0000000 != its grants' remaining + held 0.0000000") in problems
    assert (user_id, "grants hold 0.0000000 but pending holds reserve 0.0000001") in problems


def test_reconcile_names_a_debit_of_one_unit_without_allocations(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, U)
        charge = ledger.charge(user_id, 1)
    al = grant_rows.allocations
    _tamper(app, sa.delete(al).where(al.c.entry_id == charge.id))
    assert (
        user_id,
        f"charge {charge.id} of -0.0000001: allocations add up to 0.0000000",
    ) in _problems(app, user_id)


def test_reconcile_of_every_account_skips_each_ones_debits_from_before_grants(app, clock, user_id):
    # Two accounts whose grants a migration folded in, at different instants.
    users = [user_id, user_id + "_b"]
    g, al, t = grant_rows.grants, grant_rows.allocations, store.entries
    for step, user in enumerate(users):
        clock.advance(10 * step)
        with app.app_context():
            ledger = current_ledger()
            top_up = ledger.top_up(user, 10 * U)
            before = ledger.charge(user, 3 * U)
        at = _one(app, sa.select(t.c.created_at).where(t.c.id == before.id)).created_at
        _tamper(
            app,
            sa.update(g)
            .where(g.c.id == _grant_of(app, top_up.id))
            .values(origin="migration", created_at=at, amount_units=7 * U),
            sa.delete(al).where(al.c.entry_id == before.id),
        )
    assert _problems(app, *users) == []
    assert _problems(app, users[1], users[0]) == []


def _grant_problem(grant: Any, remaining: int, held: int, taken: int) -> str:
    return (
        f"grant {grant.id} of {_u(grant.amount_units)}: remaining {_u(remaining)} + held "
        f"{_u(held)} + taken out {_u(taken)} do not add up"
    )


def test_reconcile_names_a_grant_not_started_that_holds_or_gave_anything(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, U)
        # Grants of one unit: a wrong total of one must not pass for them.
        later = START + timedelta(hours=1)
        scheduled = ledger.grant(user_id, 1, effective_at=later)
        voided = ledger.grant(user_id, 1, effective_at=later)
        ledger.void_grant(voided.id)
    assert _problems(app, user_id) == []
    g, al = grant_rows.grants, grant_rows.allocations
    # The voided one holds a unit it cannot hold: its amount adds up, yet it is
    # named. (A grant not started cannot: its parts would pass its amount.)
    _tamper(app, sa.update(g).where(g.c.id == voided.id).values(held_units=1))
    assert (user_id, _grant_problem(voided, 0, 1, 0)) in _problems(app, user_id)
    # Each gave a unit to a charge instead.
    _tamper(
        app,
        sa.update(g).where(g.c.id == voided.id).values(held_units=0),
        sa.insert(al).values(
            user_id=user_id, entry_id=charge.id, position=98, grant_id=scheduled.id, amount_units=1
        ),
        sa.insert(al).values(
            user_id=user_id, entry_id=charge.id, position=99, grant_id=voided.id, amount_units=1
        ),
    )
    problems = _problems(app, user_id)
    assert (user_id, _grant_problem(scheduled, 1, 0, 1)) in problems
    assert (user_id, _grant_problem(voided, 0, 0, 1)) in problems
