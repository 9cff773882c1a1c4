"""Hot statements behave exactly as through Connection.execute.

The hot statements of ``store.py`` may be sent on the DBAPI cursor (see
``callora_credits/db/prepared.py``). Whatever path they take, a host must not
be able to tell: each test here runs a hot statement the library's way and
compares what happens with ``Connection.execute`` running the same statement,
or checks what SQLAlchemy is known to do (log, hide, translate, invalidate).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from sqlalchemy import event, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, StatementError

from callora_credits import current_ledger
from callora_credits.db import grant_rows, key_rows, models, store
from callora_credits.db.prepared import PreparedStatement

NOW = datetime(2026, 1, 1, 12, 30, 15, 123456)


@pytest.fixture
def engine(app: Flask) -> Engine:
    with app.app_context():
        current_ledger()
        engine: Engine = app.extensions["sqlalchemy"].engine
        return engine


def engine_of(app: Flask) -> Engine:
    with app.app_context():
        engine: Engine = app.extensions["sqlalchemy"].engine
        return engine


def idempotency_values(key_hash: str, user_id: str = "someone") -> dict[str, object]:
    return {
        "key_hash": key_hash,
        "user_id": user_id,
        "actor_id": "",
        "method": "CALL",
        "path": "test",
        "idempotency_key": key_hash,
        "fingerprint": "f",
        "status_code": 201,
        "response_body": '{"secret":"response body"}',
        "created_at": NOW,
        "expires_at": NOW,
    }


def attempt(engine: Engine, call: Callable[[Connection], Any]) -> tuple[Any, ...]:
    """What ``call`` did in a transaction of its own (rolled back), comparably."""
    with engine.connect() as conn:
        trans = conn.begin()
        try:
            result = call(conn)
        except Exception as exc:
            return (
                "raised",
                type(exc),
                str(exc),
                getattr(exc, "statement", None),
                getattr(exc, "params", None),
                getattr(exc, "connection_invalidated", None),
            )
        finally:
            if trans.is_active:
                trans.rollback()
    return ("returned", None if result is None else tuple(result))


# --- the cursor call is taken, and sends what Connection.execute would ------------------


def test_the_fast_path_stays_off_connection_execute(engine, user_id, monkeypatch):
    calls: list[object] = []
    execute = Connection.execute

    def spy(self, statement, *args, **kwargs):
        calls.append(statement)
        return execute(self, statement, *args, **kwargs)

    monkeypatch.setattr(Connection, "execute", spy)
    with engine.connect() as conn, conn.begin():
        store.balance_row(conn, user_id)
    assert calls == []


def test_rows_have_names_and_engine_types(engine, user_id):
    with engine.connect() as conn, conn.begin():
        store.insert_account_if_missing(conn, user_id, NOW)
        row = store.balance_row(conn, user_id)
        reference = conn.execute(store._BALANCE_ROW.clause, {"p_user_id": user_id, "p_now": NOW})
        assert row == tuple(reference.one())
    assert row.user_id == user_id
    assert int(row.balance_units) == 0
    assert int(row.held_units) == 0
    # SQLite hands back text: the column type's result processing still applies.
    assert row.created_at == NOW
    assert isinstance(row.updated_at, datetime)


# --- listeners ----------------------------------------------------------------------------


@pytest.mark.parametrize("listen_on", ["engine", "Engine class"])
def test_a_listener_sees_every_hot_statement(engine, listen_on, user_id):
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    target = engine if listen_on == "engine" else Engine
    event.listen(target, "before_cursor_execute", before)
    try:
        with engine.connect() as conn, conn.begin():
            store.insert_account_if_missing(conn, user_id, NOW)
            store.balance_row(conn, user_id)
    finally:
        event.remove(target, "before_cursor_execute", before)
    assert seen[-1] == store._BALANCE_ROW.sql(engine.dialect)


def test_a_handle_error_listener_sees_hot_statement_errors(engine, user_id):
    handled: list[object] = []

    def on_error(context):
        handled.append(context.original_exception)

    event.listen(engine, "handle_error", on_error)
    try:
        with engine.connect() as conn, conn.begin():
            key_rows.insert_idempotency(conn, idempotency_values(user_id))
            with pytest.raises(IntegrityError):
                key_rows.insert_idempotency(conn, idempotency_values(user_id))
    finally:
        event.remove(engine, "handle_error", on_error)
    assert len(handled) == 1


# --- statement logging (echo) -------------------------------------------------------------


@pytest.mark.parametrize("logging_on", ["SQLALCHEMY_ECHO", "sqlalchemy.engine at INFO"])
def test_the_engine_log_shows_every_hot_statement(host, caplog, logging_on, user_id, monkeypatch):
    if logging_on == "SQLALCHEMY_ECHO":
        app = host(SQLALCHEMY_ECHO=True)
    else:
        caplog.set_level(logging.INFO, logger="sqlalchemy.engine")
        app = host()
    ran: list[str] = []
    first, rowcount = PreparedStatement.first, PreparedStatement.rowcount

    def spy_first(self, conn, params):
        ran.append(self.sql(conn.dialect))
        return first(self, conn, params)

    def spy_rowcount(self, conn, params):
        ran.append(self.sql(conn.dialect))
        return rowcount(self, conn, params)

    monkeypatch.setattr(PreparedStatement, "first", spy_first)
    monkeypatch.setattr(PreparedStatement, "rowcount", spy_rowcount)
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10, idempotency_key=f"top-up-{user_id}")
        ledger.charge(user_id, 3, idempotency_key=f"charge-{user_id}")
        ledger.get_or_create_by_user_id(user_id)
    caplog.set_level(logging.WARNING, logger="sqlalchemy.engine")  # nothing more to log

    logged = [r.getMessage() for r in caplog.records if r.name.startswith("sqlalchemy.engine")]
    assert len(ran) >= 5, ran
    for sql in ran:
        assert logged.count(sql) >= ran.count(sql), sql
    # Each statement is followed by its parameters, as SQLAlchemy logs them.
    read = len(logged) - 1 - logged[::-1].index(store._BALANCE_ROW.sql(engine_of(app).dialect))
    assert repr(user_id) in logged[read + 1]


# --- hide_parameters ----------------------------------------------------------------------


def test_hide_parameters_hides_them_in_hot_statement_errors(host, user_id):
    engine = engine_of(host(SQLALCHEMY_ENGINE_OPTIONS={"hide_parameters": True}))
    # The database names the duplicate key in its own message; the rest is hidden.
    values = idempotency_values(f"key-{uuid.uuid4().hex}", user_id)
    with engine.begin() as conn:
        key_rows.insert_idempotency(conn, values)

    hot = attempt(engine, lambda conn: key_rows.insert_idempotency(conn, values))
    reference = attempt(
        engine, lambda conn: conn.execute(key_rows._INSERT_IDEMPOTENCY.clause, values)
    )
    assert hot == reference
    assert issubclass(hot[1], IntegrityError)
    message = hot[2]
    assert "[SQL parameters hidden due to hide_parameters=True]" in message
    assert user_id not in message
    assert "response body" not in message


# --- schema_translate_map (and any execution option the cursor call cannot honour) --------


class Tenant:
    """A second schema holding the library's (empty) tables."""

    def __init__(self, engine_name: str, name: str, sqlite_file: str) -> None:
        self.engine_name = engine_name
        self.name = name
        self.sqlite_file = sqlite_file

    def reach_from(self, engine: Engine) -> None:
        """Make the schema visible to ``engine`` (SQLite attaches it per connection)."""
        if self.engine_name != "sqlite":
            return

        @event.listens_for(engine, "connect")
        def attach(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.execute(f"ATTACH DATABASE '{self.sqlite_file}' AS {self.name}")


@pytest.fixture
def tenant(engine: Engine, engine_name: str, tmp_path) -> Iterator[Tenant]:
    name = "tenant" if engine_name == "sqlite" else f"tenant_{uuid.uuid4().hex[:10]}"
    tenant = Tenant(engine_name, name, str(tmp_path / "tenant.sqlite3"))
    admin = sa.create_engine(engine.url, poolclass=sa.pool.NullPool)
    tenant.reach_from(admin)
    with admin.begin() as conn:
        if engine_name == "postgresql":
            conn.exec_driver_sql(f"CREATE SCHEMA {name}")
        elif engine_name == "mysql":
            conn.exec_driver_sql(
                f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
            )
    models.metadata.create_all(admin.execution_options(schema_translate_map={None: name}))
    try:
        yield tenant
    finally:
        with admin.begin() as conn:
            if engine_name == "postgresql":
                conn.exec_driver_sql(f"DROP SCHEMA {name} CASCADE")
            elif engine_name == "mysql":
                conn.exec_driver_sql(f"DROP DATABASE {name}")
        admin.dispose()


@pytest.mark.parametrize("set_on", ["engine", "connection"])
def test_schema_translate_map_applies_to_hot_statements(host, engine, tenant, set_on, user_id):
    translate = {None: tenant.name}
    if set_on == "engine":
        options = {"execution_options": {"schema_translate_map": translate}}
        tenant_engine = engine_of(host(SQLALCHEMY_ENGINE_OPTIONS=options))
    else:
        tenant_engine = engine_of(host())
    tenant.reach_from(tenant_engine)

    key = f"key-{user_id}"
    with tenant_engine.connect() as conn:
        if set_on == "connection":
            conn.execution_options(schema_translate_map=translate)
        with conn.begin():
            assert store.credit(conn, user_id, 10, 10**12, NOW) == (10, 1, 0)
            assert store.debit(conn, user_id, 3, NOW) == (7, 2)
            key_rows.insert_idempotency(conn, idempotency_values(key, user_id))
            assert key_rows.find_idempotency(conn, key) is not None
            row = store.balance_row(conn, user_id)
            assert row is not None
            assert int(row.balance_units) == 7
        # A statement that is never hot: it always honoured the map.
        with conn.begin():
            balance = select(store.accounts.c.balance_units).where(
                store.accounts.c.user_id == user_id
            )
            assert conn.execute(balance).scalar() == 7

    with engine.connect() as untranslated:
        account = select(store.accounts.c.user_id).where(store.accounts.c.user_id == user_id)
        assert untranslated.execute(account).first() is None
        claimed = select(store.idempotency.c.key_hash).where(store.idempotency.c.key_hash == key)
        assert untranslated.execute(claimed).first() is None


# --- interrupts: exit exceptions invalidate the connection ---------------------------------


class Interrupt(BaseException):
    """Like gevent's ``Timeout`` or ``GreenletExit``: not an ``Exception``."""


class FailingCursor:
    """A DBAPI cursor that fails inside ``execute`` or ``fetchone``.

    ``interrupt-execute`` raises :class:`Interrupt` after the statement ran,
    ``interrupt-fetch`` instead of fetching; ``lost`` closes the connection
    under the cursor first, so the driver raises its own error.
    """

    def __init__(self, cursor: Any, connection: Any, failure: str) -> None:
        self._cursor = cursor
        self._connection = connection
        self._failure = failure

    def execute(self, *args: Any) -> Any:
        if self._failure == "lost":
            self._connection.close()
        result = self._cursor.execute(*args)
        if self._failure == "interrupt-execute":
            raise Interrupt()
        return result

    def fetchone(self) -> Any:
        if self._failure == "interrupt-fetch":
            raise Interrupt()
        return self._cursor.fetchone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class FailingConnection:
    """A DBAPI connection whose cursors are :class:`FailingCursor`."""

    def __init__(self, connection: Any, failure: str) -> None:
        self.__dict__.update(_connection=connection, _failure=failure)

    def cursor(self, *args: Any, **kwargs: Any) -> FailingCursor:
        cursor = self._connection.cursor(*args, **kwargs)
        return FailingCursor(cursor, self._connection, self._failure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._connection, name, value)


def read_failing(via: str, failure: str, user_id: str) -> Callable[[Connection], Any]:
    """A balance read on ``conn`` whose cursor fails with ``failure``."""

    def read(conn: Connection) -> Any:
        fairy = conn.connection
        fairy.dbapi_connection = FailingConnection(fairy.dbapi_connection, failure)
        if via == "library":
            return store.balance_row(conn, user_id)
        params = {"p_user_id": user_id, "p_now": NOW}
        return conn.execute(store._BALANCE_ROW.clause, params).first()

    return read


@pytest.mark.parametrize("during", ["execute", "fetch"])
@pytest.mark.parametrize("via", ["library", "Connection.execute"])
def test_an_interrupt_invalidates_the_connection(host, via, during, user_id):
    engine = engine_of(host(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0}))
    with engine.connect() as conn:
        dbapi_connection = conn.connection.dbapi_connection

    read = read_failing(via, f"interrupt-{during}", user_id)
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection is dbapi_connection  # the pool's only one
        with pytest.raises(Interrupt), conn.begin():
            read(conn)
        assert conn.invalidated
    # The interrupted connection never goes back to the pool.
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection is not dbapi_connection
        assert store.balance_row(conn, user_id) is None


