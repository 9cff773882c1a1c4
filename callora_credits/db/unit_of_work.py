"""The one place that opens a database transaction and retries it.

Each operation of the ledger is a function of a :class:`Tx`. :func:`run`
executes it in its own transaction on the host's engine (never touching the
host's session), retrying transient failures a bounded number of times with
jittered backoff, or inside the host's session when one is given.
Callbacks registered with :meth:`Tx.after_commit` (signals) run only once the
transaction has committed: with a host session, once the host's outermost
transaction has.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, SessionTransaction, scoped_session

from ..errors import ServiceUnavailable

__all__ = ["HostSession", "RetryStats", "RetryTransaction", "Tx", "is_retryable", "run"]

#: What ``session=`` accepts: a ``Session``, or a ``scoped_session`` such as
#: Flask-SQLAlchemy's ``db.session``.
HostSession = Session | scoped_session[Any]

log = logging.getLogger("callora_credits")

T = TypeVar("T")

# PostgreSQL SQLSTATEs of a transient failure, by reason.
_PG_REASONS = {
    "40001": "serialization",  # serialization_failure
    "40P01": "deadlock",  # deadlock_detected
    "55P03": "lock_timeout",  # lock_not_available (lock_timeout, NOWAIT)
    "25006": "unavailable",  # read_only_sql_transaction: a standby, mid-failover
    "57P01": "disconnect",  # admin_shutdown
    "57P02": "disconnect",  # crash_shutdown
    "57P03": "unavailable",  # cannot_connect_now (starting up, shutting down)
}
# MariaDB/MySQL error numbers of a transient failure, by reason. 1213 is also
# how Galera reports a certification failure, at COMMIT or mid-statement (a
# brute-force abort); 1047 is a Galera node outside the primary component
# ("WSREP has not yet prepared node for application use").
_MYSQL_REASONS = {
    1213: "deadlock",  # ER_LOCK_DEADLOCK
    1205: "lock_timeout",  # ER_LOCK_WAIT_TIMEOUT
    1047: "unavailable",  # ER_UNKNOWN_COM_ERROR, as Galera sends it
    2006: "disconnect",  # CR_SERVER_GONE_ERROR
    2013: "disconnect",  # CR_SERVER_LOST
    1927: "disconnect",  # ER_CONNECTION_KILLED
}
# MariaDB 1180 ("Got error N during COMMIT") is transient only when Galera
# refused the commit: the node left the primary component.
_MYSQL_COMMIT_FAILED = 1180
_WSREP_WORDS = ("wsrep", "primary component", "no such device or address")


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

    def after_commit(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` once the transaction has committed; never on rollback."""
        self._after_commit.append(callback)


class RetryStats:
    """Counts retries per reason; read by tests and benchmarks.

    ``listeners`` are called with the reason of each retry (metrics count them).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.listeners: list[Callable[[str], object]] = []

    def add(self, reason: str) -> None:
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
        for listener in self.listeners:
            listener(reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _retry_reason(exc: BaseException) -> str | None:
    """Why running the unit again may succeed, or ``None`` if it may not."""
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
    text = str(orig).lower()
    if args and isinstance(args[0], int):
        reason = _MYSQL_REASONS.get(args[0])
        if reason is not None:
            return reason
        if args[0] == _MYSQL_COMMIT_FAILED:
            if "deadlock" in text:
                return "deadlock"
            if any(word in text for word in _WSREP_WORDS):
                return "unavailable"
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(state, str) and state in _PG_REASONS:
        return _PG_REASONS[state]
    if state == "08P01" and "server login has been failing" in text:
        # PgBouncer in front of a server it cannot reach (server_login_retry).
        return "unavailable"
    if "database is locked" in text or "database table is locked" in text:
        return "locked"
    return None


def _first_line(exc: BaseException) -> str:
    """The driver's own message, one line, for a log."""
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    lines = str(cause).strip().splitlines() or [type(cause).__name__]
    return lines[0][:300]


def is_retryable(exc: BaseException) -> bool:
    """Whether running the same unit again may succeed (a transient failure)."""
    return _retry_reason(exc) is not None


class ConnectFailed(Exception):
    """The database could not be reached to open a connection (retried).

    Once the retries are spent, :func:`run` raises
    :class:`~callora_credits.errors.ServiceUnavailable` from it.
    """


