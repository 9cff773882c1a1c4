"""A database that cannot answer in time is a 503 SERVICE_UNAVAILABLE, never a 500.

- Which driver errors are transient, and under which reason: MariaDB/Galera
  errors built the way PyMySQL builds them from the server's packet (a
  Galera cluster is not part of this suite), PostgreSQL SQLSTATEs as psycopg
  raises them.
- A real lock wait timeout on every engine (another connection holds the
  account row, or SQLite's write lock) with a small retry budget: a 503 with
  `Retry-After: 1`, nothing applied, nothing stored under the key, the same
  key applied once afterwards; metrics count it as `service_unavailable`.
- A server that cannot be reached (a TCP proxy the test cuts): a 503, and
  the same key applies once on a connection that works.
- The 503's `Retry-After` with rate limits on, the CLI's exit status 75,
  `@charge_credits`, and a host `session=` (not retried: the driver's error).
"""

from __future__ import annotations

import logging
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg.errors
import pymysql.err
import pytest
import sqlalchemy as sa
from conftest import ADMIN_SCOPE, SERVICE_SCOPE, Databases, assert_error, make_app, make_token
from flask import Flask, jsonify
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from tcp_proxy import TcpProxy

from callora_credits import charge_credits, current_ledger
from callora_credits.db.unit_of_work import ConnectFailed, _retry_reason, is_retryable
from callora_credits.errors import ServiceUnavailable

BASE = "/api/billing/credits"
U = 10_000_000
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
# Small, so an outage is answered within about a second.
QUICK = {"CREDITS_DB_RETRIES": 2, "CREDITS_DB_RETRY_SECONDS": 0.5}


def bearer(user: str, scopes: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user, scopes=scopes)}"}


# --- classification --------------------------------------------------------------


def mysql_error(errno: int, message: str, statement: str | None = None) -> sa.exc.DBAPIError:
    """The error PyMySQL raises for the server's error packet, as SQLAlchemy
    wraps it (``statement`` is ``None`` for a failed ``COMMIT``)."""
    packet = b"\xff" + struct.pack("<h", errno) + b"#HY000" + message.encode()
    try:
        pymysql.err.raise_mysql_exception(packet)
    except pymysql.err.Error as raised:
        return sa.exc.DBAPIError.instance(
            statement, None, raised, pymysql.err.Error, connection_invalidated=False
        )
    raise AssertionError("PyMySQL raised nothing")


def pg_error(sqlstate: str, message: str) -> sa.exc.DBAPIError:
    cls = psycopg.errors.lookup(sqlstate)
    return sa.exc.DBAPIError.instance("UPDATE credits", None, cls(message), psycopg.Error)


CLASSIFIED = {
    "galera certification failure at COMMIT": (
        mysql_error(
            1213,
            "WSREP detected deadlock/conflict and aborted the transaction. "
            "Try restarting the transaction",
        ),
        "deadlock",
    ),
    "deadlock mid-statement": (
        mysql_error(
            1213,
            "Deadlock found when trying to get lock; try restarting transaction",
            "UPDATE credits SET balance_units = balance_units - 1",
        ),
        "deadlock",
    ),
    "lock wait timeout": (
        mysql_error(1205, "Lock wait timeout exceeded; try restarting transaction", "UPDATE"),
        "lock_timeout",
    ),
    "node not ready": (
        mysql_error(1047, "WSREP has not yet prepared node for application use", "SELECT 1"),
        "unavailable",
    ),
    "node not ready (older Galera)": (
        mysql_error(1047, "Unknown command", "SELECT 1"),
        "unavailable",
    ),
    "non-primary at COMMIT": (
        mysql_error(1180, 'Got error 6 "No such device or address" during COMMIT'),
        "unavailable",
    ),
    "non-primary at COMMIT, named": (
        mysql_error(1180, "Got error 6 during COMMIT: Not connected to Primary Component"),
        "unavailable",
    ),
    "server gone": (mysql_error(2006, "MySQL server has gone away", "SELECT 1"), "disconnect"),
    "connection killed": (mysql_error(1927, "Connection was killed", "SELECT 1"), "disconnect"),
    "pg serialization failure": (pg_error("40001", "could not serialize access"), "serialization"),
    "pg deadlock": (pg_error("40P01", "deadlock detected"), "deadlock"),
    "pg lock_timeout": (
        pg_error("55P03", "canceling statement due to lock timeout"),
        "lock_timeout",
    ),
    "pg standby": (
        pg_error("25006", "cannot execute UPDATE in a read-only transaction"),
        "unavailable",
    ),
    "pg starting up": (pg_error("57P03", "the database system is starting up"), "unavailable"),
    "pg terminated": (
        pg_error("57P01", "terminating connection due to administrator command"),
        "disconnect",
    ),
    "pgbouncer cannot reach the server": (
        pg_error("08P01", "server login has been failing, try again later (server_login_retry)"),
        "unavailable",
    ),
    "sqlite locked": (
        sa.exc.OperationalError("BEGIN IMMEDIATE", None, Exception("database is locked")),
        "locked",
    ),
    "connect refused": (ConnectFailed("Connection refused"), "connect"),
}

