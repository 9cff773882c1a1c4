"""Fixtures: one migrated database per engine per session, an app per test.

SQLite always runs. PostgreSQL and MariaDB run when
``CREDITS_TEST_POSTGRES_URL`` / ``CREDITS_TEST_MYSQL_URL`` name a server; with
``CI=true`` a missing one fails the run instead of being skipped. Each session
creates its own database on those servers and drops it at the end; tests use
unique user ids, so nothing depends on test order.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import make_url

from callora_credits import credits_bp, migrate
from callora_credits.errors import NotFound, ValidationError

SECRET = "test-secret-key-that-is-long-enough-for-hs256"
#: The Redis of the rate limit tests (shared: each test keeps to a key prefix of its own).
REDIS_URL = os.environ.get("CREDITS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
ENV_URLS = {
    "postgresql": "CREDITS_TEST_POSTGRES_URL",
    "mysql": "CREDITS_TEST_MYSQL_URL",
}


def _engines() -> list[str]:
    engines = ["sqlite"]
    for name, var in ENV_URLS.items():
        if os.environ.get(var):
            engines.append(name)
        elif os.environ.get("CI") == "true":
            raise pytest.UsageError(f"CI=true but {var} is not set: {name} tests would not run")
    return engines


ENGINES = _engines()
#: ``ENGINES`` and, with PostgreSQL, ``"pgbouncer"``: the session's PostgreSQL
#: database through a PgBouncer in transaction pooling mode (the ``pgbouncer``
#: fixture). A test opts in with ``through_pgbouncer_too``.
ENGINES_AND_PGBOUNCER = [*ENGINES, "pgbouncer"] if "postgresql" in ENGINES else ENGINES
through_pgbouncer_too = pytest.mark.parametrize(
    "engine_name", ENGINES_AND_PGBOUNCER, indirect=True
)


def _server_url(name: str) -> str:
    return os.environ[ENV_URLS[name]]


def _create_database(name: str, tmp_dir: Path) -> str:
    """Create an empty database for this session; return its URL."""
    if name == "sqlite":
        return f"sqlite:///{tmp_dir / 'credits.sqlite3'}"
    server = make_url(_server_url(name))
    db_name = f"credits_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if name == "mysql":
            conn.exec_driver_sql(
                f"CREATE DATABASE {db_name} CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
            )
        else:
            conn.exec_driver_sql(f"CREATE DATABASE {db_name}")
    admin.dispose()
    return server.set(database=db_name).render_as_string(hide_password=False)


def _drop_database(name: str, url: str) -> None:
    if name == "sqlite":
        return
    server = make_url(_server_url(name))
    db_name = make_url(url).database
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if name == "postgresql":
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
        else:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {db_name}")
    admin.dispose()


class Databases:
    """Lazily created, migrated databases, one per engine, for the session."""

    def __init__(self, tmp_dir: Path) -> None:
        self.tmp_dir = tmp_dir
        self.urls: dict[str, str] = {}

    def url(self, name: str, *, migrated: bool = True) -> str:
        key = name if migrated else f"{name}-empty"
        if key not in self.urls:
            folder = self.tmp_dir / key
            folder.mkdir(parents=True, exist_ok=True)
            url = _create_database(name, folder)
            if migrated:
                engine = sa.create_engine(url)
                migrate.upgrade(engine)
                engine.dispose()
            self.urls[key] = url
        return self.urls[key]

    def drop_all(self) -> None:
        for key, url in self.urls.items():
            _drop_database(key.removesuffix("-empty"), url)


@pytest.fixture(scope="session")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    dbs = Databases(tmp_path_factory.mktemp("databases"))
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def pgbouncer(databases: Databases) -> Iterator[str]:
    """A URL to the session's PostgreSQL database through a PgBouncer in
    transaction pooling mode (started on first use, stopped at the end)."""
    if "postgresql" not in ENGINES:
        pytest.skip("PgBouncer runs in front of PostgreSQL: CREDITS_TEST_POSTGRES_URL is not set")
    from pgbouncer import start_pgbouncer

    url = databases.url("postgresql")
    bouncer = start_pgbouncer(url)
    try:
        yield bouncer.url(url)
    finally:
        bouncer.stop()


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_app(database_url: str, **config: Any) -> Flask:
    """A host app the way the README says to write one."""
    app = Flask("credits_test_host")
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 20, "max_overflow": 40}
        if not database_url.startswith("sqlite")
        else {},
        JWT_SECRET_KEY=SECRET,
    )
    jwt_manager = config.pop("with_jwt", True)
    app.config.update(config)
    db = SQLAlchemy()
    db.init_app(app)
    if jwt_manager:
        JWTManager(app)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")
    return app


#: ``CREDITS_MAX_AMOUNT_USDC``'s default, in units.
MAX_AMOUNT_UNITS = 1_000_000_000 * 10_000_000


@dataclass(frozen=True)
class Limits:
    """The limits an operation checks, at the defaults, without an app."""

    max_amount_units: int = MAX_AMOUNT_UNITS
    hold_ttl_seconds: int = 300
    hold_ttl_max_seconds: int = 86_400


LIMITS = Limits()


def refusal(build: Callable[[], object]) -> dict[str, str]:
    """The one detail of the ``ValidationError`` that ``build()`` raises."""
    with pytest.raises(ValidationError) as caught:
        build()
    assert caught.value.code == "VALIDATION_ERROR"
    (detail,) = caught.value.details
    return dict(detail)


#: Where the tests' controllable clock starts.
CLOCK_START = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A controllable UTC clock for the library, moved only by the test."""

    def __init__(self, start: datetime = CLOCK_START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, **delta: float) -> None:
        """Move on by ``seconds`` and/or ``timedelta`` keywords (``hours=2``)."""
        self.now += timedelta(seconds=seconds, **delta)

    def set(self, when: datetime) -> None:
        self.now = when