def _connect(engine: Engine) -> Connection:
    try:
        return engine.connect()
    except DBAPIError as exc:
        # Nothing ran yet, so trying again is always safe.
        raise ConnectFailed(str(exc.orig)) from exc


#: Galera causal reads: the session's ``wsrep_sync_wait`` is kept in a user
#: variable, set to 1 (reads wait until the node has applied every write
#: committed anywhere before them), and put back once the transaction is over.
_SYNC_WAIT_ON = "SET @callora_sync_wait = @@SESSION.wsrep_sync_wait, SESSION wsrep_sync_wait = 1"
_SYNC_WAIT_BACK = "SET SESSION wsrep_sync_wait = @callora_sync_wait"


def _restore_sync_wait(conn: Connection) -> None:
    """Put the session's ``wsrep_sync_wait`` back; a connection that cannot be
    put back is invalidated, so no pooled connection keeps the changed value."""
    try:
        conn.exec_driver_sql(_SYNC_WAIT_BACK)
        conn.rollback()  # ends the transaction the statement began
    except Exception:
        log.warning("credits: could not restore wsrep_sync_wait; discarding the connection")
        conn.invalidate()


@contextmanager
def _causal(conn: Connection) -> Iterator[Connection]:
    """A read transaction whose statements wait for the cluster (``wsrep_sync_wait``)."""
    try:
        with conn.begin():
            conn.exec_driver_sql(_SYNC_WAIT_ON)
            yield conn
    finally:
        _restore_sync_wait(conn)


@contextmanager
def _begin(engine: Engine, write: bool, causal: bool = False) -> Iterator[Connection]:
    with _connect(engine) as conn:
        if causal and conn.dialect.name in ("mysql", "mariadb"):
            with _causal(conn):
                yield conn
        elif write and conn.dialect.name == "sqlite":
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


class _Deferred:
    """Callbacks of ``session=`` operations waiting for the host's commit.

    Kept in the session's own ``info``, keyed by the transaction (the host's
    root transaction or one of its savepoints) whose rollback would undo the
    operation: a released savepoint hands its callbacks to the transaction
    around it, a rolled-back one drops them, and only the end of the root
    transaction fires them.
    """

    __slots__ = ("committed", "pending")

    def __init__(self) -> None:
        self.pending: dict[SessionTransaction, list[Callable[[], object]]] = {}
        self.committed: set[SessionTransaction] = set()


def _innermost(session: Session) -> SessionTransaction | None:
    return session.get_nested_transaction() or session.get_transaction()


def _on_commit(session: Session) -> None:
    # SQLAlchemy sends after_commit for a released savepoint as well as for
    # the real COMMIT, and says nothing about which: the transaction still
    # current while it runs is the one that committed.
    deferred = session.info.get(_PENDING)
    committing = _innermost(session)
    if isinstance(deferred, _Deferred) and committing is not None:
        deferred.committed.add(committing)


def _on_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    deferred = session.info.get(_PENDING)
    if not isinstance(deferred, _Deferred):
        return
    committed = transaction in deferred.committed
    deferred.committed.discard(transaction)
    callbacks = deferred.pending.pop(transaction, [])
    if transaction.parent is not None:
        # A released savepoint's work is now the enclosing transaction's, to
        # commit or roll back. (A non-savepoint inner transaction, as a flush
        # opens, cannot roll back alone: its rollback ends its parent too.)
        if callbacks and (committed or not transaction.nested):
            deferred.pending.setdefault(transaction.parent, []).extend(callbacks)
        return
    # The host's transaction is over. This listener cannot remove itself while
    # SQLAlchemy runs it; it stays, inert, for the next transaction of this
    # session and goes away with the session.
    del session.info[_PENDING]
    if event.contains(session, "after_commit", _on_commit):
        event.remove(session, "after_commit", _on_commit)
    if committed:
        _fire(callbacks)