NOT_TRANSIENT = {
    "1180 for a full disk": mysql_error(
        1180, 'Got error 28 "No space left on device" during COMMIT'
    ),
    "duplicate key": mysql_error(1062, "Duplicate entry 'x' for key 'PRIMARY'", "INSERT"),
    "no such table": mysql_error(1146, "Table 'test.credits' doesn't exist", "SELECT"),
    "pg protocol violation": pg_error("08P01", "invalid message format"),
    "pg unique violation": pg_error("23505", "duplicate key value violates unique constraint"),
    "pg syntax": pg_error("42601", "syntax error at or near"),
    "sqlite no such table": sa.exc.OperationalError(
        "SELECT", None, Exception("no such table: credits")
    ),
    "not a database error": ValueError("database is locked"),
}


@pytest.mark.parametrize("name", CLASSIFIED)
def test_transient_errors_are_classified(name: str) -> None:
    error, reason = CLASSIFIED[name]
    assert _retry_reason(error) == reason
    assert is_retryable(error)


def test_galera_errors_keep_pymysql_s_own_classes() -> None:
    """The table above holds what PyMySQL raises, not hand-made look-alikes."""
    error, _ = CLASSIFIED["galera certification failure at COMMIT"]
    assert isinstance(error, sa.exc.OperationalError)
    assert isinstance(error.orig, pymysql.err.OperationalError)
    assert error.orig.args[0] == 1213
    assert error.statement is None


@pytest.mark.parametrize("name", NOT_TRANSIENT)
def test_other_errors_are_not_transient(name: str) -> None:
    assert _retry_reason(NOT_TRANSIENT[name]) is None


# --- a real lock wait timeout on every engine ---------------------------------------


def _lock_options(engine_name: str) -> dict[str, Any]:
    """Engine options under which a blocked write gives up within a second."""
    if engine_name == "postgresql":
        connect_args: dict[str, Any] = {"options": "-c lock_timeout=200"}
    elif engine_name == "mysql":
        connect_args = {"init_command": "SET SESSION innodb_lock_wait_timeout = 1"}
    else:
        connect_args = {"timeout": 0.05}
    return {"SQLALCHEMY_ENGINE_OPTIONS": {"connect_args": connect_args}}


