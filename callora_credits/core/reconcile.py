"""Reconciliation: every balance checked against the ledger that explains it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from ..db.store import accounts, entries
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
    zero. Reads one snapshot (REPEATABLE READ on PostgreSQL), so it can run
    beside live traffic.
    """
    report = ReconcileReport()
    a, t = accounts, entries
    totals = (
        select(
            a.c.user_id,
            a.c.balance_units,
            a.c.last_seq,
            func.coalesce(func.sum(t.c.amount_units), 0).label("total"),
            func.count(t.c.id).label("entries"),
        )
        .select_from(a.outerjoin(t, t.c.user_id == a.c.user_id))
        .group_by(a.c.user_id, a.c.balance_units, a.c.last_seq)
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
        known: set[str] = set()
        for row in conn.execute(totals):
            report.accounts += 1
            known.add(row.user_id)
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
    return report
