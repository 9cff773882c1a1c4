"""Behind PgBouncer in transaction pooling mode, the library stays exact.

The app talks to the session's PostgreSQL database through a PgBouncer with
two server connections per database and user (``pool_mode = transaction``).
Other clients share that pool: raw psycopg connections with psycopg's
default ``prepare_threshold``, running their own statements all the while,
so server connections rotate between clients and carry statements other
clients prepared. Every check of the ledger reads the database directly
(``tests/invariants.py``), not through the bouncer.

psycopg prepares a statement on the server after 5 executions; through the
bouncer the next transaction may run on another server connection, where
that statement is missing or the name belongs to another client's. The
library keeps its connections from preparing unless
``CREDITS_PG_PREPARED_STATEMENTS`` is on.
"""

from __future__ import annotations

import os
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, ENGINES, SERVICE_SCOPE, Databases, make_app, make_token
from invariants import ledger_problems, snapshot
from pgbouncer import start_pgbouncer
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url

from callora_credits.db.connections import (
    _unprepared_on_checkout,
    _unprepared_on_connect,
    configure_engine,
)

U = 10_000_000  # units per USDC
BASE = "/api/billing/credits"
WAIT = 60  # seconds a barrier waits before it is declared broken


def usdc(units: int) -> str:
    return f"{units // U}.{units % U:07d}"


def conninfo(url: str) -> str:
    """A libpq connection string for a SQLAlchemy URL."""
    parsed = make_url(url)
    return (
        f"host={parsed.host} port={parsed.port or 5432} dbname={parsed.database} "
        f"user={parsed.username or 'postgres'}"
    )


class OtherClients:
    """Raw psycopg connections on the bouncer, preparing as psycopg does by
    default, each running short statements and transactions in a loop.

    Their own statements fail now and then (they prepare, and the bouncer
    moves them between server connections): that is expected and counted,
    never raised.
    """

    STATEMENTS = (
        ("SELECT %s::int + 1", 1),
        ("SELECT %s::text || %s::text", 2),
        ("SELECT count(*) FROM pg_class WHERE relpages >= %s AND relnatts >= %s", 2),
        ("SELECT %s::bigint, %s::text, %s::text, %s::bigint", 4),
    )

    def __init__(self, dsn: str, clients: int = 2) -> None:
        self.dsn = dsn
        self.clients = clients
        self.ran = 0
        self.failed = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _loop(self, seed: int) -> None:
        rng = random.Random(seed)
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True)
                sql, count = rng.choice(self.STATEMENTS)
                params = tuple(rng.randint(0, 50) for _ in range(count))
                if rng.random() < 0.3:
                    # A transaction that keeps a server connection a moment.
                    with conn.transaction():
                        conn.execute(sql, params).fetchall()
                        conn.execute("SELECT pg_sleep(0.003)")
                else:
                    conn.execute(sql, params).fetchall()
                with self._lock:
                    self.ran += 1
            except psycopg.Error:
                with self._lock:
                    self.failed += 1
        if conn is not None:
            conn.close()

    def __enter__(self) -> OtherClients:
        for index in range(self.clients):
            thread = threading.Thread(target=self._loop, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture
def direct(databases: Databases, pgbouncer: str) -> Iterator[Engine]:
    """The session's PostgreSQL database, not through the bouncer (for checks)."""
    engine = sa.create_engine(databases.url("postgresql"))
    yield engine
    engine.dispose()


@pytest.fixture
def bounced_app(pgbouncer: str) -> Iterator[Any]:
    # A small pool: each client connection runs each statement many times
    # (psycopg would prepare it at the 5th).
    app = make_app(pgbouncer, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 4, "max_overflow": 0})
    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


@pytest.fixture
def others(pgbouncer: str) -> Iterator[OtherClients]:
    with OtherClients(conninfo(pgbouncer)) as clients:
        yield clients
    assert clients.ran > 0, "the other clients never ran a statement"


@pytest.fixture
def user() -> str:
    return f"user_{uuid.uuid4().hex[:12]}"


def headers(scope: str, *, key: str | None = None) -> dict[str, str]:
    subject = ADMIN if scope == ADMIN_SCOPE else "billing-service"
    found = {"Authorization": f"Bearer {make_token(subject, scopes=scope)}"}
    found["Idempotency-Key"] = key or uuid.uuid4().hex
    return found


