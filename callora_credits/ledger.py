"""The domain core: balances and the operations that move them.

:class:`Ledger` is what the HTTP views, the CLI, ``@charge_credits`` and host
code all call. It knows nothing of Flask requests: it takes plain values and
returns plain dataclasses, and reports failures as :mod:`.errors` exceptions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import store
from .config import CreditsConfig
from .unit_of_work import RetryStats, Tx, run

__all__ = ["Balance", "Clock", "Ledger", "utc", "utcnow"]

T = TypeVar("T")

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The library's clock: the app server's, in UTC (see docs/holds.md)."""
    return datetime.now(timezone.utc)


def utc(value: datetime) -> datetime:
    """A stored (naive UTC) timestamp as an aware UTC datetime."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _naive(value: datetime) -> datetime:
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


class Ledger:
    """Balance operations on one engine, with one configuration and clock.

    Each method runs in its own transaction (retried on transient failures),
    or inside the host's transaction when given ``session=``.
    """

    def __init__(
        self,
        engine: Engine,
        config: CreditsConfig,
        *,
        clock: Clock = utcnow,
        stats: RetryStats | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.stats = stats if stats is not None else RetryStats()

    def _now(self) -> datetime:
        # Stored naive UTC; truncation to microseconds is what every engine keeps.
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