@contextmanager
def account_locked(url: str, engine_name: str, user_id: str) -> Iterator[None]:
    """Another connection holds the user's account row (SQLite: the write lock)."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            if engine_name == "sqlite":
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield
                finally:
                    conn.exec_driver_sql("ROLLBACK")
                return
            with conn.begin():
                found = conn.execute(
                    sa.text("SELECT balance_units FROM credits WHERE user_id = :u FOR UPDATE"),
                    {"u": user_id},
                ).scalar_one()
                assert found > 0
                yield
    finally:
        engine.dispose()


def _state(url: str, user_id: str, key: str) -> tuple[int, int, int]:
    """(balance, ledger entries, idempotency records of ``key``), read directly."""
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            balance = conn.execute(
                sa.text("SELECT balance_units FROM credits WHERE user_id = :u"), {"u": user_id}
            ).scalar_one()
            entries = conn.execute(
                sa.text("SELECT COUNT(*) FROM credits_transactions WHERE user_id = :u"),
                {"u": user_id},
            ).scalar_one()
            records = conn.execute(
                sa.text("SELECT COUNT(*) FROM credits_idempotency WHERE idempotency_key = :k"),
                {"k": key},
            ).scalar_one()
    finally:
        engine.dispose()
    return int(balance), int(entries), int(records)


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_a_lock_wait_that_outlasts_the_retries_is_a_503_and_the_key_applies_later(
    databases: Databases, engine_name: str, user_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="callora_credits")
    url = databases.url(engine_name)
    registry = CollectorRegistry()
    app = make_app(url, **QUICK, **_lock_options(engine_name), CREDITS_METRICS_REGISTRY=registry)
    try:
        client = app.test_client()
        service = bearer(f"svc_{uuid.uuid4().hex[:8]}", SERVICE_SCOPE)
        topped = client.post(
            f"{BASE}/topup",
            json={"user_id": user_id, "amount_usdc": "10"},
            headers={**bearer("ops", ADMIN_SCOPE), "Idempotency-Key": uuid.uuid4().hex},
        )
        assert topped.status_code == 201, topped.json
        key = f"charge-{uuid.uuid4().hex}"
        charge = {"user_id": user_id, "amount_usdc": "3"}
        headers = {**service, "Idempotency-Key": key}
        before = _state(url, user_id, key)
        assert before == (10 * U, 1, 0)

        with account_locked(url, engine_name, user_id):
            refused = client.post(f"{BASE}/charge", json=charge, headers=headers)
        body = assert_error(refused, 503, "SERVICE_UNAVAILABLE")
        assert refused.headers["Retry-After"] == "1"
        assert "Idempotent-Replayed" not in refused.headers
        assert body["details"] == []
        # Nothing applied, nothing stored under the key.
        assert _state(url, user_id, key) == before
        # The lock wait timed out for real (MariaDB's lasts the whole budget,
        # so it may not have been retried there).
        reason = "locked" if engine_name == "sqlite" else "lock_timeout"
        gave_up = [r.getMessage() for r in caplog.records if "giving up" in r.getMessage()]
        assert len(gave_up) == 1, gave_up
        assert f"({reason}: " in gave_up[0]
        retried = app.extensions["callora_credits"].stats.counts.get(reason, 0)
        assert _sample(registry, "credits_db_retries_total", reason=reason) == retried
        assert (
            _sample(
                registry,
                "credits_operations_total",
                operation="charge",
                outcome="service_unavailable",
            )
            == 1
        )
        route = "/api/billing/credits/charge"
        assert (
            _sample(
                registry, "credits_http_requests_total", route=route, method="POST", status="503"
            )
            == 1
        )

        # The lock is gone: the same request with the same key applies, once.
        applied = client.post(f"{BASE}/charge", json=charge, headers=headers)
        assert applied.status_code == 201, applied.json
        assert "Idempotent-Replayed" not in applied.headers
        replayed = client.post(f"{BASE}/charge", json=charge, headers=headers)
        assert replayed.headers["Idempotent-Replayed"] == "true"
        assert replayed.get_data() == applied.get_data()
        assert _state(url, user_id, key) == (7 * U, 2, 1)
    finally:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()


def test_the_host_session_gets_the_driver_s_error_unretried(
    databases: Databases, engine_name: str, user_id: str
) -> None:
    url = databases.url(engine_name)
    app = make_app(url, **QUICK, **_lock_options(engine_name))
    try:
        with app.app_context():
            ledger = current_ledger()
            ledger.top_up(user_id, 10 * U)
            db = app.extensions["sqlalchemy"]
            retried = dict(ledger.stats.counts)
            with account_locked(url, engine_name, user_id):
                with pytest.raises(sa.exc.OperationalError) as raised:
                    ledger.charge(user_id, U, session=db.session)
                db.session.rollback()
            assert not isinstance(raised.value, ServiceUnavailable)
            assert is_retryable(raised.value)
            assert ledger.stats.counts == retried  # never retried by the library
            assert ledger.find_by_user_id(user_id).balance_units == 10 * U
            db.session.remove()
    finally:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()


# --- a server that cannot be reached ------------------------------------------------


@contextmanager
def unreachable_app(
    databases: Databases, engine_name: str, tmp_path: Any, **config: Any
) -> Iterator[tuple[Flask, TcpProxy | None]]:
    """An app whose database cannot be reached: SQLite in a folder that does
    not exist, a server behind a TCP proxy that the caller cuts."""
    if engine_name == "sqlite":
        app = make_app(f"sqlite:///{tmp_path / 'no-such-folder' / 'c.sqlite3'}", **QUICK, **config)
        try:
            yield app, None
        finally:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()
        return
    url = make_url(databases.url(engine_name))
    with TcpProxy(url.host or "127.0.0.1", url.port or DEFAULT_PORTS[engine_name]) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port)
        app = make_app(proxied.render_as_string(hide_password=False), **QUICK, **config)
        try:
            yield app, proxy
        finally:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()


def test_an_unreachable_server_is_a_503_and_the_key_applies_once_it_is_back(
    databases: Databases, engine_name: str, user_id: str, tmp_path: Any
) -> None:
    if engine_name == "sqlite":
        pytest.skip("a SQLite file has no server to come back; see the CLI and OpenAPI tests")
    url = databases.url(engine_name)
    admin = bearer("ops", ADMIN_SCOPE)
    key = f"topup-{uuid.uuid4().hex}"
    request = {"user_id": user_id, "amount_usdc": "4"}
    with unreachable_app(databases, engine_name, tmp_path) as (app, proxy):
        assert proxy is not None
        client = app.test_client()
        warm = client.get(BASE, headers=bearer(user_id))  # creates the account
        assert warm.status_code == 200
        proxy.cut()
        refused = client.post(
            f"{BASE}/topup", json=request, headers={**admin, "Idempotency-Key": key}
        )
        assert_error(refused, 503, "SERVICE_UNAVAILABLE")
        assert refused.headers["Retry-After"] == "1"
    assert _state(url, user_id, key) == (0, 0, 0)
    # The database is reachable again (here: the app without the proxy).
    direct = make_app(url, **QUICK)
    try:
        again = direct.test_client().post(
            f"{BASE}/topup", json=request, headers={**admin, "Idempotency-Key": key}
        )
        assert again.status_code == 201, again.json
    finally:
        with direct.app_context():
            direct.extensions["sqlalchemy"].engine.dispose()
    assert _state(url, user_id, key) == (4 * U, 1, 1)


def test_the_503_keeps_retry_after_1_with_rate_limits_on(
    databases: Databases, engine_name: str, user_id: str, tmp_path: Any
) -> None:
    """Flask-Limiter writes Retry-After (the window's seconds left) on every
    response it sees; a 503's stays 1."""
    limits = {"CREDITS_RATE_LIMIT": "100/minute", "CREDITS_RATE_LIMIT_STORAGE_URI": "memory://"}
    with unreachable_app(databases, engine_name, tmp_path, **limits) as (app, proxy):
        client = app.test_client()
        if proxy is not None:
            proxy.cut()
        refused = client.get(BASE, headers={**bearer(user_id), "X-Request-Id": "rl-503"})
        body = assert_error(refused, 503, "SERVICE_UNAVAILABLE")
        assert body["requestId"] == "rl-503"
        assert refused.headers["X-RateLimit-Limit"] == "100"  # the limiter saw it
        assert refused.headers["Retry-After"] == "1"
        assert refused.headers["X-Request-Id"] == "rl-503"
        assert refused.headers["Cache-Control"] == "no-store"


def test_charge_credits_answers_503_and_the_view_does_not_run(
    databases: Databases, engine_name: str, user_id: str, tmp_path: Any
) -> None:
    ran: list[bool] = []
    with unreachable_app(databases, engine_name, tmp_path) as (app, proxy):

        @app.get("/paid")
        @charge_credits("0.5000000")
        def paid() -> Any:
            ran.append(True)
            return jsonify(ok=True)

        if proxy is not None:
            proxy.cut()
        response = app.test_client().get("/paid", headers=bearer(user_id))
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["Retry-After"] == "1"
    assert ran == []


@pytest.mark.parametrize(
    "args",
    [["topup", "cli_user", "1"], ["balance", "cli_user"], ["history", "cli_user"]],
    ids=["topup", "balance", "history"],
)
def test_the_cli_exits_75_with_one_line(
    databases: Databases, engine_name: str, tmp_path: Any, args: list[str]
) -> None:
    with unreachable_app(databases, engine_name, tmp_path) as (app, proxy):
        if proxy is not None:
            proxy.cut()
        result = app.test_cli_runner().invoke(args=["credits", *args])
    assert result.exit_code == 75, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: the database is unavailable (")
    assert "Traceback" not in result.output


def test_the_error_is_never_stored_and_renders_from_its_code() -> None:
    error = ServiceUnavailable(reason="deadlock")
    assert not error.storable
    assert (error.code, error.retry_after, error.reason) == ("SERVICE_UNAVAILABLE", 1, "deadlock")