class Http:
    """The requests of one thread (its own test client), with every answer kept."""

    def __init__(self, app: Any) -> None:
        self.client = app.test_client()
        self.answers: list[tuple[str, int, Any]] = []

    def post(self, path: str, body: dict[str, Any], scope: str, key: str | None = None) -> Any:
        response = self.client.post(f"{BASE}{path}", json=body, headers=headers(scope, key=key))
        self.answers.append((path, response.status_code, response.get_json()))
        return response

    def get(self, path: str) -> Any:
        response = self.client.get(f"{BASE}{path}", headers=headers(ADMIN_SCOPE))
        self.answers.append((path, response.status_code, response.get_json()))
        return response

    def topup(self, user: str, units: int) -> Any:
        return self.post("/topup", {"user_id": user, "amount_usdc": usdc(units)}, ADMIN_SCOPE)

    def charge(self, user: str, units: int, key: str | None = None) -> Any:
        body = {"user_id": user, "amount_usdc": usdc(units)}
        return self.post("/charge", body, SERVICE_SCOPE, key)

    def hold(self, user: str, units: int) -> Any:
        return self.post("/holds", {"user_id": user, "amount_usdc": usdc(units)}, SERVICE_SCOPE)

    def capture(self, hold_id: str, units: int) -> Any:
        body = {"amount_usdc": usdc(units)}
        return self.post(f"/holds/{hold_id}/capture", body, SERVICE_SCOPE)


def server_errors(answers: list[tuple[str, int, Any]]) -> list[tuple[str, int, Any]]:
    return [answer for answer in answers if answer[1] >= 500]


def entries_by_type(engine: Engine, user: str) -> Counter[str]:
    return Counter(entry.type for entry in snapshot(engine, user).entries)


# --- the library's connections ------------------------------------------------------

needs_postgres = pytest.mark.skipif(
    "postgresql" not in ENGINES, reason="needs PostgreSQL (CREDITS_TEST_POSTGRES_URL)"
)


def psycopg_default_threshold(url: str) -> int | None:
    with psycopg.connect(conninfo(url)) as conn:
        return conn.prepare_threshold


@needs_postgres
@pytest.mark.parametrize("setting", [False, True])
def test_connections_prepare_on_the_server_only_when_the_setting_says_so(databases, setting):
    url = databases.url("postgresql")
    app = make_app(url, CREDITS_PG_PREPARED_STATEMENTS=setting)
    client = app.test_client()
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        try:
            response = client.get(
                f"{BASE}?user_id=u_{uuid.uuid4().hex[:8]}", headers=headers(ADMIN_SCOPE)
            )
            assert response.status_code == 200, response.get_data(as_text=True)
            with engine.connect() as conn:
                threshold = conn.connection.dbapi_connection.prepare_threshold  # type: ignore[union-attr]
        finally:
            engine.dispose()
    # Off (the default): never prepared on the server. On: psycopg's own default.
    expected = psycopg_default_threshold(url) if setting else None
    assert expected != 0
    assert threshold == expected


@needs_postgres
def test_connections_made_before_the_library_are_set_at_checkout(databases):
    """A host engine that already pooled connections: they are set as they
    are checked out; registering twice adds each listener once."""
    engine = sa.create_engine(databases.url("postgresql"), pool_size=2)
    try:
        with engine.connect() as first, engine.connect() as second:
            raw = [c.connection.dbapi_connection for c in (first, second)]
        assert all(r.prepare_threshold is not None for r in raw)  # type: ignore[union-attr]
        for _ in range(2):
            configure_engine(engine, prepared_statements=False)
        pool = engine.pool.dispatch
        assert list(pool.connect).count(_unprepared_on_connect) == 1
        assert list(pool.checkout).count(_unprepared_on_checkout) == 1
        with engine.connect() as first, engine.connect() as second:
            again = [c.connection.dbapi_connection for c in (first, second)]
            assert {id(r) for r in again} == {id(r) for r in raw}  # the same two
            assert [r.prepare_threshold for r in again] == [None, None]  # type: ignore[union-attr]
        engine.dispose()
        with engine.connect() as fresh:
            assert fresh.connection.dbapi_connection.prepare_threshold is None  # type: ignore[union-attr]
    finally:
        engine.dispose()