@pytest.mark.parametrize("via", ["library", "Connection.execute"])
def test_a_lost_connection_is_invalidated_with_the_pool(host, via, user_id):
    engine = engine_of(host(SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 2, "max_overflow": 0}))
    with engine.connect() as idle, engine.connect() as conn:
        idle_dbapi_connection = idle.connection.dbapi_connection
        lost_dbapi_connection = conn.connection.dbapi_connection
    assert idle_dbapi_connection is not lost_dbapi_connection

    with engine.connect() as conn:
        if conn.connection.dbapi_connection is not lost_dbapi_connection:
            pytest.fail("the pool handed out the other connection first")
        with pytest.raises(DBAPIError) as raised, conn.begin():
            read_failing(via, "lost", user_id)(conn)
        assert raised.value.connection_invalidated
        assert conn.invalidated
    # As SQLAlchemy does on a disconnect: the pool's older connections are
    # replaced at their next checkout, since the server may have gone away.
    with engine.connect() as first, engine.connect() as second:
        handed_out = {first.connection.dbapi_connection, second.connection.dbapi_connection}
    assert not handed_out & {idle_dbapi_connection, lost_dbapi_connection}


# --- errors -------------------------------------------------------------------------------


def read_balance(params: dict[str, Any], hot: bool) -> Callable[[Connection], Any]:
    def call(conn: Connection) -> Any:
        if hot:
            return store._BALANCE_ROW.first(conn, params)
        return conn.execute(store._BALANCE_ROW.clause, params).first()

    return call