@pytest.fixture
def clock(app: Flask) -> Clock:
    """The ``app`` fixture's clock, stopped at :data:`CLOCK_START`."""
    stopped = Clock()
    app.extensions["callora_credits"].clock = stopped
    return stopped


def assert_only_debits_refundable(ledger: Any, top_up_id: str) -> None:
    """Refunding the top-up ``top_up_id``, or an entry that does not exist,
    is refused with what the Python API says about each."""
    with pytest.raises(ValidationError) as refused:
        ledger.refund(top_up_id)
    assert refused.value.message == "Only charge and hold_capture entries can be refunded"
    assert refused.value.details == [
        {
            "field": "transaction_id",
            "message": "This is a topup entry",
            "code": "not_refundable",
        }
    ]
    with pytest.raises(NotFound) as missing:
        ledger.refund("ctx_" + "0" * 24)
    assert missing.value.message == "No such transaction"


@pytest.fixture
def app_config() -> dict[str, Any]:
    """Extra config for the ``app`` fixture; override in a test module."""
    return {}


def database_url(request: pytest.FixtureRequest, databases: Databases, engine_name: str) -> str:
    """The session's database of ``engine_name`` (``"pgbouncer"``: PostgreSQL's,
    through the bouncer)."""
    if engine_name == "pgbouncer":
        return str(request.getfixturevalue("pgbouncer"))
    return databases.url(engine_name)


@pytest.fixture
def app(
    request: pytest.FixtureRequest,
    databases: Databases,
    engine_name: str,
    app_config: dict[str, Any],
) -> Iterator[Flask]:
    app = make_app(database_url(request, databases, engine_name), **app_config)
    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


def make_token(
    user_id: Any = "user_1",
    *,
    scopes: str | list[str] | None = None,
    secret: str = SECRET,
    algorithm: str = "HS256",
    expires_in: timedelta = timedelta(minutes=15),
    omit_identity: bool = False,
    **claims: Any,
) -> str:
    """A signed access token shaped like Flask-JWT-Extended's."""
    now = datetime.now(timezone.utc)
    payload: dict[str, Any] = {
        "iat": now,
        "nbf": now,
        "exp": now + expires_in,
        "jti": uuid.uuid4().hex,
        "type": "access",
        "fresh": False,
    }
    if not omit_identity:
        payload["sub"] = user_id
    if scopes is not None:
        payload["scope"] = scopes
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=algorithm)