def test_other_engines_are_left_alone(tmp_path):
    """SQLite (and any driver that does not prepare on its own): no listener;
    a fresh pool needs no checkout listener; the setting on registers none."""
    sqlite = sa.create_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    configure_engine(sqlite, prepared_statements=False)
    assert not event.contains(sqlite, "connect", _unprepared_on_connect)
    sqlite.dispose()
    if "postgresql" in ENGINES:
        url = os.environ["CREDITS_TEST_POSTGRES_URL"]
        fresh = sa.create_engine(url)
        configure_engine(fresh, prepared_statements=False)
        assert event.contains(fresh, "connect", _unprepared_on_connect)
        assert not event.contains(fresh, "checkout", _unprepared_on_checkout)
        kept = sa.create_engine(url)
        configure_engine(kept, prepared_statements=True)
        assert not event.contains(kept, "connect", _unprepared_on_connect)
        fresh.dispose()
        kept.dispose()


# --- through the bouncer ------------------------------------------------------------


def test_sequential_requests_never_fail(bounced_app, others, direct, user):
    http = Http(bounced_app)
    assert http.topup(user, 1000 * U).status_code == 201
    for round_ in range(10):
        assert http.charge(user, 3 * U).status_code == 201
        hold = http.hold(user, 5 * U)
        assert hold.status_code == 201
        assert http.capture(hold.get_json()["id"], 2 * U).status_code == 200
        assert http.get(f"?user_id={user}").status_code == 200
        assert http.get(f"/transactions?user_id={user}&limit=5").status_code == 200
        assert http.topup(user, (round_ + 1) * U).status_code == 201
    assert len(http.answers) == 61
    assert server_errors(http.answers) == []
    assert ledger_problems(direct, user) == []
    assert entries_by_type(direct, user) == {"topup": 11, "charge": 10, "hold_capture": 10}
    assert snapshot(direct, user).balance_units == (1000 - 50 + 55) * U


