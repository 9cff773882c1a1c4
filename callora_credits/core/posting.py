"""How an operation is applied inside one transaction.

:class:`Posting` takes an operation that has validated itself and applies
it on the transaction's connection: the account row is locked first (by the
conditional relative update, or ``SELECT … FOR UPDATE``), then the ledger
row and hold rows are written. It returns the resulting record or raises a
:class:`~callora_credits.errors.CreditsError`; it knows nothing of HTTP,
idempotency keys or retries (:mod:`.idempotency` and
:mod:`callora_credits.db.unit_of_work` do those).
"""

from __future__ import annotations

from ..db import store
from . import signals
from .grant_moves import GrantMoves
from .hold_moves import HoldMoves
from .moves import ReferenceTaken, Settings, describe_duplicate, grant_record, new_id
from .operations import (
    Adjust,
    Capture,
    Charge,
    CreateGrant,
    CreateHold,
    Operation,
    Refund,
    Release,
    SetBalance,
    TopUp,
    VoidGrant,
)
from .records import Entry, Grant, Hold

__all__ = [
    "Posting",
    "ReferenceTaken",
    "Settings",
    "describe_duplicate",
    "grant_record",
    "new_id",
]


class Posting(HoldMoves, GrantMoves):
    """One operation applied in one transaction, at one instant."""

    def apply(self, op: Operation) -> Entry | Hold | Grant | None:
        """Apply ``op``; the entry, hold or grant it produced (``None``: nothing to change)."""
        self.user_id = op.user_id_or_none
        if isinstance(op, TopUp):
            entry = self._credit_grant(
                op,
                op.user_id,
                op.amount_units,
                "topup",
                category="paid",
                priority=op.priority,
                expires_at=op.expires_at,
                description=op.description,
            )
            self._after_commit(signals.credits_topped_up, entry=entry)
            return entry
        if isinstance(op, Charge):
            entry = self._debit(op.user_id, op.amount_units, "charge", op, op.description)
            self._after_commit(signals.credits_charged, entry=entry)
            return entry
        if isinstance(op, Adjust):
            entry = self._adjust(op.user_id, op.amount_units, op.reason, op)
            self._after_commit(signals.credits_adjusted, entry=entry)
            return entry
        if isinstance(op, SetBalance):
            return self._set_balance(op)
        if isinstance(op, Refund):
            return self._refund(op)
        if isinstance(op, CreateHold):
            return self._create_hold(op)
        if isinstance(op, Capture | Release):
            return self._resolve_hold(op)
        if isinstance(op, CreateGrant):
            return self._grant(op)
        if isinstance(op, VoidGrant):
            return self._void(op)
        raise TypeError(f"not an operation: {op!r}")  # pragma: no cover

    def _adjust(self, user_id: str, units: int, reason: str, op: Operation) -> Entry:
        if units > 0:
            return self._credit_grant(
                op,
                user_id,
                units,
                "adjustment",
                category="paid",
                priority=50,
                expires_at=None,
                description=reason,
            )
        return self._debit(user_id, -units, "adjustment", op, reason)

    def _set_balance(self, op: SetBalance) -> Entry | None:
        # Read under the account's lock, so two concurrent settings leave the
        # balance at one of the targets, never at their sum.
        store.insert_account_if_missing(self.conn, op.user_id, self.now)
        account = self._lock(op.user_id)
        assert account is not None  # inserted above or already there
        delta = op.balance_units - int(account.balance_units)
        if delta == 0:
            return None
        entry = self._adjust(op.user_id, delta, op.reason, op)
        self._after_commit(signals.credits_adjusted, entry=entry)
        return entry
