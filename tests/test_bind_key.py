"""CREDITS_BIND_KEY: the credits tables on one of the host's Flask-SQLAlchemy binds.

The host's default database is a SQLite file and its ``billing`` bind is the
engine under test, or the other way round. Every door (the routes, the
Python API, ``@charge_credits``, ``flask credits``, migrations included) must
use the bind and leave the default database alone. Each test gets fresh,
empty databases, so the tables it finds are the ones it created.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, SECRET, SERVICE_SCOPE, Databases, make_token
from flask import Flask, jsonify
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Engine

from callora_credits import charge_credits, credits_bp, current_ledger, migrate
from callora_credits.db.models import LedgerEntry

U = 10_000_000
HOST_TABLE = "host_widgets"


@dataclass
class Host:
    app: Flask
    db: SQLAlchemy
    default: Engine
    bind: Engine

    def tables(self, engine: Engine) -> set[str]:
        return set(sa.inspect(engine).get_table_names())

    def cli(self, *args: str) -> Any:
        result = self.app.test_cli_runner().invoke(args=["credits", *args])
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        return result


def build_host(default_url: str, bind_url: str, **config: Any) -> tuple[Flask, SQLAlchemy]:
    """A host app with a default database and a ``billing`` bind for the credits."""
    app = Flask("credits_bind_host")
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=default_url,
        SQLALCHEMY_BINDS={"billing": bind_url},
        JWT_SECRET_KEY=SECRET,
        CREDITS_BIND_KEY="billing",
    )
    app.config.update(config)
    db = SQLAlchemy(app)
    JWTManager(app)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")

    @app.get("/paid")
    @charge_credits("0.2500000")
    def paid() -> Any:
        return jsonify(ok=True)

    return app, db


@pytest.fixture
def fresh(engine_name: str, tmp_path: Any) -> Iterator[Databases]:
    """Empty databases of this test's own, dropped at the end."""
    dbs = Databases(tmp_path / "fresh")
    yield dbs
    dbs.drop_all()


def _host(default_url: str, bind_url: str) -> Iterator[Host]:
    app, db = build_host(default_url, bind_url)
    with app.app_context():
        default, bind = db.engines[None], db.engines["billing"]
    host_table = sa.Table(HOST_TABLE, sa.MetaData(), sa.Column("id", sa.Integer, primary_key=True))
    host_table.create(default)
    yield Host(app, db, default, bind)
    with app.app_context():
        db.session.remove()
    default.dispose()
    bind.dispose()


@pytest.fixture
def host(fresh: Databases, engine_name: str, tmp_path: Any) -> Iterator[Host]:
    """Default database: a SQLite file; the bind: the engine under test."""
    default_url = f"sqlite:///{tmp_path / 'host_default.sqlite3'}"
    yield from _host(default_url, fresh.url(engine_name, migrated=False))


@pytest.fixture
def reversed_host(fresh: Databases, engine_name: str, tmp_path: Any) -> Iterator[Host]:
    """Default database: the engine under test; the bind: a SQLite file."""
    bind_url = f"sqlite:///{tmp_path / 'host_billing.sqlite3'}"
    yield from _host(fresh.url(engine_name, migrated=False), bind_url)


def post(host: Host, path: str, body: dict[str, Any], scopes: str) -> Any:
    headers = {
        "Authorization": f"Bearer {make_token(ADMIN, scopes=scopes)}",
        "Idempotency-Key": uuid.uuid4().hex,
    }
    return host.app.test_client().post(f"/api/billing{path}", json=body, headers=headers)


def entries_on(engine: Engine, user_id: str) -> list[tuple[str, int, int]]:
    t = LedgerEntry.__table__
    query = (
        sa.select(t.c.type, t.c.amount_units, t.c.balance_after_units)
        .where(t.c.user_id == user_id)
        .order_by(t.c.seq)
    )
    with engine.connect() as conn:
        return [
            (row.type, int(row.amount_units), int(row.balance_after_units))
            for row in conn.execute(query)
        ]


