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

import json
import secrets
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal, Protocol

from sqlalchemy.exc import IntegrityError

from ..db import grant_rows, store
from ..db.unit_of_work import Tx
from ..errors import (
    BalanceLimitExceeded,
    DuplicateReference,
    GrantNotActive,
    HoldAmountExceeded,
    HoldNotPending,
    InsufficientCredits,
    NotFound,
    RefundExceedsCharge,
    ValidationError,
)
from . import settlement, signals
from .clock import naive, utc
from .grants import GrantState, draw
from .money import format_units
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
from .records import Allocation, Entry, Grant, Hold, HoldStatus

__all__ = [
    "Posting",
    "ReferenceTaken",
    "Settings",
    "describe_duplicate",
    "grant_record",
    "new_id",
]

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
        # ``type_``: the entry type, or "hold" or "grant".
        super().__init__()
        self.user_id, self.type, self.reference = user_id, type_, reference


Draws = list[tuple[GrantState, int]]


class Posting:
    """One operation applied in one transaction, at one instant.

    ``user_id`` is the account the operation touched (known once a refund or
    capture has found its entry or hold), recorded with its idempotency key.
    Whatever fell due on that account is written first, under its lock.
    """

    def __init__(self, tx: Tx, now: datetime, settings: Settings, sender: Any) -> None:
        self.tx = tx
        self.conn = tx.conn
        self.now = now
        self.settings = settings
        self.sender = sender
        self.user_id: str | None = None

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

    def _after_commit(self, signal: Any, **kwargs: Any) -> None:
        self.tx.after_commit(partial(signal.send, self.sender, **kwargs))

    # --- what fell due ---------------------------------------------------------------

    def _lock(self, user_id: str) -> Any:
        """Lock the account row, settle what is due on it, and return it
        (``None`` if the account does not exist)."""
        account = store.lock_account(self.conn, user_id)
        if account is not None and self._due(account):
            self._settle(user_id, account)
            account = store.lock_account(self.conn, user_id)
        return account

    def _due(self, account: Any) -> bool:
        return account.next_due_at is not None and account.next_due_at <= self.now

    def _settle_if_due(self, user_id: str) -> bool:
        """After a conditional update refused: settle if that was why."""
        account = store.lock_account(self.conn, user_id)
        if account is None or not self._due(account):
            return False
        self._settle(user_id, account)
        return True

    def _settle(self, user_id: str, account: Any) -> None:
        def tell(name: str, **kwargs: Any) -> None:
            if name == "balance_moved":
                self._balance_signals(user_id, kwargs["before"], kwargs["after"])
            else:
                self._after_commit(getattr(signals, name), **kwargs)

        settlement.settle(self.conn, user_id, account, self.now, new_id, tell)

    # --- ledger entries ---------------------------------------------------------

    def _entry(
        self,
        op: Operation | None,
        user_id: str,
        type_: str,
        amount_units: int,
        moved: tuple[int, ...],
        description: str | None,
        *,
        hold_id: str | None = None,
        refund_of: str | None = None,
        metadata: dict[str, str] | None = None,
        grant_id: str | None = None,
        draws: Draws = (),  # type: ignore[assignment]
        reference: str | None = None,
        entry_id: str | None = None,
    ) -> Entry:
        """The entry of a change already made: ``moved`` is the account's
        (balance after, seq) from the update that made it. Written with its
        allocations."""
        balance_after_units, seq = moved[0], moved[1]
        entry = Entry(
            id=entry_id or new_id("ctx_"),
            user_id=user_id,
            seq=seq,
            type=type_,  # type: ignore[arg-type]
            amount_units=amount_units,
            balance_after_units=balance_after_units,
            reference=reference,
            description=description,
            metadata=metadata if metadata is not None else getattr(op, "metadata", {}),
            hold_id=hold_id,
            refund_of=refund_of,
            refunded_units=0,
            grant_id=grant_id,
            allocations=tuple(Allocation(grant.id, units) for grant, units in draws),
            actor_id=None if op is None else op.actor_id,
            created_at=utc(self.now),
        )
        try:
            store.insert_entry(self.conn, entry.row_values())
        except IntegrityError as exc:
            if entry.reference is not None and store.violates(exc, store.ENTRY_REFERENCE):
                raise self._duplicate(entry.type, entry.reference) from None
            raise
        grant_rows.insert_allocations(
            self.conn,
            [
                {
                    "user_id": user_id,
                    "entry_id": entry.id,
                    "hold_id": None,
                    "position": position,
                    "grant_id": grant.id,
                    "amount_units": units,
                }
                for position, (grant, units) in enumerate(draws)
            ],
        )
        return entry

    def _duplicate(self, type_: str, reference: str) -> ReferenceTaken:
        assert self.user_id is not None  # entries and holds name their account
        return ReferenceTaken(self.user_id, type_, reference)

    # --- credits -----------------------------------------------------------------

    def _add(
        self, user_id: str, units: int, *, grants: int, due: datetime | None
    ) -> tuple[int, int, int]:
        """Add ``units`` to the balance (settling first if something is due)."""
        limit = self.settings.max_balance_units
        moved = None
        if units <= limit:
            moved = store.credit(
                self.conn, user_id, units, limit, self.now, grants=grants, due=due
            )
            if moved is None and self._settle_if_due(user_id):
                moved = store.credit(
                    self.conn, user_id, units, limit, self.now, grants=grants, due=due
                )
        if moved is None:
            raise BalanceLimitExceeded(f"The balance may not exceed {format_units(limit)} USDC")
        return moved

    def _credit_grant(
        self,
        op: Operation,
        user_id: str,
        units: int,
        type_: Literal["topup", "grant", "adjustment"],
        *,
        category: str,
        priority: int,
        expires_at: datetime | None,
        description: str | None,
        reference: str | None = None,
        grant_description: str | None = None,
    ) -> Entry:
        """Credit ``units`` as a new grant, with its entry."""
        expiry = None if expires_at is None else naive(expires_at)
        if expiry is not None and expiry <= self.now:
            raise ValidationError.on("expires_at", "expires_at must be in the future", "range")
        moved = self._add(user_id, units, grants=1, due=expiry)
        grant_id = new_id("grant_")
        if reference is None:
            reference = getattr(op, "reference", None)
        entry = self._entry(
            op,
            user_id,
            type_,
            units,
            moved,
            description,
            grant_id=grant_id,
            reference=reference,
        )
        grant = self._insert_grant(
            op,
            grant_id,
            user_id,
            moved[2],
            units,
            origin=type_,
            category=category,
            priority=priority,
            effective_at=self.now,
            expires_at=expiry,
            status="active",
            transaction_id=entry.id,
            reference=reference,
            description=grant_description,
        )
        self._after_commit(signals.grant_created, grant=grant)
        return entry

    def _insert_grant(
        self,
        op: Operation,
        grant_id: str,
        user_id: str,
        number: int,
        units: int,
        *,
        origin: str,
        category: str,
        priority: int,
        effective_at: datetime,
        expires_at: datetime | None,
        status: str,
        transaction_id: str | None,
        reference: str | None,
        description: str | None,
    ) -> Grant:
        grant = Grant(
            id=grant_id,
            user_id=user_id,
            category=category,  # type: ignore[arg-type]
            amount_units=units,
            remaining_units=units,
            held_units=0,
            priority=priority,
            effective_at=utc(effective_at),
            expires_at=None if expires_at is None else utc(expires_at),
            voided_at=None,
            status=status,  # type: ignore[arg-type]
            reference=reference,
            description=description,
            metadata=getattr(op, "metadata", {}) if origin == "grant" else {},
            transaction_id=transaction_id,
            created_at=utc(self.now),
        )
        values = grant.row_values()
        values.update(number=number, origin=origin, actor_id=op.actor_id, status=status)
        try:
            grant_rows.insert_grant(self.conn, values)
        except IntegrityError as exc:
            if reference is not None and store.violates(exc, grant_rows.GRANT_REFERENCE):
                raise self._duplicate(origin, reference) from None
            raise
        return grant

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

    def _take(self, user_id: str, units: int) -> tuple[int, int]:
        """Take ``units`` off the balance (settling first if something is due)."""
        moved = store.debit(self.conn, user_id, units, self.now)
        if moved is None and self._settle_if_due(user_id):
            moved = store.debit(self.conn, user_id, units, self.now)
        if moved is None:
            raise InsufficientCredits()
        return moved

    def _draw(self, user_id: str, units: int, *, pin: bool = False) -> Draws:
        """Take ``units`` from the user's grants in consumption order (to
        their held part when ``pin``)."""
        found = [
            GrantState.from_row(row)
            for row in grant_rows.spendable_grants(self.conn, user_id, self.now)
        ]
        draws = draw(found, units, self.now)
        if draws is None:
            # The balance covers it, but part of it is held.
            raise InsufficientCredits()
        for grant, part in draws:
            grant_rows.move_grant(self.conn, grant.id, remaining=-part, held=part if pin else 0)
        return draws

    def _debit(
        self,
        user_id: str,
        units: int,
        type_: str,
        op: Operation,
        description: str | None,
    ) -> Entry:
        moved = self._take(user_id, units)
        draws = self._draw(user_id, units)
        entry = self._entry(
            op,
            user_id,
            type_,
            -units,
            moved,
            description,
            draws=draws,
            metadata=None if type_ == "charge" else {},
            reference=getattr(op, "reference", None),
        )
        self._balance_signals(user_id, moved[0] + units, moved[0])
        return entry

    def _leave(
        self,
        op: Operation | None,
        grant: GrantState,
        units: int,
        hold_id: str | None = None,
        description: str | None = None,
    ) -> Entry:
        """``units`` given back to a dead grant leave the balance at once."""
        moved = store.debit(self.conn, grant.user_id, units, self.now)
        assert moved is not None  # the units were just credited or released
        entry = self._entry(
            op,
            grant.user_id,
            grant.leave_type(),
            -units,
            moved,
            description,
            grant_id=grant.id,
            metadata={},
            hold_id=hold_id,
        )
        self._balance_signals(grant.user_id, moved[0] + units, moved[0])
        return entry

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
        account = self._lock(op.user_id)
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
        locked = store.entry_row(self.conn, op.transaction_id, lock=True)
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
        if not store.add_refunded(self.conn, op.transaction_id, units):  # pragma: no cover
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
            voided_at=None,
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
        if not store.add_refunded(self.conn, op.transaction_id, units):  # pragma: no cover
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
            grant_rows.set_grant(self.conn, grant.id, status="voided", voided_at=self.now)
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

    def _create_hold(self, op: CreateHold) -> Hold:
        account = self._lock(op.user_id)
        if account is None:
            raise InsufficientCredits()
        pins = self._draw(op.user_id, op.amount_units, pin=True)
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
        grant_rows.insert_allocations(
            self.conn,
            [
                {
                    "user_id": op.user_id,
                    "entry_id": None,
                    "hold_id": hold.id,
                    "position": position,
                    "grant_id": grant.id,
                    "amount_units": units,
                }
                for position, (grant, units) in enumerate(pins)
            ],
        )
        expiry = naive(hold.expires_at)
        if account.next_due_at is None or account.next_due_at > expiry:
            store.bring_due_forward(self.conn, op.user_id, expiry)
        self._after_commit(signals.hold_created, hold=hold)
        return hold

    def _resolve_hold(self, op: Capture | Release) -> Hold:
        found = store.hold_row(self.conn, op.hold_id)
        if found is None:
            raise NotFound("No such hold")
        self.user_id = user_id = found.user_id
        # Lock order: the account first, as every balance change does; what
        # fell due (this hold's expiry too) is written first.
        self._lock(user_id)
        row = store.hold_row(self.conn, op.hold_id, lock=True)
        assert row is not None
        if row.status != "pending":
            raise HoldNotPending(f"The hold is already {row.status}")
        if row.expires_at <= self.now:  # pragma: no cover - settled by _lock
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
            moved = self._take(user_id, units)
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
            store.set_hold_transaction(self.conn, op.hold_id, entry.id)
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


