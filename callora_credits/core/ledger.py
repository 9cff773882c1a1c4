"""The domain core: balances and the operations that move them.

:class:`Ledger` is what the HTTP views, the CLI, ``@charge_credits`` and host
code all call. It knows nothing of Flask requests: it takes plain values and
returns plain dataclasses, and reports failures as :mod:`.errors` exceptions.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..config import CreditsConfig
from ..db import store
from ..db.unit_of_work import RetryStats, RetryTransaction, Tx, run
from ..errors import (
    BalanceLimitExceeded,
    CreditsError,
    DuplicateReference,
    HoldAmountExceeded,
    HoldNotPending,
    IdempotencyConflict,
    IdempotencyInProgress,
    InsufficientCredits,
    NotFound,
    RefundExceedsCharge,
    ValidationError,
    dumps,
    error_from_body,
)
from . import signals
from .idempotency import Idempotency, Outcome
from .money import format_units, parse_units

__all__ = [
    "Adjust",
    "Balance",
    "Capture",
    "Charge",
    "Clock",
    "CreateHold",
    "Entry",
    "Hold",
    "HoldPage",
    "Ledger",
    "Mismatch",
    "Page",
    "ReconcileReport",
    "Refund",
    "Release",
    "TopUp",
    "utc",
    "utcnow",
]

T = TypeVar("T")
R = TypeVar("R")

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The library's clock: the app server's, in UTC (see docs/holds.md)."""
    return datetime.now(timezone.utc)


def utc(value: datetime) -> datetime:
    """A stored (naive UTC) timestamp as an aware UTC datetime."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _naive(value: datetime) -> datetime:
    """Naive UTC, as stored; a naive input is taken to be UTC already."""
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


@dataclass(frozen=True)
class Balance:
    """A user's balance at one moment, in units."""

    user_id: str
    balance_units: int
    held_units: int
    created_at: datetime
    updated_at: datetime

    @property
    def available_units(self) -> int:
        """What a new charge or hold may spend: balance minus live holds."""
        return self.balance_units - self.held_units


def _balance(row: Any) -> Balance:
    return Balance(
        user_id=row.user_id,
        balance_units=int(row.balance_units),
        held_units=int(row.held_units),
        created_at=utc(row.created_at),
        updated_at=utc(row.updated_at),
    )


# --- domain objects ----------------------------------------------------------

ENTRY_TYPES = ("topup", "charge", "refund", "hold_capture", "adjustment")
REFUNDABLE_TYPES = ("charge", "hold_capture")