def test_every_door_uses_the_bind_and_only_the_bind(host: Host, user_id: str) -> None:
    upgrade = host.cli("db", "upgrade")
    assert upgrade.exit_code == 0, upgrade.output
    where = f"on bind 'billing' ({host.bind.url.render_as_string(hide_password=True)})"
    assert upgrade.output.strip() == f"credits schema at {migrate.head()} {where}"
    assert host.tables(host.bind) >= migrate.LIBRARY_TABLES
    assert host.tables(host.default) == {HOST_TABLE}
    assert migrate.current(host.bind) == migrate.head()
    current = host.cli("db", "current")
    assert current.output.strip() == f"{migrate.head()} (head: {migrate.head()}) {where}"

    # HTTP: a top-up and a charge.
    topped = post(host, "/credits/topup", {"user_id": user_id, "amount_usdc": "10"}, ADMIN_SCOPE)
    assert topped.status_code == 201, topped.get_json()
    charged = post(
        host, "/credits/charge", {"user_id": user_id, "amount_usdc": "2.5"}, SERVICE_SCOPE
    )
    assert charged.status_code == 201, charged.get_json()

    # The Python API, on its own transactions and inside the host's session.
    with host.app.app_context():
        ledger = current_ledger()
        assert ledger.engine is host.bind
        ledger.top_up(user_id, 5 * U)
        ledger.charge(user_id, 1 * U)
        ledger.top_up(user_id, 2 * U, session=host.db.session)
        host.db.session.commit()

    # @charge_credits on a host route.
    paid = host.app.test_client().get(
        "/paid", headers={"Authorization": f"Bearer {make_token(user_id)}"}
    )
    assert paid.status_code == 200, paid.get_data(as_text=True)
    assert paid.headers["X-Credits-Charged"] == "0.2500000"

    # The CLI.
    cli_topup = host.cli("topup", user_id, "3")
    assert cli_topup.exit_code == 0, cli_topup.output
    assert cli_topup.output.rstrip().endswith("-> 16.2500000")

    assert entries_on(host.bind, user_id) == [
        ("topup", 10 * U, 10 * U),
        ("charge", -25 * U // 10, 75 * U // 10),
        ("topup", 5 * U, 125 * U // 10),
        ("charge", -1 * U, 115 * U // 10),
        ("topup", 2 * U, 135 * U // 10),
        ("hold_capture", -U // 4, 1325 * U // 100),
        ("topup", 3 * U, 1625 * U // 100),
    ]
    assert host.tables(host.default) == {HOST_TABLE}

    balance = host.cli("balance", user_id)
    assert balance.output.strip() == (
        f"{user_id}: balance 16.2500000 held 0.0000000 available 16.2500000"
    )
    history = host.cli("history", user_id, "--limit", "3")
    lines = history.output.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["7", "6", "5"]
    assert "topup" in lines[0]
    reconcile = host.cli("reconcile")
    assert reconcile.exit_code == 0, reconcile.output
    assert reconcile.output.strip() == "checked 1 account, 7 entries: ok"

    downgrade = host.cli("db", "downgrade")
    assert downgrade.exit_code == 0, downgrade.output
    # Alembic keeps its (now empty) version table, as for any history at base.
    assert host.tables(host.bind) == {migrate.VERSION_TABLE}
    assert migrate.current(host.bind) is None
    assert host.tables(host.default) == {HOST_TABLE}


def test_a_default_database_on_the_engine_is_left_alone(reversed_host: Host, user_id: str) -> None:
    host = reversed_host
    assert host.cli("db", "upgrade").exit_code == 0
    assert host.tables(host.bind) >= migrate.LIBRARY_TABLES
    assert host.tables(host.default) == {HOST_TABLE}

    topped = post(host, "/credits/topup", {"user_id": user_id, "amount_usdc": "4"}, ADMIN_SCOPE)
    assert topped.status_code == 201, topped.get_json()
    with host.app.app_context():
        current_ledger().charge(user_id, 1 * U)
    assert entries_on(host.bind, user_id) == [("topup", 4 * U, 4 * U), ("charge", -U, 3 * U)]
    assert host.cli("reconcile").output.strip() == "checked 1 account, 2 entries: ok"

    assert host.cli("db", "downgrade").exit_code == 0
    # Alembic keeps its (now empty) version table, as for any history at base.
    assert host.tables(host.bind) == {migrate.VERSION_TABLE}
    assert migrate.current(host.bind) is None
    assert host.tables(host.default) == {HOST_TABLE}


def test_an_unconfigured_bind_key_fails_at_registration(tmp_path: Any) -> None:
    default_url = f"sqlite:///{tmp_path / 'default.sqlite3'}"
    with pytest.raises(RuntimeError, match=r"CREDITS_BIND_KEY is 'biling'") as raised:
        build_host(default_url, f"sqlite:///{tmp_path / 'b.sqlite3'}", CREDITS_BIND_KEY="biling")
    message = str(raised.value)
    assert "SQLALCHEMY_BINDS['biling']" in message
    assert "configured: 'billing'" in message


def test_no_default_database_and_no_bind_key_fails_at_registration(tmp_path: Any) -> None:
    with pytest.raises(RuntimeError, match="set SQLALCHEMY_DATABASE_URI, or set CREDITS_BIND_KEY"):
        build_host(
            None,  # type: ignore[arg-type]
            f"sqlite:///{tmp_path / 'b.sqlite3'}",
            CREDITS_BIND_KEY=None,
        )


def test_a_bind_key_that_is_not_a_string_fails_at_registration(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="CREDITS_BIND_KEY must be None"):
        build_host(
            f"sqlite:///{tmp_path / 'default.sqlite3'}",
            f"sqlite:///{tmp_path / 'b.sqlite3'}",
            CREDITS_BIND_KEY=["billing"],
        )


def test_without_a_bind_key_the_default_database_is_used(tmp_path: Any, user_id: str) -> None:
    app, db = build_host(
        f"sqlite:///{tmp_path / 'default.sqlite3'}",
        f"sqlite:///{tmp_path / 'b.sqlite3'}",
        CREDITS_BIND_KEY=None,
    )
    with app.app_context():
        default, bind = db.engines[None], db.engines["billing"]
        assert app.test_cli_runner().invoke(args=["credits", "db", "upgrade"]).exit_code == 0
        assert current_ledger().engine is default
        current_ledger().top_up(user_id, U)
    assert entries_on(default, user_id) == [("topup", U, U)]
    assert sa.inspect(bind).get_table_names() == []
    default.dispose()
    bind.dispose()
