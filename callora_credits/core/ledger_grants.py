"""The grants part of the Python API: give, void, list and read grants, and
write what fell due (:class:`GrantsAPI`, a base of
:class:`~callora_credits.core.ledger.Ledger`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

from ..config import CreditsConfig
from ..db import store
from ..db.unit_of_work import HostSession, Tx
from ..errors import ValidationError
from .operations import (
    CreateGrant,
    Operation,
    VoidGrant,
    check_identity,
    possible_id,
)
from .pagination import Page, decode_seq_cursor, seq_cursor
from .posting import Posting
from .reading import GRANT_FILTERS, read_grant, read_grants
from .records import Entry, Grant, Hold

__all__ = ["GrantsAPI"]

T = TypeVar("T")


class GrantsAPI:
    """Grant methods of :class:`~callora_credits.core.ledger.Ledger`; they run
    through its transactions, clock and idempotency like the rest."""

    config: CreditsConfig
    sender: Any

    def _now(self) -> datetime:
        raise NotImplementedError

    def _run(
        self, work: Callable[[Tx], T], session: HostSession | None = None, *, write: bool = True
    ) -> T:
        raise NotImplementedError

    def _call(
        self, op: Operation, key: str | None, session: HostSession | None
    ) -> Entry | Hold | Grant | None:
        raise NotImplementedError

    def settle_grants(self, *, batch: int = 100) -> int:
        """Write every due event (hold expiries, grant activations and
        expiries) of every account, one account per transaction; returns how
        many events were written.

        Reads are exact without it, and the next operation on an account
        writes what is due there first: this moves the history, the usage
        summary and ``updated_at`` along for accounts left alone. Safe to run
        concurrently and repeatedly: each event is written once.
        """
        written = 0
        seen: set[str] = set()
        while True:
            now = self._now()
            users = self._run(partial(_due_accounts, now, batch), write=False)
            users = [user for user in users if user not in seen]
            if not users:
                return written
            for user_id in users:
                seen.add(user_id)
                written += self._run(partial(self._settle_one, user_id, self._now()))

    def _settle_one(self, user_id: str, now: datetime, tx: Tx) -> int:
        return Posting(tx, now, self.config, self.sender).settle(user_id)

    def expire_holds(self) -> int:
        """Write what fell due on every account (expired holds give their
        pinned credit back): :meth:`settle_grants`. Returns the events written.
        """
        return self.settle_grants()

    # --- grants ----------------------------------------------------------------------

    def get_grant(self, grant_id: str, *, session: HostSession | None = None) -> Grant | None:
        """One grant by id, as of now, or ``None``."""
        if not isinstance(grant_id, str) or not possible_id(grant_id):
            return None
        now = self._now()
        return self._run(lambda tx: read_grant(tx.conn, grant_id, now), session, write=False)

    def grants(
        self,
        user_id: str,
        *,
        status: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        session: HostSession | None = None,
    ) -> Page[Grant]:
        """A page of the user's grants, newest first. ``status`` is one of
        scheduled, active, depleted, expired, voided or ``"all"``; by default
        the active and scheduled ones."""
        check_identity("user_id", user_id)
        _check_limit(limit)
        statuses = GRANT_FILTERS.get("default" if status is None else status)
        if statuses is None or status == "default":
            raise ValidationError.on(
                "status", "Use scheduled, active, depleted, expired, voided or all", "enum"
            )
        before = decode_seq_cursor(cursor, "g") if cursor else None
        now = self._now()

        def work(tx: Tx) -> Page[Grant]:
            found, more = read_grants(tx.conn, user_id, now, statuses, limit, before)
            return Page(found, None if more is None else seq_cursor(more, "g"))

        return self._run(work, session, write=False)

    def grant(
        self,
        user_id: str,
        amount_units: int,
        *,
        category: str = "promotional",
        priority: int = 50,
        effective_at: datetime | None = None,
        expires_at: datetime | None = None,
        reference: str | None = None,
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: HostSession | None = None,
    ) -> Grant:
        """Give the user credit as a grant (promotional by default), entering
        the balance at ``effective_at`` (default now) and leaving it at
        ``expires_at`` (default never). Times are timezone-aware."""
        op = CreateGrant(
            limits=self.config,
            user_id=user_id,
            amount_units=amount_units,
            category=category,
            priority=priority,
            effective_at=effective_at,
            expires_at=expires_at,
            reference=reference,
            description=description,
            metadata={} if metadata is None else metadata,
            actor_id=actor_id,
        )
        result = self._call(op, idempotency_key, session)
        assert isinstance(result, Grant)
        return result

    def void_grant(
        self,
        grant_id: str,
        *,
        reason: str | None = None,
        actor_id: str | None = None,
        idempotency_key: str | None = None,
        session: HostSession | None = None,
    ) -> Grant:
        """Take what is left of a grant out of the balance now (its held part
        when its holds resolve); ``reason`` is the ``void`` entry's description.
        :class:`~callora_credits.errors.GrantNotActive` if nothing is left."""
        op = VoidGrant(limits=self.config, grant_id=grant_id, reason=reason, actor_id=actor_id)
        result = self._call(op, idempotency_key, session)
        assert isinstance(result, Grant)
        return result


def _due_accounts(now: datetime, batch: int, tx: Tx) -> list[str]:
    return store.due_accounts(tx.conn, now, batch)


def _check_limit(limit: object) -> None:
    if type(limit) is not int or limit < 1:
        raise ValidationError.on("limit", "limit must be a positive int", "range")
