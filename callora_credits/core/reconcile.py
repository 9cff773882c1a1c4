"""Reconciliation: every balance checked against the ledger that explains it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection, Engine

from ..db.grant_rows import allocations, grants
from ..db.store import accounts, entries, holds
from .money import format_units

__all__ = ["Mismatch", "ReconcileReport", "reconcile"]


@dataclass
class Mismatch:
    """One inconsistency found by :func:`reconcile`."""

    user_id: str
    problem: str


@dataclass
class ReconcileReport:
    """What :func:`reconcile` checked and found."""

    accounts: int = 0
    entries: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def reconcile(engine: Engine, user_id: str | None = None) -> ReconcileReport:
    """Check every account (or only ``user_id``'s) against its ledger.

    Each balance must equal the sum of its entries, each ``seq`` chain must
    run 1, 2, 3… to the account's ``last_seq``, and each entry's
    ``balance_after`` must be the previous one plus its amount, never below
    zero. The grants must explain the balance too: it equals the remaining
    and held parts of its grants that have started; the held parts, and the
    account's held total, are what pending holds reserve, never more than
    the balance; every debit and refund written since grants came
    in has allocations adding up to its amount; and each grant's amount is
    its remaining + held + what debits drew from it and its expiration and
    void entries took out, less what refunds gave back. Reads one snapshot
    (REPEATABLE READ on PostgreSQL), so it can run beside live traffic.
    """
    report = ReconcileReport()
    a, t = accounts, entries
    totals = (
        select(
            a.c.user_id,
            a.c.balance_units,
            a.c.last_seq,
            a.c.held_units,
            func.coalesce(func.sum(t.c.amount_units), 0).label("total"),
            func.count(t.c.id).label("entries"),
        )
        .select_from(a.outerjoin(t, t.c.user_id == a.c.user_id))
        .group_by(a.c.user_id, a.c.balance_units, a.c.last_seq, a.c.held_units)
    )
    chain = select(t.c.user_id, t.c.seq, t.c.amount_units, t.c.balance_after_units).order_by(
        t.c.user_id, t.c.seq
    )
    if user_id is not None:
        totals = totals.where(a.c.user_id == user_id)
        chain = chain.where(t.c.user_id == user_id)
    with engine.connect() as plain:
        conn = plain
        if plain.dialect.name == "postgresql":
            conn = plain.execution_options(isolation_level="REPEATABLE READ")
        conn.begin()
        known: dict[str, int] = {}
        held: dict[str, int] = {}
        for row in conn.execute(totals):
            report.accounts += 1
            known[row.user_id] = int(row.balance_units)
            held[row.user_id] = int(row.held_units)
            if int(row.total) != int(row.balance_units):
                report.mismatches.append(
                    Mismatch(
                        row.user_id,
                        f"balance {format_units(int(row.balance_units))} != ledger sum "
                        f"{format_units(int(row.total))}",
                    )
                )
            if int(row.entries) != int(row.last_seq):
                report.mismatches.append(
                    Mismatch(
                        row.user_id,
                        f"{row.entries} {'entry' if row.entries == 1 else 'entries'} "
                        f"but last_seq is {row.last_seq}",
                    )
                )
        user, expected_seq, running = "", 0, 0
        for row in conn.execution_options(yield_per=2000).execute(chain):
            report.entries += 1
            if row.user_id != user:
                user, expected_seq, running = row.user_id, 0, 0
                if user not in known:
                    report.mismatches.append(Mismatch(user, "entries without an account"))
            expected_seq += 1
            running += int(row.amount_units)
            if int(row.seq) != expected_seq:
                report.mismatches.append(
                    Mismatch(user, f"seq {row.seq} where {expected_seq} was expected")
                )
                expected_seq = int(row.seq)
            if int(row.balance_after_units) != running or running < 0:
                report.mismatches.append(
                    Mismatch(
                        user,
                        f"seq {row.seq}: balance_after "
                        f"{format_units(int(row.balance_after_units))} != "
                        f"{format_units(running)}",
                    )
                )
                running = int(row.balance_after_units)
        report.mismatches += _grant_problems(conn, user_id, known, held)
    return report


def _grant_problems(
    conn: Connection, user_id: str | None, balances: dict[str, int], account_held: dict[str, int]
) -> list[Mismatch]:
    g, al, t, h = grants, allocations, entries, holds

    def only(stmt: Any, column: Any) -> Any:
        return stmt if user_id is None else stmt.where(column == user_id)

    found: list[Mismatch] = []
    started = case((g.c.status != "scheduled", g.c.remaining_units + g.c.held_units), else_=0)
    in_grants: dict[str, int] = defaultdict(int)
    held: dict[str, int] = defaultdict(int)
    for row in conn.execute(
        only(
            select(g.c.user_id, func.sum(started), func.sum(g.c.held_units)).group_by(g.c.user_id),
            g.c.user_id,
        )
    ):
        in_grants[row[0]], held[row[0]] = int(row[1]), int(row[2])
    for user, balance in balances.items():
        if in_grants.get(user, 0) != balance:
            found.append(
                Mismatch(
                    user,
                    f"balance {format_units(balance)} != its grants' remaining + held "
                    f"{format_units(in_grants.get(user, 0))}",
                )
            )
    reserved = only(
        select(h.c.user_id, func.sum(h.c.amount_units))
        .where(h.c.status == "pending")
        .group_by(h.c.user_id),
        h.c.user_id,
    )
    pending = {row[0]: int(row[1]) for row in conn.execute(reserved)}
    for user, total in account_held.items():
        if total != pending.get(user, 0):
            found.append(
                Mismatch(
                    user,
                    f"held total {format_units(total)} != what pending holds reserve "
                    f"{format_units(pending.get(user, 0))}",
                )
            )
        if pending.get(user, 0) > balances[user]:
            found.append(
                Mismatch(
                    user,
                    f"pending holds reserve {format_units(pending[user])}, more than the "
                    f"balance {format_units(balances[user])}",
                )
            )
    for user in set(pending) | set(held):
        if pending.get(user, 0) != held.get(user, 0):
            found.append(
                Mismatch(
                    user,
                    f"grants hold {format_units(held.get(user, 0))} but pending holds reserve "
                    f"{format_units(pending.get(user, 0))}",
                )
            )
    # Debits and refunds against their allocations.
    folded = only(
        select(g.c.user_id, func.min(g.c.created_at))
        .where(g.c.origin == "migration")
        .group_by(g.c.user_id),
        g.c.user_id,
    )
    migrated_at = {row[0]: row[1] for row in conn.execute(folded)}
    drawn = (
        select(al.c.entry_id, func.sum(al.c.amount_units).label("drawn"))
        .where(al.c.entry_id.is_not(None))
        .group_by(al.c.entry_id)
        .subquery()
    )
    drawing = t.c.type.in_(("charge", "hold_capture", "refund")) | (
        (t.c.type == "adjustment") & (t.c.amount_units < 0)
    )
    checked = only(
        select(t.c.user_id, t.c.id, t.c.type, t.c.amount_units, t.c.created_at, drawn.c.drawn)
        .select_from(t.outerjoin(drawn, drawn.c.entry_id == t.c.id))
        .where(drawing),
        t.c.user_id,
    )
    for row in conn.execute(checked):
        if (
            row.drawn is None
            and row.user_id in migrated_at
            and row.created_at <= migrated_at[row.user_id]
        ):
            continue  # written before grants came in
        if int(row.drawn or 0) != abs(int(row.amount_units)):
            found.append(
                Mismatch(
                    row.user_id,
                    f"{row.type} {row.id} of {format_units(int(row.amount_units))}: "
                    f"allocations add up to {format_units(int(row.drawn or 0))}",
                )
            )
    # Each grant's amount against what went in and out of it.
    moved: dict[str, int] = defaultdict(int)
    signed = case((t.c.type == "refund", -al.c.amount_units), else_=al.c.amount_units)
    out = (
        select(al.c.grant_id, func.sum(signed))
        .select_from(al.join(t, t.c.id == al.c.entry_id))
        .group_by(al.c.grant_id)
    )
    left = (
        select(t.c.grant_id, func.sum(-t.c.amount_units))
        .where(t.c.type.in_(("expiration", "void")))
        .group_by(t.c.grant_id)
    )
    for stmt, column in ((out, al.c.user_id), (left, t.c.user_id)):
        for row in conn.execute(only(stmt, column)):
            moved[row[0]] += int(row[1])
    parts = only(
        select(
            g.c.user_id,
            g.c.id,
            g.c.status,
            g.c.origin,
            g.c.transaction_id,
            g.c.amount_units,
            g.c.remaining_units,
            g.c.held_units,
        ),
        g.c.user_id,
    )
    for row in conn.execute(parts):
        amount, remaining, held_part = (
            int(row.amount_units),
            int(row.remaining_units),
            int(row.held_units),
        )
        accounted = remaining + held_part + moved.get(row.id, 0)
        if row.status == "scheduled":
            accounted = remaining if not (held_part or moved.get(row.id)) else -1
        elif row.status == "voided" and row.transaction_id is None and row.origin == "grant":
            # Voided before it started: it never entered the balance.
            accounted = amount if not (remaining or held_part or moved.get(row.id)) else -1
        if accounted != amount:
            found.append(
                Mismatch(
                    row.user_id,
                    f"grant {row.id} of {format_units(amount)}: remaining "
                    f"{format_units(remaining)} + held {format_units(held_part)} + taken out "
                    f"{format_units(moved.get(row.id, 0))} do not add up",
                )
            )
    return found
