"""What has fallen due on an account: read it, or write it.

:func:`project` applies the due events (hold expiries, activations, expiries)
to copies of an account's grants, for a read that must be exact at an
instant without writing. :func:`settle` writes the same events, under the
account row's lock: their entries in time order, each at its due instant with
the balance at that instant, then the grants, the holds and the account.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection

from ..db import entry_rows, grant_rows, hold_rows, store
from .clock import utc
from .grants import DueEvent, DueHold, GrantState, due_events, next_due
from .records import Entry

__all__ = ["Projection", "project", "settle", "settle_all"]


@dataclass
class Projection:
    """An account's grants as of an instant, with the events that got them there."""

    balance_units: int
    grants: dict[str, GrantState]
    #: Each grant's (remaining, held, status) as written, before the events.
    written: dict[str, tuple[int, int, str]]
    rows: dict[str, Any]
    events: list[DueEvent]
    later_hold_expiries: list[datetime]

    @property
    def held_units(self) -> int:
        return sum(grant.held_units for grant in self.grants.values())


def project(conn: Connection, user_id: str, balance_units: int, now: datetime) -> Projection:
    """The user's grants with everything due at ``now`` applied (nothing written).

    ``now`` and every time here are naive UTC, as stored.
    """
    rows = {row.id: row for row in grant_rows.live_grants(conn, user_id)}
    states = {grant_id: GrantState.from_row(row) for grant_id, row in rows.items()}
    holds = hold_rows.pending_holds_of(conn, user_id)
    due = [hold for hold in holds if hold.expires_at <= now]
    pins = grant_rows.hold_pins(conn, [hold.id for hold in due])
    missing = {gid for hold in due for gid, _ in pins.get(hold.id, [])} - states.keys()
    for row in grant_rows.grant_rows(conn, missing):  # pragma: no cover - held grants are live
        rows[row.id] = row
        states[row.id] = GrantState.from_row(row)
    written = {
        grant_id: (grant.remaining_units, grant.held_units, grant.status)
        for grant_id, grant in states.items()
    }
    due_holds = [
        DueHold(hold.id, hold.created_at, hold.expires_at, pins.get(hold.id, [])) for hold in due
    ]
    events = due_events(list(states.values()), due_holds, now)
    balance = balance_units + sum(units for event in events for _, _, units in event.movements)
    later = [hold.expires_at for hold in holds if hold.expires_at > now]
    return Projection(balance, states, written, rows, events, later)


def settle(
    conn: Connection,
    user_id: str,
    account: Any,
    now: datetime,
    new_id: Callable[[str], str],
    after_commit: Callable[..., None],
    *,
    held_total: bool = True,
) -> int:
    """Write every event due at ``now`` on the locked ``account`` row.

    ``after_commit(signal_name, **kwargs)`` is told of the signals to send.
    The account's held total becomes its grants' held parts after the events
    (``held_total`` false: the schema has none yet, in a migration).
    Returns how many events were due (a hold expiry whose pins all go back
    to live grants writes no entry, but is one).
    """
    projection = project(conn, user_id, int(account.balance_units), now)
    balance = int(account.balance_units)
    seq = int(account.last_seq)
    scheduled = int(account.scheduled_units)
    written: list[Entry] = []
    transaction_of: dict[str, str] = {}
    for event in projection.events:
        for type_, grant, units in event.movements:
            balance += units
            seq += 1
            row = projection.rows[grant.id]
            entry = Entry(
                id=new_id("ctx_"),
                user_id=user_id,
                seq=seq,
                type=type_,  # type: ignore[arg-type]
                amount_units=units,
                balance_after_units=balance,
                reference=row.reference if type_ == "grant" else None,
                description=None,
                metadata={},
                hold_id=event.hold.id if event.hold is not None else None,
                refund_of=None,
                refunded_units=0,
                grant_id=grant.id,
                allocations=(),
                actor_id=None,
                created_at=utc(event.at),
            )
            entry_rows.insert_entry(conn, entry.row_values())
            written.append(entry)
            if type_ == "grant":
                transaction_of[grant.id] = entry.id
                scheduled -= grant.amount_units
            if type_ == "expiration" and event.kind == "expiry":
                after_commit("grant_expired", grant_id=grant.id, entry=entry)
        if event.kind == "expiry" and not event.movements:
            assert event.grant is not None
            after_commit("grant_expired", grant_id=event.grant.id, entry=None)
        if event.hold is not None:
            hold_rows.expire_hold(conn, event.hold.id, event.at)
    for grant_id, grant in projection.grants.items():
        changed = projection.written[grant_id] != (
            grant.remaining_units,
            grant.held_units,
            grant.status,
        )
        if changed or grant_id in transaction_of:
            values: dict[str, Any] = {
                "remaining_units": grant.remaining_units,
                "held_units": grant.held_units,
                "status": grant.status,
            }
            if grant_id in transaction_of:
                values["transaction_id"] = transaction_of[grant_id]
            grant_rows.set_grant(conn, grant_id, **values)
    due = next_due(projection.grants.values(), projection.later_hold_expiries)
    store.settle_account(
        conn,
        user_id,
        balance_units=balance,
        last_seq=seq,
        scheduled_units=scheduled,
        next_due_at=due,
        held_units=projection.held_units if held_total else None,
        now=now,
    )
    if written:
        after_commit("balance_moved", before=int(account.balance_units), after=balance)
    return len(projection.events)


def settle_all(
    conn: Connection, now: datetime, batch: int = 500, *, held_total: bool = True
) -> int:
    """Write every event due at ``now`` (naive UTC) on every account, on one
    connection (a migration's); no signals. Returns how many events.

    ``held_total`` false: the accounts have no held total yet (a schema
    before ``0003``)."""
    from .posting import new_id

    total = 0
    done: set[str] = set()
    while True:
        users = [user for user in store.due_accounts(conn, now, batch) if user not in done]
        if not users:
            return total
        for user_id in users:
            done.add(user_id)
            account = store.lock_account(conn, user_id)
            if account is not None and account.next_due_at is not None:
                total += settle(
                    conn,
                    user_id,
                    account,
                    now,
                    new_id,
                    lambda *_, **__: None,
                    held_total=held_total,
                )
