"""How money moves inside one transaction: the steps every operation is made of.

:class:`Moves` holds the account's lock and what fell due on it, the ledger
entries with their allocations, credits that create grants, and debits that
draw from grants in consumption order. The operations are built from these
steps in :mod:`.hold_moves`, :mod:`.grant_moves` and :mod:`.posting`.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from functools import partial
from typing import Any, Literal, Protocol

from sqlalchemy.exc import IntegrityError

from ..db import entry_rows, grant_rows, hold_rows, store
from ..db.constraints import violates
from ..db.unit_of_work import Tx
from ..errors import (
    BalanceLimitExceeded,
    DuplicateReference,
    InsufficientCredits,
    ValidationError,
)
from . import settlement, signals
from .clock import naive, utc
from .grants import GrantState, draw
from .money import format_units
from .operations import (
    Operation,
)
from .records import Allocation, Entry, Grant

__all__ = [
    "Draws",
    "Moves",
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


class Moves:
    """The steps of an operation applied in one transaction, at one instant.

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

    def settle(self, user_id: str) -> int:
        """Write what fell due on the account; how many events."""
        account = store.lock_account(self.conn, user_id)
        if account is None or not self._due(account):
            return 0
        return self._settle(user_id, account)

    def _due(self, account: Any) -> bool:
        return account.next_due_at is not None and account.next_due_at <= self.now

    def _settle_if_due(self, user_id: str) -> bool:
        """After a conditional update refused: settle if that was why."""
        account = store.lock_account(self.conn, user_id)
        if account is None or not self._due(account):
            return False
        self._settle(user_id, account)
        return True

    def _settle(self, user_id: str, account: Any) -> int:
        def tell(name: str, **kwargs: Any) -> None:
            if name == "balance_moved":
                self._balance_signals(user_id, kwargs["before"], kwargs["after"])
            else:
                self._after_commit(getattr(signals, name), **kwargs)

        return settlement.settle(self.conn, user_id, account, self.now, new_id, tell)

    # --- ledger entries ---------------------------------------------------------

    def _entry(
        self,
        op: Operation,
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
            actor_id=op.actor_id,
            created_at=utc(self.now),
        )
        try:
            entry_rows.insert_entry(self.conn, entry.row_values())
        except IntegrityError as exc:
            if entry.reference is not None and violates(exc, entry_rows.ENTRY_REFERENCE):
                raise self._duplicate(entry.type, entry.reference) from None
            raise
        grant_rows.insert_allocations(
            self.conn, user_id, [(grant.id, units) for grant, units in draws], entry_id=entry.id
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
        values.update(number=number, origin=origin, actor_id=op.actor_id)
        try:
            grant_rows.insert_grant(self.conn, values)
        except IntegrityError as exc:
            if reference is not None and violates(exc, grant_rows.GRANT_REFERENCE):
                raise self._duplicate(origin, reference) from None
            raise
        return grant

    def _take(self, user_id: str, units: int, *, release: int = 0) -> tuple[int, int]:
        """Take ``units`` off the balance (settling first if something is due);
        ``release``: they come out of a hold of that amount, captured."""
        moved = store.debit(self.conn, user_id, units, self.now, release=release)
        if moved is None and self._settle_if_due(user_id):
            moved = store.debit(self.conn, user_id, units, self.now, release=release)
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
        op: Operation,
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

    def _balance_signals(self, user_id: str, before: int, after: int) -> None:
        low = self.settings.low_balance_units
        if low is not None and before >= low > after:
            self._after_commit(signals.balance_low, user_id=user_id, balance_units=after)
        if after == 0 < before:
            self._after_commit(signals.balance_depleted, user_id=user_id, balance_units=after)


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
        existing = hold_rows.hold_by_reference(tx.conn, taken.user_id, taken.reference)
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
        existing = entry_rows.entry_by_reference(
            tx.conn, taken.user_id, taken.type, taken.reference
        )
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