def test_a_concurrent_mix_never_fails(bounced_app, others, direct):
    users = [f"user_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    setup = Http(bounced_app)
    for user in users:
        assert setup.topup(user, 40 * U).status_code == 201
    threads, per_thread = 6, 20
    barrier = threading.Barrier(threads, timeout=WAIT)
    workers = [Http(bounced_app) for _ in range(threads)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        http, rng = workers[index], random.Random(index)
        try:
            barrier.wait()
            for _ in range(per_thread):
                user = rng.choice(users)
                roll = rng.random()
                if roll < 0.2:
                    http.topup(user, rng.randint(1, 5) * U)
                elif roll < 0.5:
                    http.charge(user, rng.randint(1, 6) * U)
                elif roll < 0.7:
                    hold = http.hold(user, rng.randint(1, 6) * U)
                    if hold.status_code == 201:
                        http.capture(hold.get_json()["id"], rng.randint(0, 1) * U)
                elif roll < 0.85:
                    http.get(f"?user_id={user}")
                else:
                    http.get(f"/transactions?user_id={user}&limit=10")
        except BaseException as error:  # reported below
            errors.append(error)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(WAIT * 2)
    assert errors == []
    answers = [answer for http in workers for answer in http.answers]
    assert server_errors(answers) == []
    allowed = {200, 201, 402}
    assert {status for _, status, _ in answers} <= allowed, Counter(s for _, s, _ in answers)
    # Each answered change is one ledger row: top-ups, charges, and captures
    # of more than zero (a capture of zero releases the hold, no entry).
    answered: Counter[str] = Counter()
    for path, status, body in answers:
        if path == "/topup" and status == 201:
            answered["topup"] += 1
        elif path == "/charge" and status == 201:
            answered["charge"] += 1
        elif path.endswith("/capture") and status == 200 and body["captured_usdc"] != usdc(0):
            answered["hold_capture"] += 1
    written: Counter[str] = Counter()
    for user in users:
        assert ledger_problems(direct, user) == []
        written += entries_by_type(direct, user)
    written["topup"] -= len(users)  # the set-up's
    assert +written == +answered


def race(
    app: Any,
    threads: int,
    request: Callable[[Http], Any],
    before: Callable[[Http], Any] | None = None,
) -> list[Http]:
    """``request`` sent from ``threads`` threads at once (each its own
    client), each after its own ``before``."""
    barrier = threading.Barrier(threads, timeout=WAIT)
    workers = [Http(app) for _ in range(threads)]

    def work(http: Http) -> None:
        if before is not None:
            before(http)
        barrier.wait()
        request(http)

    pool = [threading.Thread(target=work, args=(http,)) for http in workers]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(WAIT * 2)
    return workers


def test_the_same_key_from_many_threads_applies_once(bounced_app, others, direct, user):
    assert Http(bounced_app).topup(user, 1000 * U).status_code == 201
    rounds, threads = 4, 8

    def warm_up(http: Http) -> None:
        for _ in range(3):
            http.charge(user, 1 * U)

    for round_ in range(rounds):
        key = f"race-{uuid.uuid4().hex}"
        replayed: list[bool] = []

        def charge(http: Http, key: str = key, replayed: list[bool] = replayed) -> None:
            response = http.charge(user, 7 * U, key=key)
            replayed.append(response.headers.get("Idempotent-Replayed") == "true")

        # Each thread first charges under keys of its own: enough statements
        # for psycopg to want to prepare (it forgets its counts at a rollback).
        workers = race(bounced_app, threads, charge, warm_up)
        assert server_errors([a for http in workers for a in http.answers]) == []
        assert [status for http in workers for _, status, _ in http.answers[:-1]] == [201] * (
            3 * threads
        )
        answers = [http.answers[-1] for http in workers]
        done = [body for _, status, body in answers if status == 201]
        busy = [body for _, status, body in answers if status == 409]
        assert len(done) + len(busy) == threads
        assert all(body["code"] == "IDEMPOTENCY_IN_PROGRESS" for body in busy)
        assert len({body["id"] for body in done}) == 1
        assert replayed.count(False) == len(busy) + 1  # one fresh answer; the rest replays
        charges = (3 * threads + 1) * (round_ + 1)
        assert entries_by_type(direct, user) == {"topup": 1, "charge": charges}
    assert snapshot(direct, user).balance_units == (1000 - (3 * threads + 7) * rounds) * U
    assert ledger_problems(direct, user) == []


def test_charges_racing_past_the_balance_let_exactly_enough_through(
    bounced_app, others, direct, user
):
    rounds, threads = 4, 12
    setup = Http(bounced_app)
    for round_ in range(rounds):  # enough statements for psycopg to want to prepare
        # Mostly successes: psycopg forgets its counts at every rollback.
        assert setup.topup(user, 30 * U).status_code == 201
        workers = race(bounced_app, threads, lambda http: http.charge(user, 3 * U))
        statuses = Counter(status for http in workers for _, status, _ in http.answers)
        assert statuses == {201: 10, 402: threads - 10}
        assert snapshot(direct, user).balance_units == 0
        assert entries_by_type(direct, user) == {"topup": round_ + 1, "charge": 10 * (round_ + 1)}
    assert ledger_problems(direct, user) == []


# --- why: psycopg's default behind the bouncer ----------------------------------------


@needs_postgres
def test_prepared_statements_behind_a_transaction_pooler_fail(databases):
    """With ``CREDITS_PG_PREPARED_STATEMENTS`` on (psycopg's default), a
    bouncer with one server connection, and another client that prepared
    there first, the app's own first prepare takes a name already in use on
    that server connection; with the default, the same requests all succeed."""
    url = databases.url("postgresql")
    statuses = {}
    for setting in (True, False):
        bouncer = start_pgbouncer(url, pool_size=1)  # a fresh server connection each
        try:
            with psycopg.connect(conninfo(bouncer.url(url)), autocommit=True) as other:
                for number in range(6):  # prepared at the 5th, as "_pg3_0"
                    other.execute("SELECT %s::int", (number,)).fetchone()
                app = make_app(bouncer.url(url), CREDITS_PG_PREPARED_STATEMENTS=setting)
                http = Http(app)
                user = f"user_{uuid.uuid4().hex[:12]}"
                for _ in range(8):
                    http.get(f"?user_id={user}")
                statuses[setting] = Counter(status for _, status, _ in http.answers)
                with app.app_context():
                    app.extensions["sqlalchemy"].engine.dispose()
        finally:
            bouncer.stop()
    assert statuses[False] == {200: 8}
    assert statuses[True][500] >= 1, statuses
