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

import secrets
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

from sqlalchemy.exc import IntegrityError

from ..db import store
from ..db.unit_of_work import Tx
from ..errors import (
    BalanceLimitExceeded,
    DuplicateReference,
    HoldAmountExceeded,
    HoldNotPending,
    InsufficientCredits,
    NotFound,
    RefundExceedsCharge,
    ValidationError,
)
from . import signals
from .clock import utc
from .money import format_units
from .operations import (
    Adjust,
    Capture,
    Charge,
    CreateHold,
    Operation,
    Refund,
    Release,
    SetBalance,
    TopUp,
)
from .records import Entry, Hold, HoldStatus

__all__ = ["Posting", "ReferenceTaken", "Settings", "describe_duplicate", "new_id"]

REFUNDABLE_TYPES = ("charge", "hold_capture")


def new_id(prefix: str) -> str:
    """A random id such as ``ctx_3f9c…`` (24 hex digits)."""
    return prefix + secrets.token_hex(12)


class Settings(Protocol):
    """What posting reads from the configuration (``CreditsConfig`` has it)."""

    @property
    def max_balance_units(self) -> int: ...

    @property
    def low_balance_units(self) -> int | None: ...


class ReferenceTaken(DuplicateReference):
    """A reference unique constraint refused the insert. Which row holds the
    reference is looked up once the transaction has rolled back (PostgreSQL
    refuses statements in a failed transaction): :meth:`Posting.describe`."""

    def __init__(self, user_id: str, type_: str, reference: str) -> None:
        super().__init__()
        self.user_id, self.type, self.reference = user_id, type_, reference


