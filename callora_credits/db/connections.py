"""What the library asks of the connections of the engine it runs on.

psycopg 3 prepares a statement on the server once a connection has run it
``prepare_threshold`` times (5 by default), under a name it keeps per
connection (``_pg3_0``, ``_pg3_1``, ...). Behind a pooler in transaction mode
(PgBouncer's ``pool_mode = transaction``) the next transaction of that client
connection may run on another server connection: the statement is missing
there (``prepared statement "_pg3_6" does not exist``), the name is taken by
another client's statement (``already exists``, ``bind message supplies 11
parameters, but prepared statement "_pg3_0" requires 4``), or, worse, a
statement of the same name and parameter count runs in its place, silently.
Passing ``prepare=False`` is not enough: ``executemany`` prepares regardless,
unless the connection's ``prepare_threshold`` is ``None``.

So, unless ``CREDITS_PG_PREPARED_STATEMENTS`` is on, :func:`configure_engine`
turns server-side prepares off on every psycopg 3 connection of the engine:
a ``connect`` listener on new connections and, when the pool already holds
connections made before it, a ``checkout`` listener for those. Every
statement the library sends (through ``Connection.execute`` or on the
DBAPI cursor, :mod:`callora_credits.db.prepared`) then goes as a plain
extended-protocol query with an unnamed statement, which any pooler forwards
whole.

The engine is the host's (Flask-SQLAlchemy's, for the ``CREDITS_BIND_KEY``
database): the setting applies to the host's own statements on it as well.
psycopg2 never prepares on the server, and other drivers are left as they are.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["configure_engine", "prepares_on_server"]


def prepares_on_server(engine: Engine) -> bool:
    """Whether the engine's driver prepares statements on the server on its own
    (psycopg 3, synchronous or not)."""
    dialect = engine.dialect
    return dialect.name == "postgresql" and dialect.driver in ("psycopg", "psycopg_async")


def configure_engine(engine: Engine, *, prepared_statements: bool) -> None:
    """Keep ``engine``'s connections from preparing statements on the server,
    unless ``prepared_statements`` (``CREDITS_PG_PREPARED_STATEMENTS``) is on.

    Idempotent: each listener is registered on the engine once, whoever calls.
    With ``prepared_statements`` on, nothing is registered and the driver's
    own behaviour (or the host's ``prepare_threshold``) stands.
    """
    if prepared_statements or not prepares_on_server(engine):
        return
    if not event.contains(engine, "connect", _unprepared_on_connect):
        event.listen(engine, "connect", _unprepared_on_connect)
    if _has_connections(engine) and not event.contains(
        engine, "checkout", _unprepared_on_checkout
    ):
        event.listen(engine, "checkout", _unprepared_on_checkout)


def _has_connections(engine: Engine) -> bool:
    """Whether the pool may hold a connection made before the ``connect``
    listener was there (one made later always passed through it)."""
    pool: Any = engine.pool
    try:
        return bool(pool.checkedin() or pool.checkedout())
    except (AttributeError, NotImplementedError):
        # A pool without counts (StaticPool, SingletonThreadPool, a custom
        # one): look at each checkout, which costs an attribute read.
        return type(pool).__name__ != "NullPool"


def _unprepare(dbapi_connection: Any) -> None:
    # The async adapter keeps psycopg's connection as ``_connection``.
    target = getattr(dbapi_connection, "_connection", dbapi_connection)
    if getattr(target, "prepare_threshold", None) is not None:
        target.prepare_threshold = None


def _unprepared_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    _unprepare(dbapi_connection)


def _unprepared_on_checkout(
    dbapi_connection: Any, connection_record: Any, connection_proxy: Any
) -> None:
    _unprepare(dbapi_connection)
