"""Reads that are exact at an instant without writing.

A balance or grant read while nothing is due on the account comes from the
rows as written (the balance in one statement, its held part the account
row's held total). Once something has fallen due and is not yet written (a
hold's expiry among them, which the held total still counts), the read
applies the due events to copies (:func:`~.settlement.project`) and shows
the result, held included; nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from ..db import grant_rows, store
from .clock import utc
from .grants import GrantState
from .posting import grant_record
from .records import Allocation, Balance, Entry, Grant, NextExpiry
from .settlement import project

__all__ = ["GRANT_FILTERS", "read_balance", "read_entries", "read_grant", "read_grants"]

#: What ``GET /credits/grants?status=`` may ask for, and the statuses each means.
GRANT_FILTERS: dict[str, frozenset[str]] = {
    "default": frozenset({"active", "scheduled"}),
    "all": frozenset({"scheduled", "active", "depleted", "expired", "voided"}),
    **{
        status: frozenset({status})
        for status in ("scheduled", "active", "depleted", "expired", "voided")
    },
}


def _due(account: Any, now: datetime) -> bool:
    return account.next_due_at is not None and account.next_due_at <= now


def read_balance(conn: Connection, user_id: str, now: datetime) -> Balance | None:
    """The user's balance at ``now`` (naive UTC), or ``None``."""
    row = store.balance_row(conn, user_id)
    if row is None:
        return None
    if not _due(row, now):
        expiry = None
        if row.next_expiry_at is not None:
            expiry = NextExpiry(utc(row.next_expiry_at), int(row.next_expiry_units))
        return Balance(
            user_id=row.user_id,
            balance_units=int(row.balance_units),
            held_units=int(row.held_units),
            paid_units=int(row.paid_units),
            promotional_units=int(row.promotional_units),
            next_expiry=expiry,
            created_at=utc(row.created_at),
            updated_at=utc(row.updated_at),
        )
    projection = project(conn, user_id, int(row.balance_units), now)
    return balance_of(row, projection.balance_units, projection.grants.values())


def balance_of(row: Any, balance_units: int, grants: Iterable[GrantState]) -> Balance:
    """A balance from its grants' figures (after the due events)."""
    held = paid = promotional = 0
    soonest: datetime | None = None
    expiring = 0
    for grant in grants:
        held += grant.held_units
        if grant.status != "scheduled":
            part = grant.remaining_units + grant.held_units
            if grant.category == "paid":
                paid += part
            else:
                promotional += part
        if grant.status == "active" and grant.remaining_units > 0 and grant.expires_at:
            if soonest is None or grant.expires_at < soonest:
                soonest, expiring = grant.expires_at, grant.remaining_units
            elif grant.expires_at == soonest:
                expiring += grant.remaining_units
    return Balance(
        user_id=row.user_id,
        balance_units=balance_units,
        held_units=held,
        paid_units=paid,
        promotional_units=promotional,
        next_expiry=None if soonest is None else NextExpiry(utc(soonest), expiring),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


def read_entries(conn: Connection, rows: Sequence[Any]) -> list[Entry]:
    """Entries from their rows, with their allocations (one more statement
    when any of them has some)."""
    drawing = [
        row.id for row in rows if row.type in ("charge", "hold_capture", "adjustment", "refund")
    ]
    found = grant_rows.entry_allocations(conn, drawing)
    return [
        Entry.from_row(
            row,
            allocations=tuple(Allocation(gid, units) for gid, units in found.get(row.id, [])),
        )
        for row in rows
    ]


def _states(conn: Connection, user_id: str, now: datetime) -> dict[str, GrantState] | None:
    """The user's live grants at ``now`` when something is due (else ``None``:
    the rows as written are exact)."""
    account = store.account_row(conn, user_id)
    if account is None or not _due(account, now):
        return None
    return project(conn, user_id, int(account.balance_units), now).grants


def read_grant(conn: Connection, grant_id: str, now: datetime) -> Grant | None:
    """One grant as of ``now``, or ``None``."""
    row = grant_rows.grant_row(conn, grant_id)
    if row is None:
        return None
    states = _states(conn, row.user_id, now)
    state = states.get(row.id) if states is not None else None
    return grant_record(row, state or GrantState.from_row(row))


def read_grants(
    conn: Connection,
    user_id: str,
    now: datetime,
    statuses: frozenset[str],
    limit: int,
    before: int | None,
) -> tuple[list[Grant], int | None]:
    """A page of the user's grants with one of ``statuses`` at ``now``, newest
    first; and the ``number`` to continue before (``None``: no more)."""
    states = _states(conn, user_id, now) or {}
    page: list[tuple[Grant, int]] = []
    cursor = before
    while True:
        rows = grant_rows.grant_page(conn, user_id, _BATCH, cursor)
        for row in rows:
            grant = grant_record(row, states.get(row.id) or GrantState.from_row(row))
            if grant.status in statuses:
                if len(page) == limit:
                    return [found for found, _ in page], page[-1][1]
                page.append((grant, int(row.number)))
        if len(rows) < _BATCH:
            return [found for found, _ in page], None
        cursor = int(rows[-1].number)


#: Grants read per statement while filtering a page by status.
_BATCH = 200