def iso(value: datetime) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``."""
    return utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Entry:
    """One ledger entry. ``amount_units`` is signed: credits positive."""

    id: str
    user_id: str
    seq: int
    type: str
    amount_units: int
    balance_after_units: int
    reference: str | None
    description: str | None
    metadata: dict[str, str]
    hold_id: str | None
    refund_of: str | None
    refunded_units: int
    actor_id: str | None
    created_at: datetime

    def as_json(self) -> dict[str, Any]:
        """The entry as the HTTP API shows it (SPEC §5)."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "seq": self.seq,
            "type": self.type,
            "amount_usdc": format_units(self.amount_units),
            "balance_after_usdc": format_units(self.balance_after_units),
            "reference": self.reference,
            "description": self.description,
            "metadata": self.metadata,
            "hold_id": self.hold_id,
            "refund_of": self.refund_of,
            "refunded_usdc": format_units(self.refunded_units),
            "actor_id": self.actor_id,
            "created_at": iso(self.created_at),
        }

    @classmethod
    def from_row(cls, row: Any) -> Entry:
        return cls(
            id=row.id,
            user_id=row.user_id,
            seq=int(row.seq),
            type=row.type,
            amount_units=int(row.amount_units),
            balance_after_units=int(row.balance_after_units),
            reference=row.reference,
            description=row.description,
            metadata=json.loads(row.metadata_json),
            hold_id=row.hold_id,
            refund_of=row.refund_of,
            refunded_units=int(row.refunded_units),
            actor_id=row.actor_id,
            created_at=utc(row.created_at),
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        """Rebuild an entry from :meth:`as_json` (a replayed response)."""
        return cls(
            id=data["id"],
            user_id=data["user_id"],
            seq=data["seq"],
            type=data["type"],
            amount_units=parse_units(data["amount_usdc"]),
            balance_after_units=parse_units(data["balance_after_usdc"]),
            reference=data["reference"],
            description=data["description"],
            metadata=data["metadata"],
            hold_id=data["hold_id"],
            refund_of=data["refund_of"],
            refunded_units=parse_units(data["refunded_usdc"]),
            actor_id=data["actor_id"],
            created_at=_parse_iso(data["created_at"]),
        )


@dataclass(frozen=True)
class Page:
    """A page of history, newest first, and the cursor of the next one."""

    entries: list[Entry]
    next_cursor: str | None

    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


@dataclass
class Mismatch:
    """One inconsistency found by :meth:`Ledger.reconcile`."""

    user_id: str
    problem: str


@dataclass
class ReconcileReport:
    """What :meth:`Ledger.reconcile` checked and found."""

    accounts: int = 0
    entries: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def encode_cursor(seq: int) -> str:
    """An opaque, URL-safe cursor (``[A-Za-z0-9_-]``) for entries before ``seq``."""
    return base64.urlsafe_b64encode(f"s:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The ``seq`` in a cursor; :class:`ValueError` if it is not one of ours."""
    if not cursor or len(cursor) > 40 or not all(c.isalnum() or c in "-_" for c in cursor):
        raise ValueError("malformed cursor")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed cursor") from None
    prefix, _, number = text.partition(":")
    if prefix != "s" or not number.isascii() or not number.isdigit():
        raise ValueError("malformed cursor")
    return int(number)


def new_id(prefix: str) -> str:
    """A random id such as ``ctx_3f9c…`` (24 hex digits)."""
    return prefix + secrets.token_hex(12)


# --- operations ----------------------------------------------------------------


@dataclass(frozen=True)
class TopUp:
    user_id: str
    amount_units: int
    reference: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    actor_id: str | None = None
    name: str = "top_up"


@dataclass(frozen=True)
class Charge:
    user_id: str
    amount_units: int
    reference: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    actor_id: str | None = None
    name: str = "charge"


@dataclass(frozen=True)
class Adjust:
    user_id: str
    amount_units: int
    reason: str
    actor_id: str | None = None
    name: str = "adjust"


@dataclass(frozen=True)
class Refund:
    transaction_id: str
    amount_units: int | None = None
    reason: str | None = None
    actor_id: str | None = None
    name: str = "refund"


@dataclass(frozen=True)
class CreateHold:
    user_id: str
    amount_units: int
    expires_in_seconds: int
    reference: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    actor_id: str | None = None
    name: str = "hold"


@dataclass(frozen=True)
class Capture:
    hold_id: str
    amount_units: int | None = None
    actor_id: str | None = None
    name: str = "capture"


@dataclass(frozen=True)
class Release:
    hold_id: str
    actor_id: str | None = None
    name: str = "release"


Operation = TopUp | Charge | Adjust | Refund | CreateHold | Capture | Release

HOLD_STATUSES = ("pending", "captured", "released", "expired")


@dataclass(frozen=True)
class Hold:
    """A two-phase reservation. ``status`` is as of when it was read: a
    pending hold past ``expires_at`` reads as ``expired``."""

    id: str
    user_id: str
    status: str
    amount_units: int
    captured_units: int
    expires_at: datetime
    created_at: datetime
    resolved_at: datetime | None
    transaction_id: str | None
    reference: str | None
    metadata: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        """The hold as the HTTP API shows it (SPEC §5)."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "status": self.status,
            "amount_usdc": format_units(self.amount_units),
            "captured_usdc": format_units(self.captured_units),
            "expires_at": iso(self.expires_at),
            "created_at": iso(self.created_at),
            "resolved_at": None if self.resolved_at is None else iso(self.resolved_at),
            "transaction_id": self.transaction_id,
            "reference": self.reference,
            "metadata": self.metadata,
        }

    @classmethod
    def from_row(cls, row: Any, now: datetime) -> Hold:
        status = row.status
        if status == "pending" and row.expires_at <= now:
            status = "expired"
        return cls(
            id=row.id,
            user_id=row.user_id,
            status=status,
            amount_units=int(row.amount_units),
            captured_units=int(row.captured_units),
            expires_at=utc(row.expires_at),
            created_at=utc(row.created_at),
            resolved_at=None if row.resolved_at is None else utc(row.resolved_at),
            transaction_id=row.transaction_id,
            reference=row.reference,
            metadata=json.loads(row.metadata_json),
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Hold:
        """Rebuild a hold from :meth:`as_json` (a replayed response)."""
        return cls(
            id=data["id"],
            user_id=data["user_id"],
            status=data["status"],
            amount_units=parse_units(data["amount_usdc"]),
            captured_units=parse_units(data["captured_usdc"]),
            expires_at=_parse_iso(data["expires_at"]),
            created_at=_parse_iso(data["created_at"]),
            resolved_at=None if data["resolved_at"] is None else _parse_iso(data["resolved_at"]),
            transaction_id=data["transaction_id"],
            reference=data["reference"],
            metadata=data["metadata"],
        )


@dataclass(frozen=True)
class HoldPage:
    """A page of pending holds, newest first."""

    holds: list[Hold]
    next_cursor: str | None

    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


def _parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def encode_hold_cursor(created_at: datetime, hold_id: str) -> str:
    """A URL-safe cursor for holds older than (``created_at``, ``hold_id``)."""
    text = f"h:{_naive(created_at).strftime('%Y%m%d%H%M%S%f')}:{hold_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_hold_cursor(cursor: str) -> tuple[datetime, str]:
    """The position in a hold cursor; :class:`ValueError` if it is not one."""
    if not cursor or len(cursor) > 120 or not all(c.isalnum() or c in "-_" for c in cursor):
        raise ValueError("malformed cursor")
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, stamp, hold_id = text.split(":", 2)
        created = datetime.strptime(stamp, "%Y%m%d%H%M%S%f")
    except (ValueError, UnicodeDecodeError):
        raise ValueError("malformed cursor") from None
    if prefix != "h" or not hold_id:
        raise ValueError("malformed cursor")
    return created, hold_id


def _params(op: Operation) -> dict[str, Any]:
    # Shallow: the fingerprint serializes nested values itself, and asdict()
    # would deep-copy the metadata on every call.
    return dict(vars(op))


class _ReferenceTaken(Exception):
    def __init__(self, user_id: str, type_: str, reference: str) -> None:
        super().__init__(reference)
        self.user_id, self.type, self.reference = user_id, type_, reference


class _Storable(Exception):
    """A storable error found mid-transaction: roll back, then record it."""

    def __init__(
        self, error: CreditsError, user_id: str | None, taken: _ReferenceTaken | None = None
    ) -> None:
        super().__init__(error.message)
        self.error, self.user_id, self.taken = error, user_id, taken


# --- the ledger ---------------------------------------------------------------


class Ledger:
    """Balance operations on one engine, with one configuration and clock.

    Every balance change is one transaction on one user's account row: the
    row is locked by a conditional relative update (never below zero, never
    past the balance limit), the ledger row is written with the balance after
    it and the user's next ``seq``, and the idempotency key is claimed, all
    before commit. Transient failures are retried (the key makes that safe).
    Pass ``session=`` to run inside the host's transaction instead (no
    retries; signals fire when that session commits).
    """

    def __init__(
        self,
        engine: Engine,
        config: CreditsConfig,
        *,
        clock: Clock = utcnow,
        stats: RetryStats | None = None,
        sender: Any = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.stats = stats if stats is not None else RetryStats()
        self.sender = sender if sender is not None else self

    def _now(self) -> datetime:
        return _naive(self.clock())

    def _run(
        self,
        work: Callable[[Tx], T],
        session: Session | None = None,
        *,
        write: bool = True,
    ) -> T:
        return run(
            work,
            engine=self.engine,
            retries=self.config.db_retries,
            session=session,
            stats=self.stats,
            write=write,
        )

    # --- reads -------------------------------------------------------------

    def find_by_user_id(self, user_id: str, *, session: Session | None = None) -> Balance | None:
        """The user's balance, or ``None`` when they have never had one."""
        now = self._now()

        def work(tx: Tx) -> Balance | None:
            row = store.balance_row(tx.conn, user_id, now)
            return None if row is None else _balance(row)

        return self._run(work, session, write=False)

    def get_or_create_by_user_id(self, user_id: str, *, session: Session | None = None) -> Balance:
        """The user's balance, creating a zero balance on first use.

        Race-free: concurrent first reads all succeed and one row exists.
        Costs one statement when the balance exists.
        """
        found = self.find_by_user_id(user_id, session=session)
        if found is not None:
            return found
        now = self._now()

        def create(tx: Tx) -> Balance:
            store.insert_account_if_missing(tx.conn, user_id, now)
            row = store.balance_row(tx.conn, user_id, now)
            assert row is not None  # inserted or already there, in this transaction
            return _balance(row)

        return self._run(create, session)

    def get_entry(self, transaction_id: str, *, session: Session | None = None) -> Entry | None:
        """One ledger entry by id, or ``None``."""

        def work(tx: Tx) -> Entry | None:
            row = store.entry_row(tx.conn, transaction_id)
            return None if row is None else Entry.from_row(row)

        return self._run(work, session, write=False)

    def history(
        self,
        user_id: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        session: Session | None = None,
    ) -> Page:
        """A page of the user's entries, newest first (keyset on ``seq``).

        ``cursor`` is a previous page's ``next_cursor``; ``since`` is
        inclusive and ``until`` exclusive. One statement whatever the depth.
        """
        before = decode_cursor(cursor) if cursor else None
        t = store.entries
        stmt = select(t).where(t.c.user_id == user_id)
        if before is not None:
            stmt = stmt.where(t.c.seq < before)
        if type is not None:
            stmt = stmt.where(t.c.type == type)
        if since is not None:
            stmt = stmt.where(t.c.created_at >= _naive(since))
        if until is not None:
            stmt = stmt.where(t.c.created_at < _naive(until))
        stmt = stmt.order_by(t.c.seq.desc()).limit(limit + 1)

        def work(tx: Tx) -> Page:
            rows = tx.conn.execute(stmt).all()
            page = [Entry.from_row(row) for row in rows[:limit]]
            more = len(rows) > limit
            return Page(page, encode_cursor(page[-1].seq) if more and page else None)

        return self._run(work, session, write=False)

    def reconcile(self, user_id: str | None = None) -> ReconcileReport:
        """Check every account (or only ``user_id``'s) against its ledger.

        Each balance must equal the sum of its entries, each ``seq`` chain
        must run 1, 2, 3… to the account's ``last_seq``, and each entry's
        ``balance_after`` must be the previous one plus its amount. Reads one
        snapshot (REPEATABLE READ on PostgreSQL), so it can run beside live
        traffic.
        """
        report = ReconcileReport()
        a, t = store.accounts, store.entries
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
        with self.engine.connect() as plain:
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
                            f"{row.entries} entries but last_seq is {row.last_seq}",
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

    def prune_idempotency_keys(self) -> int:
        """Delete idempotency records past their TTL; returns how many."""
        now = self._now()
        return self._run(lambda tx: store.delete_expired_idempotency(tx.conn, now))

    # --- Python API of the money-moving operations --------------------------------

    def top_up(
        self,
        user_id: str,
        amount_units: int,
        *,
        reference: str | None = None,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Entry:
        """Credit ``amount_units`` to the user (created if new)."""
        op = TopUp(user_id, amount_units, reference, description, metadata or {}, actor_id)
        return self._call(op, idempotency_key, actor_id, session, Entry.from_json)

    def charge(
        self,
        user_id: str,
        amount_units: int,
        *,
        reference: str | None = None,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Entry:
        """Debit ``amount_units``; :class:`InsufficientCredits` if not available."""
        op = Charge(user_id, amount_units, reference, description, metadata or {}, actor_id)
        return self._call(op, idempotency_key, actor_id, session, Entry.from_json)

    def adjust(
        self,
        user_id: str,
        amount_units: int,
        reason: str,
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Entry:
        """A signed correction (chargebacks, fixes); never below zero."""
        op = Adjust(user_id, amount_units, reason, actor_id)
        return self._call(op, idempotency_key, actor_id, session, Entry.from_json)

    def refund(
        self,
        transaction_id: str,
        amount_units: int | None = None,
        *,
        reason: str | None = None,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Entry:
        """Give back (part of) a ``charge`` or ``hold_capture``; default: what is left."""
        op = Refund(transaction_id, amount_units, reason, actor_id)
        return self._call(op, idempotency_key, actor_id, session, Entry.from_json)

    def update_balance(
        self,
        user_id: str,
        balance_units: int,
        reason: str = "balance set",
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Entry | None:
        """Set the balance to ``balance_units`` through a recorded ``adjustment``.

        Never a blind overwrite: the difference from the locked current
        balance is written as an adjustment entry. ``None`` if already equal.
        """
        if balance_units < 0:
            raise ValidationError("A balance cannot be negative")
        current = self.get_or_create_by_user_id(user_id, session=session)
        delta = balance_units - current.balance_units
        if delta == 0:
            return None
        # The adjustment is relative; if the balance moved since the read, the
        # key (derived from the read) still applies the delta at most once.
        key = idempotency_key or f"set:{user_id}:{balance_units}:{uuid.uuid4().hex}"
        return self.adjust(
            user_id, delta, reason, actor_id=actor_id, idempotency_key=key, session=session
        )

    def _call(
        self,
        op: Operation,
        key: str | None,
        actor_id: str | None,
        session: Session | None,
        rebuild: Callable[[dict[str, Any]], R],
    ) -> R:
        """Run ``op`` for the Python API: a value, or the stored error raised."""
        idem = Idempotency.for_call(op.name, _params(op), key=key, actor_id=actor_id)
        outcome = self.execute(op, idem, session=session)
        if outcome.status >= 400:
            raise error_from_body(outcome.status, outcome.json())
        if outcome.value is not None:
            value: R = outcome.value
            return value
        return rebuild(outcome.json())

    # --- holds --------------------------------------------------------------------

    def hold(
        self,
        user_id: str,
        amount_units: int,
        *,
        expires_in_seconds: int | None = None,
        reference: str | None = None,
        metadata: dict[str, str] | None = None,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Hold:
        """Reserve ``amount_units`` of the available balance until captured,
        released or expired; :class:`InsufficientCredits` if not available."""
        ttl = self.config.hold_ttl_seconds if expires_in_seconds is None else expires_in_seconds
        if not 1 <= ttl <= self.config.hold_ttl_max_seconds:
            raise ValidationError(
                f"expires_in_seconds must be 1 to {self.config.hold_ttl_max_seconds}"
            )
        op = CreateHold(user_id, amount_units, ttl, reference, metadata or {}, actor_id)
        return self._call(op, idempotency_key, actor_id, session, Hold.from_json)

    def capture(
        self,
        hold_id: str,
        amount_units: int | None = None,
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Hold:
        """Spend up to the held amount (default: all) and release the rest.

        Capturing 0 is a release. The ledger entry is the hold's
        ``transaction_id``.
        """
        op = Capture(hold_id, amount_units, actor_id)
        return self._call(op, idempotency_key, actor_id, session, Hold.from_json)

    def release(
        self,
        hold_id: str,
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: Session | None = None,
    ) -> Hold:
        """Give the whole reservation back; :class:`HoldNotPending` if resolved."""
        op = Release(hold_id, actor_id)
        return self._call(op, idempotency_key, actor_id, session, Hold.from_json)

    def get_hold(self, hold_id: str, *, session: Session | None = None) -> Hold | None:
        """One hold by id, or ``None``."""
        now = self._now()

        def work(tx: Tx) -> Hold | None:
            row = store.hold_row(tx.conn, hold_id)
            return None if row is None else Hold.from_row(row, now)

        return self._run(work, session, write=False)

    def pending_holds(
        self,
        user_id: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
        session: Session | None = None,
    ) -> HoldPage:
        """The user's pending, unexpired holds, newest first."""
        now = self._now()
        after = decode_hold_cursor(cursor) if cursor else None

        def work(tx: Tx) -> HoldPage:
            rows = store.pending_hold_rows(tx.conn, user_id, now, limit + 1, after)
            page = [Hold.from_row(row, now) for row in rows[:limit]]
            more = len(rows) > limit and bool(page)
            last = page[-1] if page else None
            return HoldPage(
                page,
                encode_hold_cursor(last.created_at, last.id) if more and last else None,
            )

        return self._run(work, session, write=False)

    def expire_holds(self) -> int:
        """Mark pending holds past their expiry ``expired``; returns how many.

        Tidiness only: an expired hold stops counting the moment it expires.
        """
        now = self._now()
        return self._run(lambda tx: store.expire_holds(tx.conn, now))

    # --- the idempotent core ------------------------------------------------------

    def execute(
        self, op: Operation, idem: Idempotency, *, session: Session | None = None
    ) -> Outcome:
        """Run ``op`` once per idempotency key and return its (stored) outcome.

        The key is claimed by inserting its record, with the response, in the
        operation's own transaction; a concurrent duplicate loses on the
        primary key, rolls back, and replays the winner's response. Storable
        failures (402, 409, 422 of SPEC §6) roll the change back and are then
        recorded in a transaction of their own.
        """
        now = self._now()
        expires = now + timedelta(seconds=self.config.idempotency_ttl_seconds)
        deadline = time.monotonic() + self.config.idempotency_wait_seconds

        def record(tx: Tx, user_id: str | None, status: int, body: bytes) -> None:
            values = {
                "key_hash": idem.key_hash,
                "user_id": user_id,
                "actor_id": idem.actor_id,
                "method": idem.method,
                "path": idem.path[:512],
                "idempotency_key": idem.key,
                "fingerprint": idem.fingerprint,
                "status_code": status,
                "response_body": body.decode(),
                "created_at": now,
                "expires_at": expires,
            }
            if session is not None:
                store.insert_idempotency(tx.conn, values)
                return
            try:
                store.insert_idempotency(tx.conn, values)
            except IntegrityError:
                if time.monotonic() > deadline:
                    raise IdempotencyInProgress() from None
                raise RetryTransaction() from None

        def replay(tx: Tx) -> Outcome | None:
            found = store.find_idempotency(tx.conn, idem.key_hash)
            if found is None:
                return None
            if found.expires_at <= now:
                store.delete_expired_key(tx.conn, idem.key_hash, now)
                return None
            if found.fingerprint != idem.fingerprint:
                raise IdempotencyConflict()
            return Outcome(int(found.status_code), found.response_body.encode(), True)

        def apply(tx: Tx) -> Outcome:
            if tx.attempt > 0 or session is not None:
                replayed = replay(tx)
                if replayed is not None:
                    return replayed
            target = _Target(_target(op))
            try:
                status, value = self._apply(tx, op, now, target)
            except _ReferenceTaken as taken:
                raise _Storable(DuplicateReference(), taken.user_id, taken) from None
            except CreditsError as error:
                if error.storable:
                    raise _Storable(error, target.user_id) from None
                raise
            body = dumps(value.as_json())
            record(tx, target.user_id, status, body)
            return Outcome(status, body, False, value)

        try:
            return self._run(apply, session)
        except _Storable as stored:
            if session is not None:
                raise stored.error from None
            return self._record_error(stored, idem, record, replay)

    def _record_error(
        self,
        stored: _Storable,
        idem: Idempotency,
        record: Callable[[Tx, str | None, int, bytes], None],
        replay: Callable[[Tx], Outcome | None],
    ) -> Outcome:
        def work(tx: Tx) -> Outcome:
            error = stored.error
            replayed = replay(tx)
            if replayed is not None:
                return replayed
            if stored.taken is not None:
                taken = stored.taken
                if taken.type == "hold":
                    existing = store.hold_by_reference(tx.conn, taken.user_id, taken.reference)
                else:
                    existing = store.entry_by_reference(
                        tx.conn, taken.user_id, taken.type, taken.reference
                    )
                error = DuplicateReference(
                    details=[
                        {
                            "field": "reference",
                            "message": "This reference was already used",
                            "code": "duplicate_reference",
                            "transaction_id": existing,
                        }
                    ]
                )
            body = dumps(error.body(idem.request_id))
            record(tx, stored.user_id, error.status, body)
            return Outcome(error.status, body, False, error)

        return self._run(work)

    # --- applying one operation, inside its transaction -------------------------

    def _apply(
        self, tx: Tx, op: Operation, now: datetime, target: _Target
    ) -> tuple[int, Entry | Hold]:
        if isinstance(op, TopUp):
            entry = self._credit(
                tx,
                now,
                op.user_id,
                op.amount_units,
                "topup",
                op.reference,
                op.description,
                op.metadata,
                op.actor_id,
            )
            tx.after_commit(partial(signals.credits_topped_up.send, self.sender, entry=entry))
            return 201, entry
        if isinstance(op, Charge):
            entry = self._debit(
                tx,
                now,
                op.user_id,
                op.amount_units,
                "charge",
                op.reference,
                op.description,
                op.metadata,
                op.actor_id,
            )
            tx.after_commit(partial(signals.credits_charged.send, self.sender, entry=entry))
            return 201, entry
        if isinstance(op, Adjust):
            if op.amount_units > 0:
                entry = self._credit(
                    tx,
                    now,
                    op.user_id,
                    op.amount_units,
                    "adjustment",
                    None,
                    op.reason,
                    {},
                    op.actor_id,
                )
            else:
                entry = self._debit(
                    tx,
                    now,
                    op.user_id,
                    -op.amount_units,
                    "adjustment",
                    None,
                    op.reason,
                    {},
                    op.actor_id,
                )
            tx.after_commit(partial(signals.credits_adjusted.send, self.sender, entry=entry))
            return 201, entry
        if isinstance(op, Refund):
            return 201, self._refund(tx, now, op, target)
        if isinstance(op, CreateHold):
            return 201, self._create_hold(tx, now, op)
        return 200, self._resolve_hold(tx, now, op, target)

    def _entry(self, tx: Tx, now: datetime, **fields: Any) -> Entry:
        entry = Entry(
            id=new_id("ctx_"),
            created_at=utc(now),
            refunded_units=0,
            hold_id=fields.pop("hold_id", None),
            refund_of=fields.pop("refund_of", None),
            **fields,
        )
        return entry

    def _insert(self, tx: Tx, entry: Entry, now: datetime, *, guard: bool) -> bool:
        values = {
            "id": entry.id,
            "user_id": entry.user_id,
            "seq": entry.seq,
            "type": entry.type,
            "amount_units": entry.amount_units,
            "balance_after_units": entry.balance_after_units,
            "reference": entry.reference,
            "description": entry.description,
            "metadata_json": dumps(entry.metadata).decode(),
            "hold_id": entry.hold_id,
            "refund_of": entry.refund_of,
            "refunded_units": 0,
            "actor_id": entry.actor_id,
            "created_at": now,
        }
        try:
            return store.insert_entry(tx.conn, values, require_available=now if guard else None)
        except IntegrityError:
            if entry.reference is None:
                raise
            raise _ReferenceTaken(entry.user_id, entry.type, entry.reference) from None

    def _credit(
        self,
        tx: Tx,
        now: datetime,
        user_id: str,
        units: int,
        type_: str,
        reference: str | None,
        description: str | None,
        metadata: dict[str, str],
        actor_id: str | None,
        refund_of: str | None = None,
    ) -> Entry:
        limit = self.config.max_balance_units
        moved = store.credit(tx.conn, user_id, units, limit, now) if units <= limit else None
        if moved is None:
            raise BalanceLimitExceeded(f"The balance may not exceed {format_units(limit)} USDC")
        balance_after, seq = moved
        entry = self._entry(
            tx,
            now,
            user_id=user_id,
            seq=seq,
            type=type_,
            amount_units=units,
            balance_after_units=balance_after,
            reference=reference,
            description=description,
            metadata=metadata,
            actor_id=actor_id,
            refund_of=refund_of,
        )
        self._insert(tx, entry, now, guard=False)
        return entry

    def _debit(
        self,
        tx: Tx,
        now: datetime,
        user_id: str,
        units: int,
        type_: str,
        reference: str | None,
        description: str | None,
        metadata: dict[str, str],
        actor_id: str | None,
        hold_id: str | None = None,
        guard: bool = True,
    ) -> Entry:
        moved = store.debit(tx.conn, user_id, units, now)
        if moved is None:
            raise InsufficientCredits()
        balance_after, seq = moved
        entry = self._entry(
            tx,
            now,
            user_id=user_id,
            seq=seq,
            type=type_,
            amount_units=-units,
            balance_after_units=balance_after,
            reference=reference,
            description=description,
            metadata=metadata,
            actor_id=actor_id,
            hold_id=hold_id,
        )
        if not self._insert(tx, entry, now, guard=guard):
            # The balance covers the debit but not the holds pending on it.
            raise InsufficientCredits()
        self._balance_signals(tx, user_id, balance_after + units, balance_after)
        return entry

    def _balance_signals(self, tx: Tx, user_id: str, before: int, after: int) -> None:
        low = self.config.low_balance_units
        if low is not None and before >= low > after:
            tx.after_commit(
                partial(
                    signals.balance_low.send, self.sender, user_id=user_id, balance_units=after
                )
            )
        if after == 0 < before:
            tx.after_commit(
                partial(
                    signals.balance_depleted.send,
                    self.sender,
                    user_id=user_id,
                    balance_units=after,
                )
            )

    def _refund(self, tx: Tx, now: datetime, op: Refund, target: _Target) -> Entry:
        found = store.entry_row(tx.conn, op.transaction_id)
        if found is None:
            raise NotFound("No such transaction")
        target.user_id = found.user_id
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
        store.lock_account(tx.conn, found.user_id)
        locked = store.entry_row(tx.conn, op.transaction_id, lock=True)
        assert locked is not None
        remaining = -int(locked.amount_units) - int(locked.refunded_units)
        units = remaining if op.amount_units is None else op.amount_units
        if units <= 0 or units > remaining:
            raise RefundExceedsCharge(
                f"At most {format_units(remaining)} USDC of this charge can be refunded"
            )
        entry = self._credit(
            tx,
            now,
            found.user_id,
            units,
            "refund",
            None,
            op.reason,
            {},
            op.actor_id,
            refund_of=op.transaction_id,
        )
        if not store.add_refunded(tx.conn, op.transaction_id, units):  # pragma: no cover
            raise RefundExceedsCharge()
        tx.after_commit(partial(signals.credits_refunded.send, self.sender, entry=entry))
        return entry

    # --- holds, inside their transaction -------------------------------------------

    def _create_hold(self, tx: Tx, now: datetime, op: CreateHold) -> Hold:
        account = store.lock_account(tx.conn, op.user_id)
        # A new statement after the lock: every hold committed before it counts.
        held = store.held_units(tx.conn, op.user_id, now) if account is not None else 0
        balance = int(account.balance_units) if account is not None else 0
        if op.amount_units > balance - held:
            raise InsufficientCredits()
        hold = Hold(
            id=new_id("hold_"),
            user_id=op.user_id,
            status="pending",
            amount_units=op.amount_units,
            captured_units=0,
            expires_at=utc(now + timedelta(seconds=op.expires_in_seconds)),
            created_at=utc(now),
            resolved_at=None,
            transaction_id=None,
            reference=op.reference,
            metadata=op.metadata,
        )
        try:
            store.insert_hold(
                tx.conn,
                {
                    "id": hold.id,
                    "user_id": hold.user_id,
                    "status": "pending",
                    "amount_units": hold.amount_units,
                    "captured_units": 0,
                    "expires_at": _naive(hold.expires_at),
                    "created_at": now,
                    "resolved_at": None,
                    "transaction_id": None,
                    "reference": hold.reference,
                    "metadata_json": dumps(hold.metadata).decode(),
                    "actor_id": op.actor_id,
                },
            )
        except IntegrityError:
            if op.reference is None:
                raise
            raise _ReferenceTaken(op.user_id, "hold", op.reference) from None
        tx.after_commit(partial(signals.hold_created.send, self.sender, hold=hold))
        return hold

    def _resolve_hold(self, tx: Tx, now: datetime, op: Capture | Release, target: _Target) -> Hold:
        found = store.hold_row(tx.conn, op.hold_id)
        if found is None:
            raise NotFound("No such hold")
        target.user_id = found.user_id
        # Lock order: the account first, as every balance change does.
        store.lock_account(tx.conn, found.user_id)
        row = store.hold_row(tx.conn, op.hold_id, lock=True)
        assert row is not None
        if row.status != "pending":
            raise HoldNotPending(f"The hold is already {row.status}")
        if row.expires_at <= now:
            raise HoldNotPending("The hold has expired")
        amount = int(row.amount_units)
        if isinstance(op, Release):
            units = 0
        else:
            units = amount if op.amount_units is None else op.amount_units
        if units > amount:
            raise HoldAmountExceeded(
                f"The hold reserves {format_units(amount)} USDC; capture at most that"
            )
        entry: Entry | None = None
        status = "captured" if units > 0 else "released"
        if not store.resolve_hold(tx.conn, op.hold_id, status, units, now):  # pragma: no cover
            raise HoldNotPending()
        if units > 0:
            # The hold is no longer pending, so the guard counts only the others.
            entry = self._debit(
                tx,
                now,
                found.user_id,
                units,
                "hold_capture",
                None,
                None,
                json.loads(row.metadata_json),
                op.actor_id,
                hold_id=op.hold_id,
            )
            store.set_hold_transaction(tx.conn, op.hold_id, entry.id)
        hold = replace(
            Hold.from_row(row, now),
            status=status,
            captured_units=units,
            resolved_at=utc(now),
            transaction_id=None if entry is None else entry.id,
        )
        if entry is not None:
            tx.after_commit(
                partial(signals.hold_captured.send, self.sender, hold=hold, entry=entry)
            )
        else:
            tx.after_commit(partial(signals.hold_released.send, self.sender, hold=hold))
        return hold


@dataclass
class _Target:
    user_id: str | None


def _target(op: Operation) -> str | None:
    return getattr(op, "user_id", None)