class Posting:
    """One operation applied in one transaction, at one instant.

    ``user_id`` is the account the operation touched (known once a refund or
    capture has found its entry or hold), recorded with its idempotency key.
    """

    def __init__(self, tx: Tx, now: datetime, settings: Settings, sender: Any) -> None:
        self.tx = tx
        self.conn = tx.conn
        self.now = now
        self.settings = settings
        self.sender = sender
        self.user_id: str | None = None

    def apply(self, op: Operation) -> Entry | Hold | None:
        """Apply ``op``; the entry or hold it produced (``None``: nothing to change)."""
        self.user_id = op.user_id_or_none
        if isinstance(op, TopUp):
            entry = self._credit(op.user_id, op.amount_units, "topup", op, op.description)
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
        raise TypeError(f"not an operation: {op!r}")  # pragma: no cover

    def _after_commit(self, signal: Any, **kwargs: Any) -> None:
        self.tx.after_commit(partial(signal.send, self.sender, **kwargs))

    # --- ledger entries ---------------------------------------------------------

    def _entry(
        self,
        op: Operation,
        user_id: str,
        type_: str,
        amount_units: int,
        moved: tuple[int, int],
        description: str | None,
        *,
        hold_id: str | None = None,
        refund_of: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Entry:
        """The entry of a change already made: ``moved`` is the account's
        (balance after, seq) from the update that made it."""
        balance_after_units, seq = moved
        return Entry(
            id=new_id("ctx_"),
            user_id=user_id,
            seq=seq,
            type=type_,  # type: ignore[arg-type]
            amount_units=amount_units,
            balance_after_units=balance_after_units,
            reference=getattr(op, "reference", None),
            description=description,
            metadata=metadata if metadata is not None else getattr(op, "metadata", {}),
            hold_id=hold_id,
            refund_of=refund_of,
            refunded_units=0,
            actor_id=op.actor_id,
            created_at=utc(self.now),
        )

    def _insert(self, entry: Entry, *, guard: bool) -> bool:
        try:
            return store.insert_entry(
                self.conn, entry.row_values(), require_available=self.now if guard else None
            )
        except IntegrityError as exc:
            if entry.reference is not None and store.violates(exc, store.ENTRY_REFERENCE):
                raise self._duplicate(entry.type, entry.reference) from None
            raise

    def _duplicate(self, type_: str, reference: str) -> ReferenceTaken:
        assert self.user_id is not None  # entries and holds name their account
        return ReferenceTaken(self.user_id, type_, reference)

    def _credit(
        self,
        user_id: str,
        units: int,
        type_: str,
        op: Operation,
        description: str | None,
        refund_of: str | None = None,
    ) -> Entry:
        limit = self.settings.max_balance_units
        moved = (
            store.credit(self.conn, user_id, units, limit, self.now) if units <= limit else None
        )
        if moved is None:
            raise BalanceLimitExceeded(f"The balance may not exceed {format_units(limit)} USDC")
        entry = self._entry(op, user_id, type_, units, moved, description, refund_of=refund_of)
        self._insert(entry, guard=False)
        return entry

    def _debit(
        self,
        user_id: str,
        units: int,
        type_: str,
        op: Operation,
        description: str | None,
        hold_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Entry:
        moved = store.debit(self.conn, user_id, units, self.now)
        if moved is None:
            raise InsufficientCredits()
        balance_after = moved[0]
        entry = self._entry(
            op, user_id, type_, -units, moved, description, hold_id=hold_id, metadata=metadata
        )
        if not self._insert(entry, guard=True):
            # The balance covers the debit but not the holds pending on it.
            raise InsufficientCredits()
        self._balance_signals(user_id, balance_after + units, balance_after)
        return entry

    def _adjust(self, user_id: str, units: int, reason: str, op: Operation) -> Entry:
        if units > 0:
            return self._credit(user_id, units, "adjustment", op, reason)
        return self._debit(user_id, -units, "adjustment", op, reason, metadata={})

    def _balance_signals(self, user_id: str, before: int, after: int) -> None:
        low = self.settings.low_balance_units
        if low is not None and before >= low > after:
            self._after_commit(signals.balance_low, user_id=user_id, balance_units=after)
        if after == 0 < before:
            self._after_commit(signals.balance_depleted, user_id=user_id, balance_units=after)

    def _set_balance(self, op: SetBalance) -> Entry | None:
        # Read under the account's lock, so two concurrent settings leave the
        # balance at one of the targets, never at their sum.
        store.insert_account_if_missing(self.conn, op.user_id, self.now)
        account = store.lock_account(self.conn, op.user_id)
        assert account is not None  # inserted above or already there
        delta = op.balance_units - int(account.balance_units)
        if delta == 0:
            return None
        entry = self._adjust(op.user_id, delta, op.reason, op)
        self._after_commit(signals.credits_adjusted, entry=entry)
        return entry

    def _refund(self, op: Refund) -> Entry:
        found = store.entry_row(self.conn, op.transaction_id)
        if found is None:
            raise NotFound("No such transaction")
        self.user_id = found.user_id
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
        store.lock_account(self.conn, found.user_id)
        locked = store.entry_row(self.conn, op.transaction_id, lock=True)
        assert locked is not None
        remaining = -int(locked.amount_units) - int(locked.refunded_units)
        units = remaining if op.amount_units is None else op.amount_units
        if units <= 0 or units > remaining:
            raise RefundExceedsCharge(
                f"At most {format_units(remaining)} USDC of this charge can be refunded"
            )
        entry = self._credit(
            found.user_id, units, "refund", op, op.reason, refund_of=op.transaction_id
        )
        if not store.add_refunded(self.conn, op.transaction_id, units):  # pragma: no cover
            raise RefundExceedsCharge()
        self._after_commit(signals.credits_refunded, entry=entry)
        return entry

    # --- holds -------------------------------------------------------------------

    def _create_hold(self, op: CreateHold) -> Hold:
        account = store.lock_account(self.conn, op.user_id)
        # A new statement after the lock: every hold committed before it counts.
        held = store.held_units(self.conn, op.user_id, self.now) if account is not None else 0
        balance = int(account.balance_units) if account is not None else 0
        if op.amount_units > balance - held:
            raise InsufficientCredits()
        hold = Hold(
            id=new_id("hold_"),
            user_id=op.user_id,
            status="pending",
            amount_units=op.amount_units,
            captured_units=0,
            expires_at=utc(self.now + timedelta(seconds=op.ttl_seconds)),
            created_at=utc(self.now),
            resolved_at=None,
            transaction_id=None,
            reference=op.reference,
            metadata=op.metadata,
        )
        try:
            store.insert_hold(self.conn, {**hold.row_values(), "actor_id": op.actor_id})
        except IntegrityError as exc:
            if op.reference is not None and store.violates(exc, store.HOLD_REFERENCE):
                raise self._duplicate("hold", op.reference) from None
            raise
        self._after_commit(signals.hold_created, hold=hold)
        return hold

    def _resolve_hold(self, op: Capture | Release) -> Hold:
        found = store.hold_row(self.conn, op.hold_id)
        if found is None:
            raise NotFound("No such hold")
        self.user_id = found.user_id
        # Lock order: the account first, as every balance change does.
        store.lock_account(self.conn, found.user_id)
        row = store.hold_row(self.conn, op.hold_id, lock=True)
        assert row is not None
        if row.status != "pending":
            raise HoldNotPending(f"The hold is already {row.status}")
        if row.expires_at <= self.now:
            raise HoldNotPending("The hold has expired")
        amount = int(row.amount_units)
        units = 0 if isinstance(op, Release) or op.amount_units is None else op.amount_units
        if isinstance(op, Capture) and op.amount_units is None:
            units = amount
        if units > amount:
            raise HoldAmountExceeded(
                f"The hold reserves {format_units(amount)} USDC; capture at most that"
            )
        status: HoldStatus = "captured" if units > 0 else "released"
        if not store.resolve_hold(self.conn, op.hold_id, status, units, self.now):
            raise HoldNotPending()  # pragma: no cover - the row is locked
        entry: Entry | None = None
        hold = Hold.from_row(row)
        if units > 0:
            # The hold is no longer pending, so the guard counts only the others.
            entry = self._debit(
                found.user_id,
                units,
                "hold_capture",
                op,
                None,
                hold_id=op.hold_id,
                metadata=hold.metadata,
            )
            store.set_hold_transaction(self.conn, op.hold_id, entry.id)
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


def describe_duplicate(tx: Tx, taken: ReferenceTaken) -> DuplicateReference:
    """The error to record for ``taken``: it names the entry (or hold) that
    already has the reference."""
    if taken.type == "hold":
        existing = store.hold_by_reference(tx.conn, taken.user_id, taken.reference)
    else:
        existing = store.entry_by_reference(tx.conn, taken.user_id, taken.type, taken.reference)
    return DuplicateReference(
        details=[
            {
                "field": "reference",
                "message": "This reference was already used",
                "code": "duplicate_reference",
                "transaction_id": existing,
            }
        ]
    )
