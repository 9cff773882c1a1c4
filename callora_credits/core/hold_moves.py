"""Holds: placing one pins grants; capturing spends what it pinned; a release
gives it back (and what goes back to a dead grant leaves at once)."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from sqlalchemy.exc import IntegrityError

from ..db import grant_rows, hold_rows, store
from ..db.constraints import violates
from ..errors import (
    HoldAmountExceeded,
    HoldNotPending,
    InsufficientCredits,
    NotFound,
)
from . import signals
from .clock import naive, utc
from .grants import GrantState
from .money import format_units
from .moves import Draws, Moves, new_id
from .operations import (
    Capture,
    CreateHold,
    Release,
)
from .records import Entry, Hold, HoldStatus

__all__ = ["HoldMoves"]


class HoldMoves(Moves):
    """Placing, capturing and releasing holds."""

    def _create_hold(self, op: CreateHold) -> Hold:
        expires_at = utc(self.now + timedelta(seconds=op.ttl_seconds))
        # One conditional update reserves the amount on the account row (and
        # brings its next due time forward to the hold's expiry): what is
        # available is checked where it is changed.
        expiry = naive(expires_at)
        reserved = store.hold(self.conn, op.user_id, op.amount_units, self.now, expiry)
        if not reserved and self._settle_if_due(op.user_id):
            reserved = store.hold(self.conn, op.user_id, op.amount_units, self.now, expiry)
        if not reserved:
            raise InsufficientCredits()
        pins = self._draw(op.user_id, op.amount_units, pin=True)
        hold = Hold(
            id=new_id("hold_"),
            user_id=op.user_id,
            status="pending",
            amount_units=op.amount_units,
            captured_units=0,
            expires_at=expires_at,
            created_at=utc(self.now),
            resolved_at=None,
            transaction_id=None,
            reference=op.reference,
            metadata=op.metadata,
        )
        try:
            hold_rows.insert_hold(self.conn, {**hold.row_values(), "actor_id": op.actor_id})
        except IntegrityError as exc:
            if op.reference is not None and violates(exc, hold_rows.HOLD_REFERENCE):
                raise self._duplicate("hold", op.reference) from None
            raise
        grant_rows.insert_allocations(
            self.conn, op.user_id, [(grant.id, units) for grant, units in pins], hold_id=hold.id
        )
        self._after_commit(signals.hold_created, hold=hold)
        return hold

    def _resolve_hold(self, op: Capture | Release) -> Hold:
        found = hold_rows.hold_row(self.conn, op.hold_id)
        if found is None:
            raise NotFound("No such hold")
        self.user_id = user_id = found.user_id
        # Lock order: the account first, as every balance change does; what
        # fell due (this hold's expiry too) is written first.
        self._lock(user_id)
        row = hold_rows.hold_row(self.conn, op.hold_id, lock=True)
        assert row is not None
        if row.status == "expired" or row.expires_at <= self.now:
            raise HoldNotPending("The hold has expired")
        if row.status != "pending":
            raise HoldNotPending(f"The hold is already {row.status}")
        amount = int(row.amount_units)
        units = 0 if isinstance(op, Release) or op.amount_units is None else op.amount_units
        if isinstance(op, Capture) and op.amount_units is None:
            units = amount
        if units > amount:
            raise HoldAmountExceeded(
                f"The hold reserves {format_units(amount)} USDC; capture at most that"
            )
        status: HoldStatus = "captured" if units > 0 else "released"
        if not hold_rows.resolve_hold(self.conn, op.hold_id, status, units, self.now):
            raise HoldNotPending()  # pragma: no cover - the row is locked
        pins = grant_rows.hold_pins(self.conn, [op.hold_id]).get(op.hold_id, [])
        states = {
            grant_row.id: GrantState.from_row(grant_row)
            for grant_row in grant_rows.grant_rows(self.conn, [gid for gid, _ in pins])
        }
        spent: Draws = []
        rest: Draws = []
        left = units
        for grant_id, part in pins:
            take = min(part, left)
            left -= take
            if take:
                spent.append((states[grant_id], take))
            if part - take:
                rest.append((states[grant_id], part - take))
        entry: Entry | None = None
        hold = Hold.from_row(row)
        if units > 0:
            # The capture spends from the hold's own reservation, released
            # whole in the same statement.
            moved = self._take(user_id, units, release=amount)
            for grant, part in spent:
                grant_rows.move_grant(self.conn, grant.id, held=-part)
            entry = self._entry(
                op,
                user_id,
                "hold_capture",
                -units,
                moved,
                None,
                hold_id=op.hold_id,
                metadata=hold.metadata,
                draws=spent,
            )
            self._balance_signals(user_id, moved[0] + units, moved[0])
            hold_rows.set_hold_transaction(self.conn, op.hold_id, entry.id)
        else:
            store.release(self.conn, user_id, amount)
        for grant, part in rest:
            if grant.dead:
                grant_rows.move_grant(self.conn, grant.id, held=-part)
                self._leave(op, grant, part, hold_id=op.hold_id)
            else:
                grant_rows.move_grant(self.conn, grant.id, remaining=part, held=-part)
        hold = replace(
            hold,
            status=status,
            captured_units=units,
            resolved_at=utc(self.now),
            transaction_id=None if entry is None else entry.id,
        )
        if entry is not None:
            self._after_commit(signals.hold_captured, hold=hold, entry=entry)
        else:
            self._after_commit(signals.hold_released, hold=hold)
        return hold
