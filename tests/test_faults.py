"""Faults under load: the ledger stays exact and no retry applies twice.

Each test runs the stress harness (see tests/test_stress.py) through gunicorn
while injecting one fault, on PostgreSQL and MariaDB, without ever stopping
the shared servers:

- the test database's connections terminated over and over
  (``pg_terminate_backend`` / MariaDB ``KILL``);
- a gunicorn worker killed with SIGKILL while requests are in flight;
- the database unreachable for about a second, through a TCP proxy the test
  runs between the app and the server (every connection reset, new ones
  refused), then back; once with the library's retry budget (5 s, so
  requests wait it out) and once with a budget shorter than the outage (so
  requests during it are answered 503 ``SERVICE_UNAVAILABLE``).

The three also run in turn on PostgreSQL through a PgBouncer in transaction
pooling mode, the outage proxy between the bouncer and the server.

A last test provokes each transient error the retry loop handles for real on its engine
(a deadlock, a serialization failure, a lock wait timeout, a terminated
connection, SQLite's "database is locked") and shows the unit of work retries
exactly those, and not a constraint violation.

Clients retry a connection error, a timeout, a 5xx (a 503
``SERVICE_UNAVAILABLE`` after its ``Retry-After``) or a 409
``IDEMPOTENCY_IN_PROGRESS`` with the same key and body. Every run must end
with every invariant of ``stress.harness.verify``, every request answered
(no 5xx left unretried), a 5xx other than that 503 only where its traceback
is the injected fault, and no request past the client timeout (15 s).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.pool import NullPool

from callora_credits.db.unit_of_work import RetryStats, Tx
from callora_credits.db.unit_of_work import run as run_unit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for `stress`, the harness beside the package

from stress.harness import (  # noqa: E402
    FreshDatabases,
    Report,
    RunConfig,
    admin_url,
    run,
)

pytestmark = pytest.mark.slow

SECONDS = 9
REQUEST_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def fault_databases() -> Iterator[FreshDatabases]:
    databases = FreshDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture
def server_engine(engine_name: str) -> str:
    if engine_name == "sqlite":
        pytest.skip(
            "these faults need a database server: a SQLite file has no connections to "
            "terminate or to proxy, and no server to lose"
        )
    return engine_name


def _run(
    engine: str,
    fault: str,
    databases: FreshDatabases,
    artifacts: Path,
    db_retry_seconds: float | None = None,
) -> Report:
    report = run(
        RunConfig(
            engine=engine,
            fault=fault,
            db_retry_seconds=db_retry_seconds,
            seconds=SECONDS,
            clients=2,
            client_threads=3,
            workers=3,
            worker_threads=4,
            cold_users=100,
            request_timeout=REQUEST_TIMEOUT,
            database_url=databases.url(engine),
            artifacts=artifacts,
        )
    )
    summary = report.summary()
    print(summary)
    assert report.problems() == [], summary
    assert report.timeouts == 0, summary
    assert report.max_latency < REQUEST_TIMEOUT, summary
    assert sum(report.ops.values()) >= 40, summary
    return report


def test_connections_terminated_mid_load(
    server_engine: str, fault_databases: FreshDatabases, tmp_path: Path
) -> None:
    report = _run(server_engine, "connections", fault_databases, tmp_path)
    summary = report.summary()
    assert report.faults["connections"] >= 5, summary
    assert report.fault_hits["connections"] >= 5, summary
    # The fault reached transactions, and they were retried.
    seen = report.library_retries_logged["disconnect"] + sum(report.client_retries.values())
    assert seen > 0, summary


def test_worker_killed_mid_request(
    server_engine: str, fault_databases: FreshDatabases, tmp_path: Path
) -> None:
    report = _run(server_engine, "workers", fault_databases, tmp_path)
    summary = report.summary()
    assert report.faults["workers"] >= 2, summary
    # Requests were in flight on the killed workers, and clients retried them.
    assert report.client_retries["connection"] > 0, summary
    # gunicorn replaced every killed worker.
    assert report.workers_booted >= 3 + report.fault_hits["workers"], summary


def test_database_briefly_unreachable(
    server_engine: str, fault_databases: FreshDatabases, tmp_path: Path
) -> None:
    report = _run(server_engine, "outage", fault_databases, tmp_path)
    summary = report.summary()
    assert report.faults["outage"] >= 2, summary
    assert report.fault_hits["outage"] > 0, summary  # live connections were cut
    seen = report.library_retries_logged["disconnect"] + sum(report.client_retries.values())
    assert seen > 0, summary


def test_every_fault_through_pgbouncer(fault_databases: FreshDatabases, tmp_path: Path) -> None:
    """PostgreSQL through a PgBouncer in transaction pooling mode (the outage
    proxy between the bouncer and the server): the three faults in turn."""
    from conftest import ENGINES
    from pgbouncer import find_pgbouncer, skip_or_fail_without_pgbouncer

    if "postgresql" not in ENGINES:
        pytest.skip("PgBouncer runs in front of PostgreSQL: CREDITS_TEST_POSTGRES_URL is not set")
    if find_pgbouncer() is None:
        skip_or_fail_without_pgbouncer()
    report = run(
        RunConfig(
            engine="pgbouncer",
            fault="all",
            # A quiet phase, then one of each fault.
            seconds=17,
            phase_seconds=4,
            clients=2,
            client_threads=3,
            workers=3,
            worker_threads=4,
            cold_users=100,
            request_timeout=REQUEST_TIMEOUT,
            database_url=fault_databases.url("pgbouncer"),
            artifacts=tmp_path,
        )
    )
    summary = report.summary()
    print(summary)
    assert report.problems() == [], summary
    assert report.timeouts == 0, summary
    assert report.max_latency < REQUEST_TIMEOUT, summary
    assert sum(report.ops.values()) >= 40, summary
    for fault in ("connections", "workers", "outage"):
        assert report.faults[fault] >= 1, summary


def test_an_outage_longer_than_the_retries_is_answered_503(
    server_engine: str, fault_databases: FreshDatabases, tmp_path: Path
) -> None:
    """With CREDITS_DB_RETRY_SECONDS (0.2 s) well below the outage (1 s),
    requests during it are answered 503 SERVICE_UNAVAILABLE, never a 500;
    clients send them again with the same key after Retry-After, and every
    invariant holds (no 503 applied, nothing applied twice)."""
    report = _run(server_engine, "outage", fault_databases, tmp_path, db_retry_seconds=0.2)
    summary = report.summary()
    assert report.faults["outage"] >= 2, summary
    assert report.unavailable > 0, summary
    assert report.client_retries["service_unavailable"] == report.unavailable, summary
    assert report.server_errors == [], summary


# --- the retry loop against real driver errors -----------------------------------


def _scratch(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS stress_scratch")
        conn.exec_driver_sql("CREATE TABLE stress_scratch (id INTEGER PRIMARY KEY, v INTEGER)")
        conn.exec_driver_sql("INSERT INTO stress_scratch (id, v) VALUES (1, 0), (2, 0)")


def _bump(conn: sa.Connection, row: int) -> None:
    conn.execute(sa.text("UPDATE stress_scratch SET v = v + 1 WHERE id = :id"), {"id": row})


def _deadlock(engine: Engine) -> DBAPIError:
    """Two transactions take two rows in opposite orders; one is the victim."""
    barrier = threading.Barrier(2, timeout=20)
    caught: list[DBAPIError] = []

    def side(first: int, second: int) -> None:
        with engine.connect() as conn:
            try:
                with conn.begin():
                    _bump(conn, first)
                    barrier.wait()
                    _bump(conn, second)
            except DBAPIError as exc:
                caught.append(exc)

    threads = [threading.Thread(target=side, args=order) for order in ((1, 2), (2, 1))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(caught) == 1, caught
    return caught[0]


def _lock_wait_timeout(engine: Engine) -> DBAPIError:
    """MariaDB 1205: waiting longer than innodb_lock_wait_timeout for a row."""
    with engine.connect() as holder, engine.connect() as waiter, holder.begin():
        _bump(holder, 1)
        waiter.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
        waiter.commit()
        with pytest.raises(DBAPIError) as info, waiter.begin():
            _bump(waiter, 1)
    return info.value


def _serialization_failure(engine: Engine) -> DBAPIError:
    """PostgreSQL 40001: a REPEATABLE READ snapshot updates a row changed since."""
    with engine.connect() as reader, engine.connect() as writer:
        reader = reader.execution_options(isolation_level="REPEATABLE READ")
        reader.exec_driver_sql("SELECT v FROM stress_scratch WHERE id = 1").all()
        with writer.begin():
            _bump(writer, 1)
        with pytest.raises(DBAPIError) as info:
            _bump(reader, 1)
        reader.rollback()
    return info.value


def _terminated(engine: Engine) -> DBAPIError:
    """The connection ended by the server (pg_terminate_backend / KILL)."""
    admin = sa.create_engine(
        admin_url(engine.url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        with engine.connect() as victim:
            if engine.dialect.name == "postgresql":
                own = victim.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                statement = f"SELECT pg_terminate_backend({int(own)})"
            else:
                own = victim.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
                statement = f"KILL {int(own)}"
            victim.rollback()
            with admin.connect() as conn:
                conn.exec_driver_sql(statement)
            with pytest.raises(DBAPIError) as info:
                victim.exec_driver_sql("SELECT 1").all()
    finally:
        admin.dispose()
    return info.value


def _database_locked(engine: Engine) -> DBAPIError:
    """SQLite: a second writer while the first holds the write lock."""
    with engine.connect() as first, engine.connect() as second:
        first = first.execution_options(isolation_level="AUTOCOMMIT")
        second = second.execution_options(isolation_level="AUTOCOMMIT")
        first.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            with pytest.raises(DBAPIError) as info:
                second.exec_driver_sql("BEGIN IMMEDIATE")
        finally:
            first.exec_driver_sql("ROLLBACK")
    return info.value


TRANSIENT: dict[str, list[tuple[str, Callable[[Engine], DBAPIError]]]] = {
    "postgresql": [
        ("deadlock", _deadlock),
        ("serialization", _serialization_failure),
        ("disconnect", _terminated),
    ],
    "mysql": [
        ("deadlock", _deadlock),
        ("lock_timeout", _lock_wait_timeout),
        ("disconnect", _terminated),
    ],
    "sqlite": [("locked", _database_locked)],
}


def test_real_transient_errors_are_retried_and_others_are_not(
    engine_name: str, fault_databases: FreshDatabases, tmp_path: Path
) -> None:
    if engine_name == "sqlite":
        url = f"sqlite:///{tmp_path / 'scratch.sqlite3'}"
        engine = sa.create_engine(url, poolclass=NullPool, connect_args={"timeout": 0})
    else:
        engine = sa.create_engine(make_url(fault_databases.url(engine_name)), poolclass=NullPool)
    try:
        _scratch(engine)
        for reason, provoke in TRANSIENT[engine_name]:
            error = provoke(engine)
            stats = RetryStats()
            attempts: list[int] = []

            def work(tx: Tx, error: DBAPIError = error, attempts: list[int] = attempts) -> str:
                attempts.append(tx.attempt)
                if tx.attempt == 0:
                    raise error  # the driver's own exception, as the unit met it
                return "done"

            assert run_unit(work, engine=engine, retries=2, stats=stats) == "done", reason
            assert attempts == [0, 1], (reason, error)
            assert stats.counts == {reason: 1}, (reason, error)

        # A constraint violation is an answer, not a transient failure.
        with engine.connect() as conn, pytest.raises(IntegrityError) as info:
            conn.exec_driver_sql("INSERT INTO stress_scratch (id, v) VALUES (1, 0)")
        stats = RetryStats()
        calls: list[int] = []

        def refused(tx: Tx) -> str:
            calls.append(tx.attempt)
            raise info.value

        with pytest.raises(IntegrityError):
            run_unit(refused, engine=engine, retries=2, stats=stats)
        assert calls == [0]
        assert stats.counts == {}
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS stress_scratch")
        engine.dispose()