def _defer_to_session(session: Session, callbacks: list[Callable[[], object]]) -> None:
    """Fire ``callbacks`` once, when the host's whole transaction commits.

    They are dropped if the host rolls back, or rolls back a savepoint that
    contained the operation.
    """
    owner = _innermost(session)
    if owner is None:  # the operation has just run in it: never, short of a bug
        raise RuntimeError("callora_credits: the host session has no transaction")
    deferred = session.info.get(_PENDING)
    if not isinstance(deferred, _Deferred):
        deferred = session.info[_PENDING] = _Deferred()
    deferred.pending.setdefault(owner, []).extend(callbacks)
    # Listeners on this Session object only: on a scoped_session they would
    # land on its class, and every session of the process would run them.
    if not event.contains(session, "after_transaction_end", _on_transaction_end):
        event.listen(session, "after_transaction_end", _on_transaction_end)
    if not event.contains(session, "after_commit", _on_commit):
        event.listen(session, "after_commit", _on_commit)


def _actual_session(session: HostSession) -> Session:
    """The session itself: Flask-SQLAlchemy's ``db.session`` is a registry."""
    if isinstance(session, scoped_session):
        current: Session = session()
        return current
    return session


def run(
    work: Callable[[Tx], T],
    *,
    engine: Engine,
    retries: int,
    retry_seconds: float = 5.0,
    session: HostSession | None = None,
    stats: RetryStats | None = None,
    write: bool = True,
    causal: bool = False,
) -> T:
    """Run ``work`` in one transaction and return its result.

    Without ``session``: a transaction of its own on ``engine``, retried with
    jittered exponential backoff on serialization failures, deadlocks and
    Galera certification failures (at ``COMMIT`` too), lock timeouts, a
    Galera node outside the primary component, SQLite's "database is locked",
    lost connections and connections that cannot be opened, while both
    bounds hold: at most ``retries`` retries and ``retry_seconds`` of
    retrying. Safe because every unit carries an idempotency key. When a
    transient failure outlasts them, raises
    :class:`~callora_credits.errors.ServiceUnavailable` from the last
    failure; any other error is raised as it is.

    ``causal`` (a read on MariaDB/MySQL without ``session``): the transaction's
    statements run with ``wsrep_sync_wait = 1``, so on a Galera node they see
    every write committed on any node before them; the session's previous
    value is put back before the connection returns to the pool.

    With ``session`` (a ``Session`` or a ``scoped_session`` such as
    Flask-SQLAlchemy's ``db.session``): inside the host's transaction, with no
    retries, and the driver's errors pass through unchanged (the host owns the
    transaction, and decides whether to run it again); callbacks run once,
    when the host's outermost transaction commits, and never if it (or a
    savepoint around the call) rolls back.
    """
    if session is not None:
        host = _actual_session(session)
        # A savepoint, so a refused operation leaves nothing half-done in the
        # host's transaction (the host may catch the error and commit).
        _sqlite_begin(_connection(host, engine))
        with host.begin_nested():
            tx = Tx(_connection(host, engine), attempt=0)
            result = work(tx)
        if tx._after_commit:
            _defer_to_session(host, list(tx._after_commit))
        return result

    attempt = 0
    started = time.monotonic()
    deadline = started + retry_seconds
    while True:
        try:
            with _begin(engine, write, causal) as conn:
                tx = Tx(conn, attempt=attempt)
                result = work(tx)
        except Exception as exc:
            reason = _retry_reason(exc)
            if reason is None:
                raise
            left = deadline - time.monotonic()
            if attempt >= retries or left <= 0:
                log.warning(
                    "credits: giving up on a transaction after %d attempts in %.2fs (%s: %s)",
                    attempt + 1,
                    time.monotonic() - started,
                    reason,
                    _first_line(exc),
                )
                raise ServiceUnavailable(reason=reason) from exc
            attempt += 1
            if stats is not None:
                stats.add(reason)
            if reason == "conflict":
                # Routine, not trouble: every duplicate request ends here on
                # its way to the replay, so INFO would cry wolf.
                log.debug(
                    "credits: a unique key was already taken (an idempotency key claimed "
                    "by an earlier or concurrent request, or an account a concurrent first "
                    "credit created); running again to replay or build on that committed "
                    "row (attempt %d)",
                    attempt,
                )
                continue
            log.info("credits: retrying a transaction (%s, attempt %d)", reason, attempt)
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2**attempt, left)))
            continue
        _fire(tx._after_commit)
        return result
