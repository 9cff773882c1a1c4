"""Grants given and voided, and refunds, which give back to the grants a
debit drew from."""

from __future__ import annotations

from ..db import entry_rows, grant_rows, store
from ..errors import (
    BalanceLimitExceeded,
    GrantNotActive,
    NotFound,
    RefundExceedsCharge,
    ValidationError,
)
from . import signals
from .clock import naive
from .grants import GrantState
from .money import format_units
from .moves import REFUNDABLE_TYPES, Draws, Moves, grant_record, new_id
from .operations import (
    CreateGrant,
    Refund,
    VoidGrant,
)
from .records import Entry, Grant

__all__ = ["GrantMoves"]


class GrantMoves(Moves):
    """Giving and voiding grants, and refunds."""

    def _grant(self, op: CreateGrant) -> Grant:
        effective = self.now if op.effective_at is None else max(naive(op.effective_at), self.now)
        expiry = None if op.expires_at is None else naive(op.expires_at)
        if expiry is not None and expiry <= self.now:
            raise ValidationError.on("expires_at", "expires_at must be in the future", "range")
        if effective <= self.now:
            entry = self._credit_grant(
                op,
                op.user_id,
                op.amount_units,
                "grant",
                category=op.category,
                priority=op.priority,
                expires_at=op.expires_at,
                description=op.description,
                grant_description=op.description,
            )
            assert entry.grant_id is not None
            found = grant_rows.grant_row(self.conn, entry.grant_id)
            return grant_record(found, GrantState.from_row(found))
        # Scheduled: it enters the balance at effective_at, counted by the limit now.
        store.insert_account_if_missing(self.conn, op.user_id, self.now)
        self._lock(op.user_id)
        limit = self.settings.max_balance_units
        number = store.schedule(self.conn, op.user_id, op.amount_units, limit, effective)
        if number is None:
            raise BalanceLimitExceeded(f"The balance may not exceed {format_units(limit)} USDC")
        grant = self._insert_grant(
            op,
            new_id("grant_"),
            op.user_id,
            number,
            op.amount_units,
            origin="grant",
            category=op.category,
            priority=op.priority,
            effective_at=effective,
            expires_at=expiry,
            status="scheduled",
            transaction_id=None,
            reference=op.reference,
            description=op.description,
        )
        self._after_commit(signals.grant_created, grant=grant)
        return grant

    # --- debits ------------------------------------------------------------------

    def _refund(self, op: Refund) -> Entry:
        found = entry_rows.entry_row(self.conn, op.transaction_id)
        if found is None:
            raise NotFound("No such transaction")
        self.user_id = user_id = found.user_id
        if found.type not in REFUNDABLE_TYPES:
            raise ValidationError(
                "Only charge and hold_capture entries can be refunded",
                details=[
                    {
                        "field": "transaction_id",
                        "message": f"This is a {found.type} entry",
                        "code": "not_refundable",
                    }
                ],
            )
        # Lock order: the account first, as every balance change does.
        self._lock(user_id)
        locked = entry_rows.entry_row(self.conn, op.transaction_id, lock=True)
        assert locked is not None
        drawn = -int(locked.amount_units)
        refunded = int(locked.refunded_units)
        remaining = drawn - refunded
        units = remaining if op.amount_units is None else op.amount_units
        if units <= 0 or units > remaining:
            raise RefundExceedsCharge(
                f"At most {format_units(remaining)} USDC of this charge can be refunded"
            )
        allocations = grant_rows.entry_allocations(self.conn, [op.transaction_id]).get(
            op.transaction_id, []
        )
        if not allocations:
            # A debit from before grants: the refund becomes a paid grant.
            return self._refund_as_grant(op, user_id, units)
        # Back to the grants drawn from, last drawn first; earlier refunds
        # went back the same way.
        states = {
            row.id: GrantState.from_row(row)
            for row in grant_rows.grant_rows(self.conn, [gid for gid, _ in allocations])
        }
        skip, left = refunded, units
        back: Draws = []
        for grant_id, part in reversed(allocations):
            gone = min(skip, part)
            skip -= gone
            take = min(part - gone, left)
            if take > 0:
                back.append((states[grant_id], take))
                left -= take
        moved = self._add(user_id, units, grants=0, due=None)
        entry = self._entry(
            op,
            user_id,
            "refund",
            units,
            moved,
            op.reason,
            refund_of=op.transaction_id,
            draws=back,
            metadata={},
        )
        if not entry_rows.add_refunded(self.conn, op.transaction_id, units):  # pragma: no cover
            raise RefundExceedsCharge()
        for grant, part in back:
            if grant.dead:
                self._leave(op, grant, part)
            else:
                grant_rows.move_grant(self.conn, grant.id, remaining=part)
        self._after_commit(signals.credits_refunded, entry=entry)
        return entry

    def _refund_as_grant(self, op: Refund, user_id: str, units: int) -> Entry:
        moved = self._add(user_id, units, grants=1, due=None)
        grant_id = new_id("grant_")
        placeholder = GrantState(
            id=grant_id,
            user_id=user_id,
            number=moved[2],
            category="paid",
            amount_units=units,
            remaining_units=units,
            held_units=0,
            priority=50,
            effective_at=self.now,
            expires_at=None,
            status="active",
        )
        entry = self._entry(
            op,
            user_id,
            "refund",
            units,
            moved,
            op.reason,
            refund_of=op.transaction_id,
            draws=[(placeholder, units)],
            metadata={},
        )
        self._insert_grant(
            op,
            grant_id,
            user_id,
            moved[2],
            units,
            origin="refund",
            category="paid",
            priority=50,
            effective_at=self.now,
            expires_at=None,
            status="active",
            transaction_id=entry.id,
            reference=None,
            description=None,
        )
        if not entry_rows.add_refunded(self.conn, op.transaction_id, units):  # pragma: no cover
            raise RefundExceedsCharge()
        self._after_commit(signals.credits_refunded, entry=entry)
        return entry

    # --- grants ------------------------------------------------------------------

    def _void(self, op: VoidGrant) -> Grant:
        found = grant_rows.grant_row(self.conn, op.grant_id)
        if found is None:
            raise NotFound("No such grant")
        self.user_id = user_id = found.user_id
        self._lock(user_id)
        row = grant_rows.grant_row(self.conn, op.grant_id, lock=True)
        grant = GrantState.from_row(row)
        status = grant.status_at()
        if status in ("voided", "expired", "depleted"):
            raise GrantNotActive(f"The grant is {status}")
        entry = None
        if grant.status == "scheduled":
            store.unschedule(self.conn, user_id, grant.amount_units)
            grant_rows.set_grant(
                self.conn, grant.id, status="voided", voided_at=self.now, remaining_units=0
            )
        else:
            units = grant.remaining_units
            grant_rows.set_grant(
                self.conn, grant.id, status="voided", voided_at=self.now, remaining_units=0
            )
            grant.status = "voided"
            if units:
                entry = self._leave(op, grant, units, description=op.reason)
        row = grant_rows.grant_row(self.conn, op.grant_id)
        voided = grant_record(row, GrantState.from_row(row))
        self._after_commit(signals.grant_voided, grant=voided, entry=entry)
        return voided

    # --- holds -------------------------------------------------------------------
