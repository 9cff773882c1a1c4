"""Grants in memory: the consumption order, and what falls due when.

A balance is the sum of its grants. This module holds the rules that need no
database: which grants a debit draws from and in what order
(:func:`consumption_order`, :func:`draw`), how a grant reads at an instant
(:meth:`GrantState.status_at`), and the due events — hold expiries,
activations, expiries — in the order they happen (:func:`due_events`). The
same function serves a read (which applies the events to copies and writes
nothing) and a settlement (which writes them, :mod:`.settlement`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

__all__ = [
    "DueEvent",
    "DueHold",
    "GrantState",
    "consumption_order",
    "draw",
    "due_events",
    "next_due",
]

GrantCategory = Literal["paid", "promotional"]
#: As written in the grants table.
StoredStatus = Literal["scheduled", "active", "expired", "voided"]
#: As read at an instant.
GrantStatus = Literal["scheduled", "active", "depleted", "expired", "voided"]


@dataclass
class GrantState:
    """A grant's row, as a working copy that events change."""

    id: str
    user_id: str
    number: int
    category: str
    amount_units: int
    remaining_units: int
    held_units: int
    priority: int
    effective_at: datetime
    expires_at: datetime | None
    status: str

    @classmethod
    def from_row(cls, row: Any) -> GrantState:
        """From a ``credits_grants`` row (naive UTC times, as stored)."""
        return cls(
            id=row.id,
            user_id=row.user_id,
            number=int(row.number),
            category=row.category,
            amount_units=int(row.amount_units),
            remaining_units=int(row.remaining_units),
            held_units=int(row.held_units),
            priority=int(row.priority),
            effective_at=row.effective_at,
            expires_at=row.expires_at,
            status=row.status,
        )

    @property
    def dead(self) -> bool:
        """Expired or voided: what comes back to it leaves the balance at once."""
        return self.status in ("expired", "voided")

    def spendable_at(self, now: datetime) -> bool:
        """Active at ``now`` with something unheld left."""
        return (
            self.status == "active"
            and self.remaining_units > 0
            and (self.expires_at is None or self.expires_at > now)
        )

    def status_at(self) -> GrantStatus:
        """The status a read shows, once the events due have been applied."""
        if self.status == "voided":
            return "voided"
        if self.status == "scheduled":
            return "scheduled"
        if self.status == "expired":
            return "expired"
        if self.remaining_units == 0 and self.held_units == 0:
            return "depleted"
        return "active"

    def leave_type(self) -> str:
        """The entry type of an amount leaving this dead grant."""
        return "void" if self.status == "voided" else "expiration"


def _order_key(grant: GrantState) -> tuple[Any, ...]:
    return (
        grant.priority,
        grant.expires_at is None,
        grant.expires_at or datetime.min,
        grant.category != "promotional",
        grant.effective_at,
        grant.number,
    )


def consumption_order(grants: Iterable[GrantState], now: datetime) -> list[GrantState]:
    """The grants a debit may draw from at ``now``, in the order it draws:
    ``priority`` ascending, then the soonest ``expires_at`` (none last), then
    promotional before paid, then ``effective_at``, then creation order."""
    return sorted((g for g in grants if g.spendable_at(now)), key=_order_key)


def draw(
    grants: Iterable[GrantState], units: int, now: datetime
) -> list[tuple[GrantState, int]] | None:
    """What a debit of ``units`` takes from each grant, in order; ``None``
    when the grants' unheld remaining does not cover it. Changes nothing."""
    taken: list[tuple[GrantState, int]] = []
    if units <= 0:  # nothing to draw (a negative amount never reaches here validated)
        return taken
    left = units
    for grant in consumption_order(grants, now):
        if left == 0:
            break
        part = min(grant.remaining_units, left)
        taken.append((grant, part))
        left -= part
    return taken if left == 0 else None


@dataclass
class DueHold:
    """A pending hold and what it pinned, in pin order."""

    id: str
    created_at: datetime
    expires_at: datetime
    pins: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class DueEvent:
    """One event that fell due: its instant, what happened, and the ledger
    movements it makes (``(entry type, grant, signed units)``, in order)."""

    at: datetime
    kind: Literal["hold_expiry", "activation", "expiry"]
    grant: GrantState | None = None
    hold: DueHold | None = None
    movements: list[tuple[str, GrantState, int]] = field(default_factory=list)


def return_pinned(grant: GrantState, units: int) -> tuple[str, GrantState, int] | None:
    """Give ``units`` a hold pinned back to ``grant``: to its remaining, or,
    when the grant is dead, out of the balance (the movement to write)."""
    grant.held_units -= units
    if grant.dead:
        return (grant.leave_type(), grant, -units)
    grant.remaining_units += units
    return None


def due_events(
    grants: Sequence[GrantState], holds: Sequence[DueHold], now: datetime
) -> list[DueEvent]:
    """Apply, in time order, every event due at or before ``now`` to
    ``grants`` (changed in place) and return them.

    At one instant: hold expiries, then activations, then expiries; ties in
    creation order. ``grants`` must include every grant a due hold pinned.
    """
    by_id = {grant.id: grant for grant in grants}
    pending: list[tuple[tuple[Any, ...], DueEvent]] = []
    for hold in holds:
        if hold.expires_at <= now:
            pending.append(
                (
                    (hold.expires_at, 0, hold.created_at, hold.id),
                    DueEvent(hold.expires_at, "hold_expiry", hold=hold),
                )
            )
    for grant in grants:
        if grant.status == "scheduled" and grant.effective_at <= now:
            pending.append(
                (
                    (grant.effective_at, 1, grant.number, ""),
                    DueEvent(grant.effective_at, "activation", grant=grant),
                )
            )
        if (
            grant.status in ("scheduled", "active")
            and grant.expires_at is not None
            and grant.expires_at <= now
        ):
            pending.append(
                (
                    (grant.expires_at, 2, grant.number, ""),
                    DueEvent(grant.expires_at, "expiry", grant=grant),
                )
            )
    pending.sort(key=lambda item: item[0])
    events = []
    for _, event in pending:
        if event.hold is not None:
            for grant_id, units in event.hold.pins:
                movement = return_pinned(by_id[grant_id], units)
                if movement is not None:
                    event.movements.append(movement)
        elif event.kind == "activation":
            assert event.grant is not None
            event.grant.status = "active"
            event.movements.append(("grant", event.grant, event.grant.amount_units))
        else:
            expiring = event.grant
            assert expiring is not None
            if expiring.status != "active":  # voided before it expired
                continue
            expiring.status = "expired"
            units, expiring.remaining_units = expiring.remaining_units, 0
            if units:
                event.movements.append(("expiration", expiring, -units))
        events.append(event)
    return events


def next_due(grants: Iterable[GrantState], hold_expiries: Iterable[datetime]) -> datetime | None:
    """The soonest instant something can fall due: a pending hold's expiry, a
    scheduled grant's start, an active grant's expiry (``None``: never)."""
    times = list(hold_expiries)
    for grant in grants:
        if grant.status == "scheduled":
            times.append(grant.effective_at)
        elif grant.status == "active" and grant.expires_at is not None:
            times.append(grant.expires_at)
    return min(times, default=None)