def read_grants(params: dict[str, Any], hot: bool) -> Callable[[Connection], Any]:
    def call(conn: Connection) -> Any:
        if hot:
            return grant_rows._SPENDABLE_PLAIN.all(conn, params)
        return conn.execute(grant_rows._SPENDABLE_PLAIN.clause, params).all()

    return call


def debit_with(extra: dict[str, Any], hot: bool) -> Callable[[Connection], Any]:
    user_id = f"user_{uuid.uuid4().hex[:12]}"
    params = {"p_user_id": user_id, "p_units": 0, "p_now": NOW, **extra}

    def call(conn: Connection) -> Any:
        store.insert_account_if_missing(conn, user_id, NOW)
        if hot:
            matched = store._DEBIT_COUNTED.rowcount(conn, params)
        else:
            matched = conn.execute(store._DEBIT_COUNTED.clause, params).rowcount
        created = select(store.accounts.c.created_at).where(store.accounts.c.user_id == user_id)
        return matched, conn.execute(created).scalar()

    return call


BAD_PARAMETERS: dict[str, Callable[[bool], Callable[[Connection], Any]]] = {
    "missing": lambda hot: read_balance({}, hot),
    "not a datetime": lambda hot: read_grants({"p_user_id": "someone", "p_now": "?"}, hot),
    # Connection.execute adds a parameter named after a column to an UPDATE's SET.
    "a column's name": lambda hot: debit_with({"created_at": datetime(2030, 1, 1)}, hot),
}


