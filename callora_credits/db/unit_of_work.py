"""The one place that opens a database transaction and retries it.

Each operation of the ledger is a function of a :class:`Tx`. :func:`run`
executes it in its own transaction on the host's engine (never touching the
host's session), retrying transient failures a bounded number of times with
jittered backoff, or inside the host's session when one is given.
Callbacks registered with :meth:`Tx.after_commit` (signals) run only once the
transaction has committed.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

__all__ = ["RetryStats", "RetryTransaction", "Tx", "is_retryable", "run"]

log = logging.getLogger("callora_credits")

T = TypeVar("T")

# SQLSTATEs: serialization failure, deadlock.
_PG_RETRY_STATES = frozenset({"40001", "40P01"})
# MariaDB/MySQL: deadlock, lock wait timeout, server gone / lost connection.
_MYSQL_RETRY_CODES = frozenset({1213, 1205, 2006, 2013})


class RetryTransaction(Exception):
    """Raised by a unit of work to roll back and run again.

    Used when a unique constraint lost a race (an idempotency key claimed by a
    concurrent request): the next attempt sees the winner's committed row.
    """


@dataclass
class Tx:
    """One transaction: its connection, its attempt number, its callbacks."""

    conn: Connection
    attempt: int
    _after_commit: list[Callable[[], object]] = field(default_factory=list)

    @property
    def dialect(self) -> str:
        """The engine's dialect name: ``sqlite``, ``postgresql`` or ``mysql``."""
        return self.conn.dialect.name

    def after_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` once the transaction has committed; never on rollback."""
        self._after_commit.append(callback)


class RetryStats:
    """Counts retries per reason; read by tests and benchmarks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, reason: str) -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _retry_reason(exc: BaseException) -> str | None:
    if isinstance(exc, RetryTransaction):
        return "conflict"
    if isinstance(exc, ConnectFailed):
        return "connect"
    if not isinstance(exc, DBAPIError):
        return None
    if exc.connection_invalidated:
        return "disconnect"
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_RETRY_CODES:
        return {1213: "deadlock", 1205: "lock_timeout"}.get(args[0], "disconnect")
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _PG_RETRY_STATES:
        return "serialization" if state == "40001" else "deadlock"
    text = str(orig).lower()
    if "database is locked" in text or "database table is locked" in text:
        return "locked"
    return None


def is_retryable(exc: BaseException) -> bool:
    """Whether running the same unit again may succeed (SPEC §9)."""
    return _retry_reason(exc) is not None


class ConnectFailed(Exception):
    """The database could not be reached to open a connection (retried)."""


def _connect(engine: Engine) -> Connection:
    try:
        return engine.connect()
    except DBAPIError as exc:
        # Nothing ran yet, so trying again is always safe.
        raise ConnectFailed(str(exc.orig)) from exc


@contextmanager
def _begin(engine: Engine, write: bool) -> Iterator[Connection]:
    with _connect(engine) as conn:
        if write and conn.dialect.name == "sqlite":
            # pysqlite would BEGIN lazily (DEFERRED) before the first write, so
            # two transactions could both read then both try to write. Taking
            # the write lock first makes every unit serial on SQLite.
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.exec_driver_sql("ROLLBACK")
                raise
            conn.exec_driver_sql("COMMIT")
        else:
            with conn.begin():
                yield conn


def _fire(callbacks: list[Callable[[], object]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:  # a receiver's bug must not fail a committed change
            log.exception("credits: a post-commit callback failed")


_PENDING = "callora_credits.after_commit"


def _sqlite_begin(conn: Connection) -> None:
    """Open the host's SQLite transaction if pysqlite has not yet.

    pysqlite begins lazily, before the first write; a SAVEPOINT issued first
    would then be a transaction of its own, committed on release.
    """
    if conn.dialect.name != "sqlite":
        return
    raw = conn.connection.dbapi_connection
    if raw is not None and not getattr(raw, "in_transaction", True):
        conn.exec_driver_sql("BEGIN")


def _connection(session: Session, engine: Engine) -> Connection:
    """The session's connection to ``engine``, in the session's transaction.

    Usually the session's own bind; with ``CREDITS_BIND_KEY`` the ledger's
    engine is another of the host's databases, which the session then joins.
    """
    if session.get_bind().engine is engine:
        # Keeps a session bound to a connection (an outer test transaction) on it.
        return session.connection()
    return session.connection(bind_arguments={"bind": engine})


def _defer_to_session(session: Session, callbacks: list[Callable[[], object]]) -> None:
    """Fire ``callbacks`` when the session commits; drop them on rollback.

    The callbacks wait in ``session.info``; one pair of listeners per session
    fires or clears them.
    """
    pending: list[Callable[[], object]] | None = session.info.get(_PENDING)
    if pending is None:
        pending = session.info[_PENDING] = []

        def on_commit(committed: Session) -> None:
            ready = list(committed.info[_PENDING])
            committed.info[_PENDING].clear()
            _fire(ready)

        def on_rollback(rolled_back: Session) -> None:
            rolled_back.info[_PENDING].clear()

        event.listen(session, "after_commit", on_commit)
        event.listen(session, "after_rollback", on_rollback)
    pending.extend(callbacks)


def run(
    work: Callable[[Tx], T],
    *,
    engine: Engine,
    retries: int,
    session: Session | None = None,
    stats: RetryStats | None = None,
    write: bool = True,
) -> T:
    """Run ``work`` in one transaction and return its result.

    Without ``session``: a transaction of its own on ``engine``, retried up to
    ``retries`` times on serialization failures, deadlocks, lock timeouts,
    SQLite's "database is locked" and lost connections; safe because every
    unit carries an idempotency key. With ``session``: inside the host's
    transaction, with no retries, callbacks deferred to the session's commit.
    """
    if session is not None:
        # A savepoint, so a refused operation leaves nothing half-done in the
        # host's transaction (the host may catch the error and commit).
        _sqlite_begin(_connection(session, engine))
        with session.begin_nested():
            tx = Tx(_connection(session, engine), attempt=0)
            result = work(tx)
        if tx._after_commit:
            _defer_to_session(session, list(tx._after_commit))
        return result

    attempt = 0
    while True:
        try:
            with _begin(engine, write) as conn:
                tx = Tx(conn, attempt=attempt)
                result = work(tx)
        except Exception as exc:
            reason = _retry_reason(exc)
            if reason is None or attempt >= retries:
                raise
            attempt += 1
            if stats is not None:
                stats.add(reason)
            log.info("credits: retrying a transaction (%s, attempt %d)", reason, attempt)
            if reason != "conflict":
                time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt)))
            continue
        _fire(tx._after_commit)
        return result