@pytest.fixture
def user_id() -> str:
    """A user id no other test uses."""
    return f"user_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def auth() -> Callable[..., dict[str, str]]:
    """Headers with a bearer token: ``auth(user_id, scopes=…)``."""

    def headers(user: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(user, **kwargs)}"}

    return headers


ADMIN = "ops_admin"
ADMIN_SCOPE = "credits:admin"
SERVICE_SCOPE = "credits:charge"


ERROR_KEYS = {"code", "message", "requestId", "details"}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """The response is the library's JSON error with this status and code."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == ERROR_KEYS
    assert body["code"] == code
    assert isinstance(body["message"], str)
    assert body["message"]
    assert isinstance(body["details"], list)
    assert body["requestId"] == response.headers["X-Request-Id"]
    return dict(body)


@pytest.fixture
def host(databases: Databases, engine_name: str) -> Iterator[Callable[..., Flask]]:
    """Build host apps with extra config (and optionally another database URL)
    on this test's engine; their engines are disposed after the test."""
    apps: list[Flask] = []

    def build(url: str | None = None, **config: Any) -> Flask:
        app = make_app(url or databases.url(engine_name), **config)
        apps.append(app)
        return app

    yield build
    for app in apps:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()


@pytest.fixture(scope="session")
def rsa_keys() -> tuple[str, str]:
    """An RSA key pair (private and public PEM) for RS256 tokens."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis (``RATELIMIT_KEY_PREFIX``);
    its keys are deleted afterwards. Skipped when Redis does not answer, except
    under ``CI=true``."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"Redis does not answer at {REDIS_URL}")
    prefix = f"credits-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = list(client.scan_iter(match=f"*{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep ``xdist_group`` tests on one worker under ``--dist loadgroup``.

    pytest-xdist names a test's group by appending ``@group`` to its node id
    through ``item._nodeid``; pytest 9 reads the id from ``item._id`` instead,
    so the suffix is lost and the group is spread over the workers. This
    sets it where pytest reads it (a no-op where xdist's own rename works).
    """
    if not getattr(config.option, "loadgroup", False):
        return
    try:
        from _pytest.nodeid import coerce_node_id
    except ImportError:  # an older pytest, where xdist's rename works
        return
    for item in items:
        names = sorted(
            {
                str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                for m in item.iter_markers("xdist_group")
            }
        )
        if names and "@" not in item.nodeid.rsplit("]", 1)[-1] and hasattr(item, "_id"):
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


@pytest.fixture(scope="session")
def galera() -> Iterator[Any]:
    """A three-node MariaDB Galera cluster with a migrated database (see
    ``tests/galera.py``), started once, for the tests that ask for it.

    Skipped when this machine cannot run one, except under ``CI=true``.
    Tests using it carry ``pytest.mark.xdist_group("galera")`` so that one
    worker runs them all against one cluster.
    """
    from galera import GaleraCluster, prerequisites

    missing = prerequisites()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the Galera cluster cannot run: {missing}")
        pytest.skip(f"no Galera cluster: {missing}")
    cluster = GaleraCluster()
    with cluster:
        yield cluster


@pytest.fixture
def node_apps(galera: Any) -> Iterator[list[Flask]]:
    """One host app bound to each Galera node (disposed after the test)."""
    apps = [make_app(url) for url in galera.urls()]
    yield apps
    for app in apps:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()


@pytest.fixture
def node_engines(galera: Any) -> Iterator[list[sa.Engine]]:
    """A plain engine per Galera node, for the independent checks."""
    engines = [sa.create_engine(url, pool_pre_ping=True) for url in galera.urls()]
    yield engines
    for engine in engines:
        engine.dispose()