@pytest.mark.parametrize("case", BAD_PARAMETERS)
def test_bind_errors_are_those_of_connection_execute(engine, case):
    hot = attempt(engine, BAD_PARAMETERS[case](True))
    reference = attempt(engine, BAD_PARAMETERS[case](False))
    assert hot == reference
    if case == "missing":
        assert hot[1] is StatementError
        assert "A value is required for bind parameter 'p_user_id'" in hot[2]


def test_database_errors_are_those_of_connection_execute(engine, user_id):
    values = idempotency_values(f"key-{user_id}", user_id)
    with engine.begin() as conn:
        key_rows.insert_idempotency(conn, values)

    hot = attempt(engine, lambda conn: key_rows.insert_idempotency(conn, values))
    reference = attempt(
        engine, lambda conn: conn.execute(key_rows._INSERT_IDEMPOTENCY.clause, values)
    )
    assert hot == reference
    assert issubclass(hot[1], IntegrityError)
    assert hot[3] == key_rows._INSERT_IDEMPOTENCY.sql(engine.dialect)  # the statement shown
    assert user_id in hot[2]  # and its parameters
    assert hot[5] is False  # not taken for a lost connection


def test_statements_with_per_execution_parts_are_refused(engine):
    expanding = PreparedStatement(
        select(store.accounts.c.user_id).where(store.accounts.c.user_id.in_(["a", "b"]))
    )
    with engine.connect() as conn, pytest.raises(ValueError, match="bound by the caller"):
        expanding.first(conn, {})

    # A listener sends statements through Connection.execute; the refusal stays.
    def listener(*args: object) -> None:
        pass

    event.listen(engine, "before_cursor_execute", listener)
    try:
        with engine.connect() as conn, pytest.raises(ValueError, match="bound by the caller"):
            expanding.first(conn, {})
    finally:
        event.remove(engine, "before_cursor_execute", listener)
