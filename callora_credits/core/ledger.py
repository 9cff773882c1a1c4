"""The Python API: :class:`Ledger`, what host code, the CLI, the views and
``@charge_credits`` call.

Each money-moving method builds an operation (which validates itself), runs
it once per idempotency key through :class:`~.idempotency.IdempotentExecutor`,
and returns the entry or hold, or raises the
:class:`~callora_credits.errors.CreditsError` that describes why not. Reads
return records and pages of records. Nothing here knows of HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, TypedDict, TypeVar

from sqlalchemy import select
from sqlalchemy.engine import Engine
from typing_extensions import Unpack

from ..config import CreditsConfig
from ..db import entry_rows, hold_rows, key_rows, store
from ..db.connections import configure_engine
from ..db.unit_of_work import HostSession, RetryStats, Tx, run
from ..db.usage import BucketSums, usage_sums
from ..errors import CreditsError, ValidationError
from .clock import Clock, naive, utcnow
from .idempotency import CallCodec, IdempotencyScope, IdempotentExecutor, Outcome, OutcomeCodec
from .ledger_grants import GrantsAPI, _check_limit
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
    check_identity,
    possible_id,
)
from .pagination import Page, decode_hold_cursor, decode_seq_cursor, hold_cursor, seq_cursor
from .reading import read_balance, read_entries
from .reconcile import ReconcileReport, reconcile
from .records import Balance, Entry, Grant, Hold
from .usage import Granularity, Usage, UsageWindow

__all__ = ["Ledger", "TransferOptions"]

T = TypeVar("T")


class TransferOptions(TypedDict, total=False):
    """The keyword arguments of :meth:`Ledger.top_up` and :meth:`Ledger.charge`."""

    #: An external id (a payment, an order): unique per user and entry type.
    reference: str | None
    #: Up to 500 characters, shown in the history.
    description: str | None
    #: A flat ``str -> str`` object: at most 50 keys of 1-40 characters,
    #: values of at most 500.
    metadata: dict[str, str] | None
    #: Who asked (recorded on the entry).
    actor_id: str | None
    #: Makes the call safe to retry: it applies once per key.
    idempotency_key: str | None
    #: The host's session, to run inside its transaction.
    session: HostSession | None


_CALLS = CallCodec()


class Ledger(GrantsAPI):
    """Balance operations on one engine, with one configuration and clock.

    Every balance change is one transaction on one user's account row: the
    row is locked by a conditional relative update (never below zero, never
    past the balance limit), the ledger row is written with the balance after
    it and the user's next ``seq``, and the idempotency key is claimed, all
    before commit. Transient failures are retried (the key makes that safe).

    Every money-moving method takes ``idempotency_key=`` (without one, the
    call gets an internal key, so its own retries never apply it twice) and
    ``session=``: pass the host's session (``db.session`` too) to run inside
    its transaction instead (no retries; signals fire when it commits).

    On PostgreSQL with psycopg 3 the engine's connections stop preparing
    statements on the server, unless ``config.pg_prepared_statements``
    (:func:`~callora_credits.db.connections.configure_engine`).
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
        configure_engine(engine, prepared_statements=config.pg_prepared_statements)
        self.engine = engine
        self.config = config
        self.clock = clock
        self.stats = stats if stats is not None else RetryStats()
        self.sender = sender if sender is not None else self
        self.executor = IdempotentExecutor(self._run, config, self.sender)

    def _now(self) -> datetime:
        return naive(self.clock())

    def _run(
        self, work: Callable[[Tx], T], session: HostSession | None = None, *, write: bool = True
    ) -> T:
        return run(
            work,
            engine=self.engine,
            retries=self.config.db_retries,
            retry_seconds=self.config.db_retry_seconds,
            session=session,
            stats=self.stats,
            write=write,
            causal=not write and self.config.galera_causal_reads,
        )

    # --- reads ---------------------------------------------------------------------

    def find_by_user_id(
        self, user_id: str, *, session: HostSession | None = None
    ) -> Balance | None:
        """The user's balance, or ``None`` when they have never had one."""
        check_identity("user_id", user_id)
        now = self._now()

        return self._run(lambda tx: read_balance(tx.conn, user_id, now), session, write=False)

    def get_or_create_by_user_id(
        self, user_id: str, *, session: HostSession | None = None
    ) -> Balance:
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
            found = read_balance(tx.conn, user_id, now)
            assert found is not None  # inserted or already there, in this transaction
            return found

        return self._run(create, session)

    def get_entry(
        self, transaction_id: str, *, session: HostSession | None = None
    ) -> Entry | None:
        """One ledger entry by id, or ``None``."""
        if not isinstance(transaction_id, str) or not possible_id(transaction_id):
            return None

        def work(tx: Tx) -> Entry | None:
            row = entry_rows.entry_row(tx.conn, transaction_id)
            return None if row is None else read_entries(tx.conn, [row])[0]

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
        session: HostSession | None = None,
    ) -> Page[Entry]:
        """A page of the user's entries, newest first (keyset on ``seq``).

        ``cursor`` is a previous page's ``next_cursor``; ``since`` is
        inclusive and ``until`` exclusive. One statement whatever the depth.
        """
        check_identity("user_id", user_id)
        _check_limit(limit)
        before = decode_seq_cursor(cursor) if cursor else None
        t = store.entries
        stmt = select(t).where(t.c.user_id == user_id)
        if before is not None:
            stmt = stmt.where(t.c.seq < before)
        if type is not None:
            stmt = stmt.where(t.c.type == type)
        if since is not None:
            stmt = stmt.where(t.c.created_at >= naive(since))
        if until is not None:
            stmt = stmt.where(t.c.created_at < naive(until))
        stmt = stmt.order_by(t.c.seq.desc()).limit(limit + 1)

        def work(tx: Tx) -> Page[Entry]:
            rows = tx.conn.execute(stmt).all()
            page = read_entries(tx.conn, rows[:limit])
            more = len(rows) > limit and bool(page)
            return Page(page, seq_cursor(page[-1].seq) if more else None)

        return self._run(work, session, write=False)

    def usage(
        self,
        user_id: str,
        since: datetime | None = None,
        until: datetime | None = None,
        granularity: Granularity = "day",
        *,
        session: HostSession | None = None,
    ) -> Usage:
        """The user's usage per UTC ``"hour"`` or ``"day"``, and when the
        available balance runs out at the pace of the last 7 days.

        ``since`` is inclusive and ``until`` exclusive (naive datetimes are
        UTC); ``until`` defaults to now and ``since`` to 30 days before it.
        Every bucket that overlaps the range is returned, oldest first, empty
        ones with zeros; the first and last count only entries inside the
        range. More than 400 buckets is a
        :class:`~callora_credits.errors.ValidationError`. The sums are one
        statement; the available balance is read as :meth:`find_by_user_id`
        reads it.
        """
        window = UsageWindow.resolve(user_id, since, until, granularity, self._now())

        def work(tx: Tx) -> tuple[BucketSums, int]:
            return usage_sums(
                tx.conn,
                window.user_id,
                window.since,
                window.until,
                window.granularity,
                window.burn_since,
            )

        sums, burned = self._run(work, session, write=False)
        balance = self.find_by_user_id(window.user_id, session=session)
        available = 0 if balance is None else balance.available_units
        return window.summary(sums, burned, available)

    def get_hold(self, hold_id: str, *, session: HostSession | None = None) -> Hold | None:
        """One hold by id, or ``None``."""
        if not isinstance(hold_id, str) or not possible_id(hold_id):
            return None
        now = self._now()

        def work(tx: Tx) -> Hold | None:
            row = hold_rows.hold_row(tx.conn, hold_id)
            return None if row is None else Hold.from_row(row).as_of(now)

        return self._run(work, session, write=False)

    def pending_holds(
        self,
        user_id: str,
        *,
        limit: int = 20,
        cursor: str | None = None,
        session: HostSession | None = None,
    ) -> Page[Hold]:
        """The user's pending, unexpired holds, newest first."""
        check_identity("user_id", user_id)
        _check_limit(limit)
        now = self._now()
        after = decode_hold_cursor(cursor) if cursor else None

        def work(tx: Tx) -> Page[Hold]:
            rows = hold_rows.pending_hold_rows(tx.conn, user_id, now, limit + 1, after)
            page = [Hold.from_row(row).as_of(now) for row in rows[:limit]]
            last = page[-1] if len(rows) > limit and page else None
            return Page(page, None if last is None else hold_cursor(last.created_at, last.id))

        return self._run(work, session, write=False)

    def reconcile(self, user_id: str | None = None) -> ReconcileReport:
        """Check every account (or only ``user_id``'s) against its ledger."""
        return reconcile(self.engine, user_id)

    def prune_idempotency_keys(self) -> int:
        """Delete idempotency records past their TTL; returns how many."""
        now = self._now()
        return self._run(lambda tx: key_rows.delete_expired_idempotency(tx.conn, now))

    # --- money-moving operations ---------------------------------------------------

    def top_up(
        self,
        user_id: str,
        amount_units: int,
        *,
        expires_at: datetime | None = None,
        priority: int = 50,
        **options: Unpack[TransferOptions],
    ) -> Entry:
        """Credit ``amount_units`` to the user (created if new), as a ``paid``
        grant that expires at ``expires_at`` (default never) and is used in
        ``priority`` order (0-100, lower first).

        ``reference`` (an external payment id) credits at most once per user,
        even under different idempotency keys.
        """
        return self._transfer(
            TopUp, user_id, amount_units, options, expires_at=expires_at, priority=priority
        )

    def charge(self, user_id: str, amount_units: int, **options: Unpack[TransferOptions]) -> Entry:
        """Debit ``amount_units``; :class:`~callora_credits.errors.InsufficientCredits`
        when the available balance does not cover it."""
        return self._transfer(Charge, user_id, amount_units, options)

    def _transfer(
        self,
        kind: type[TopUp | Charge],
        user_id: str,
        amount_units: int,
        options: TransferOptions,
        **extra: Any,
    ) -> Entry:
        metadata = options.get("metadata")
        op = kind(
            **extra,
            limits=self.config,
            user_id=user_id,
            amount_units=amount_units,
            reference=options.get("reference"),
            description=options.get("description"),
            metadata={} if metadata is None else metadata,
            actor_id=options.get("actor_id"),
        )
        return self._entry(op, options.get("idempotency_key"), options.get("session"))

    def adjust(
        self,
        user_id: str,
        amount_units: int,
        reason: str,
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: HostSession | None = None,
    ) -> Entry:
        """A signed correction (chargebacks, fixes); never below zero."""
        op = Adjust(
            limits=self.config,
            user_id=user_id,
            amount_units=amount_units,
            reason=reason,
            actor_id=actor_id,
        )
        return self._entry(op, idempotency_key, session)

    def refund(
        self,
        transaction_id: str,
        amount_units: int | None = None,
        *,
        reason: str | None = None,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: HostSession | None = None,
    ) -> Entry:
        """Give back (part of) a ``charge`` or ``hold_capture``; default: what is left."""
        op = Refund(
            limits=self.config,
            transaction_id=transaction_id,
            amount_units=amount_units,
            reason=reason,
            actor_id=actor_id,
        )
        return self._entry(op, idempotency_key, session)

    def update_balance(
        self,
        user_id: str,
        balance_units: int,
        reason: str = "balance set",
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: HostSession | None = None,
    ) -> Entry | None:
        """Set the balance to ``balance_units`` through a recorded ``adjustment``.

        Never a blind overwrite: the balance is read under the account's lock
        and the difference is written as an adjustment entry, in one
        transaction, so concurrent calls leave one of their targets.
        ``None`` if the balance already was ``balance_units``.
        """
        op = SetBalance(
            limits=self.config,
            user_id=user_id,
            balance_units=balance_units,
            reason=reason,
            actor_id=actor_id,
        )
        result = self._call(op, idempotency_key, session)
        assert result is None or isinstance(result, Entry)
        return result

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
        session: HostSession | None = None,
    ) -> Hold:
        """Reserve ``amount_units`` of the available balance until captured,
        released or expired; :class:`~callora_credits.errors.InsufficientCredits`
        if not available."""
        op = CreateHold(
            limits=self.config,
            user_id=user_id,
            amount_units=amount_units,
            expires_in_seconds=expires_in_seconds,
            reference=reference,
            metadata={} if metadata is None else metadata,
            actor_id=actor_id,
        )
        return self._hold(op, idempotency_key, session)

    def capture(
        self,
        hold_id: str,
        amount_units: int | None = None,
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: HostSession | None = None,
    ) -> Hold:
        """Spend up to the held amount (default: all) and release the rest.

        Capturing 0 is a release. The ledger entry is the hold's
        ``transaction_id``.
        """
        op = Capture(
            limits=self.config, hold_id=hold_id, amount_units=amount_units, actor_id=actor_id
        )
        return self._hold(op, idempotency_key, session)

    def release(
        self,
        hold_id: str,
        *,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: HostSession | None = None,
    ) -> Hold:
        """Give the whole reservation back;
        :class:`~callora_credits.errors.HoldNotPending` if already resolved."""
        op = Release(limits=self.config, hold_id=hold_id, actor_id=actor_id)
        return self._hold(op, idempotency_key, session)

    def execute(
        self,
        op: Operation,
        scope: IdempotencyScope,
        codec: OutcomeCodec,
        *,
        session: HostSession | None = None,
    ) -> Outcome:
        """Run ``op`` once per ``scope``'s key; the door's stored outcome.

        What the HTTP views call; the methods above call it with the Python
        API's own scope and codec.
        """
        return self.executor.execute(op, scope, codec, self._now(), session=session)

    def _call(
        self, op: Operation, key: str | None, session: HostSession | None
    ) -> Entry | Hold | Grant | None:
        if key is not None and not isinstance(key, str):
            raise ValidationError.on("idempotency_key", "Use a string", "type")
        outcome = self.execute(op, IdempotencyScope.for_call(op, key), _CALLS, session=session)
        result = (
            _CALLS.decode(op, outcome.status, outcome.body) if outcome.replayed else outcome.result
        )
        if isinstance(result, CreditsError):
            raise result
        return result

    def _entry(self, op: Operation, key: str | None, session: HostSession | None) -> Entry:
        result = self._call(op, key, session)
        assert isinstance(result, Entry)
        return result

    def _hold(self, op: Operation, key: str | None, session: HostSession | None) -> Hold:
        result = self._call(op, key, session)
        assert isinstance(result, Hold)
        return result