def grant_record(row: Any, state: GrantState) -> Grant:
    """The grant as read: ``row``'s fields with ``state``'s figures and status."""
    return Grant(
        id=row.id,
        user_id=row.user_id,
        category=row.category,
        amount_units=int(row.amount_units),
        remaining_units=state.remaining_units,
        held_units=state.held_units,
        priority=int(row.priority),
        effective_at=utc(row.effective_at),
        expires_at=None if row.expires_at is None else utc(row.expires_at),
        voided_at=None if row.voided_at is None else utc(row.voided_at),
        status=state.status_at(),
        reference=row.reference,
        description=row.description,
        metadata=json.loads(row.metadata_json),
        transaction_id=row.transaction_id,
        created_at=utc(row.created_at),
    )


def describe_duplicate(tx: Tx, taken: ReferenceTaken) -> DuplicateReference:
    """The error to record for ``taken``: it names the entry (or hold) that
    already has the reference."""
    if taken.type == "hold":
        existing = store.hold_by_reference(tx.conn, taken.user_id, taken.reference)
    elif taken.type == "grant":
        grant = grant_rows.grant_by_reference(tx.conn, taken.user_id, taken.reference)
        return DuplicateReference(
            details=[
                {
                    "field": "reference",
                    "message": "This reference was already used",
                    "code": "duplicate_reference",
                    "grant_id": None if grant is None else grant.id,
                    "transaction_id": None if grant is None else grant.transaction_id,
                }
            ]
        )
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
