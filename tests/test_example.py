"""The example host app (examples/host_app) and `make demo` (examples/demo.py).

The host keeps its own models and Flask-Migrate history beside the library's
tables; these tests run its quickstart on every engine and show that the
host's autogenerate never proposes anything for the credits tables.
"""

from __future__ import annotations

import importlib
import pprint
import shlex
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import flask_migrate
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import SECRET, Databases, make_token
from flask import Flask

import callora_credits
from callora_credits import migrate

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
LIBRARY_DATA_TABLES = frozenset(callora_credits.metadata.tables)
BASE_URL = "http://127.0.0.1:5000"


@pytest.fixture(scope="module")
def example() -> Iterator[SimpleNamespace]:
    """The example's modules, imported the way `python examples/demo.py` does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES_DIR))
        yield SimpleNamespace(
            host_app=importlib.import_module("host_app"),
            demo=importlib.import_module("demo"),
        )


def _wipe(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        reflected = sa.MetaData()
        reflected.reflect(engine)
        reflected.drop_all(engine)
    finally:
        engine.dispose()


@pytest.fixture
def database_url(databases: Databases, engine_name: str, tmp_path: Path) -> Iterator[str]:
    """An empty database: a temp SQLite file, or the session's empty server
    database (emptied before and after, so test order does not matter)."""
    if engine_name == "sqlite":
        yield f"sqlite:///{tmp_path / 'host.sqlite3'}"
        return
    url = databases.url(engine_name, migrated=False)
    _wipe(url)
    yield url
    _wipe(url)


@pytest.fixture
def make_host_app(example: SimpleNamespace) -> Iterator[Any]:
    """``create_app`` that disposes the engines of every app it built."""
    apps: list[Flask] = []

    def build(database_url: str, **config: Any) -> Flask:
        app: Flask = example.host_app.create_app(
            {"TESTING": True, "SQLALCHEMY_DATABASE_URI": database_url, **config}
        )
        apps.append(app)
        return app

    yield build
    for app in apps:
        with app.app_context():
            example.host_app.db.engine.dispose()


def _upgrade_both(app: Flask, example: SimpleNamespace) -> None:
    """The README's quickstart: the host's history, then the library's."""
    with app.app_context():
        flask_migrate.upgrade(directory=str(example.host_app.MIGRATIONS_DIR))
        migrate.upgrade(example.host_app.db.engine)


def _host_diff(app: Flask, example: SimpleNamespace, **opts: Any) -> list[Any]:
    """What the host's autogenerate would propose, with ``opts`` as in Migrate()."""
    with app.app_context(), example.host_app.db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, **opts})
        return list(compare_metadata(context, example.host_app.db.metadata))


def test_quickstart_on_every_engine(example, make_host_app, database_url, user_id):
    app = make_host_app(database_url, JWT_SECRET_KEY=SECRET)

    _upgrade_both(app, example)

    with app.app_context():
        engine = example.host_app.db.engine
        tables = set(sa.inspect(engine).get_table_names())
        assert tables >= LIBRARY_DATA_TABLES | {"projects", "alembic_version"}
        assert migrate.current(engine) == migrate.head()
        Project = example.host_app.Project
        db = example.host_app.db
        db.session.add(Project(owner_id=user_id, name="weather-api"))
        db.session.commit()
        db.session.remove()

    client = app.test_client()
    headers = {"Authorization": f"Bearer {make_token(user_id)}"}
    response = client.get("/api/billing/credits", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.json["user_id"] == user_id
    assert response.json["balance_usdc"] == "0.0000000"
    # The host's own route works on the same token and its own table.
    response = client.get("/api/projects", headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [project["name"] for project in response.json] == ["weather-api"]


def test_host_autogenerate_proposes_nothing_for_library_tables(
    example, make_host_app, database_url
):
    app = make_host_app(database_url)
    _upgrade_both(app, example)

    diff = _host_diff(app, example, include_name=callora_credits.include_name)
    assert diff == [], "host autogenerate would change:\n" + pprint.pformat(diff)

    # The filter is what keeps them out: without it, the host's autogenerate
    # would drop every credits table (and the library's version table).
    unfiltered = _host_diff(app, example)
    dropped = {change[1].name for change in unfiltered if change[0] == "remove_table"}
    assert dropped == LIBRARY_DATA_TABLES | {migrate.VERSION_TABLE}, pprint.pformat(unfiltered)

    # `flask db check` runs the host's env.py with Migrate(include_name=…).
    result = app.test_cli_runner().invoke(args=["db", "check"])
    assert result.exit_code == 0, result.output


def test_histories_are_independent(example, make_host_app, database_url):
    app = make_host_app(database_url)
    _upgrade_both(app, example)

    with app.app_context():
        engine = example.host_app.db.engine
        flask_migrate.downgrade(directory=str(example.host_app.MIGRATIONS_DIR), revision="base")
        tables = set(sa.inspect(engine).get_table_names())
        assert "projects" not in tables
        assert tables >= LIBRARY_DATA_TABLES
        assert migrate.current(engine) == migrate.head()

        migrate.downgrade(engine)
        flask_migrate.upgrade(directory=str(example.host_app.MIGRATIONS_DIR))
        tables = set(sa.inspect(engine).get_table_names())
        assert "projects" in tables
        assert tables & LIBRARY_DATA_TABLES == set()


def test_create_app_reads_the_environment(example, monkeypatch, tmp_path):
    def config_of(**overrides: Any) -> dict[str, Any]:
        app = example.host_app.create_app(overrides or None)
        with app.app_context():
            example.host_app.db.engine.dispose()
        return dict(app.config)

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("JWT_SECRET_KEY", raising=False)
    defaults = config_of()
    assert defaults["SQLALCHEMY_DATABASE_URI"] == (
        f"sqlite:///{EXAMPLES_DIR.parent / 'demo.sqlite3'}"
    )
    assert defaults["JWT_SECRET_KEY"] == example.host_app.DEMO_JWT_SECRET_KEY

    url = f"sqlite:///{tmp_path / 'from-env.sqlite3'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("JWT_SECRET_KEY", SECRET)
    from_env = config_of()
    assert from_env["SQLALCHEMY_DATABASE_URI"] == url
    assert from_env["JWT_SECRET_KEY"] == SECRET

    # A config dict wins over the environment.
    assert config_of(JWT_SECRET_KEY="k" * 40)["JWT_SECRET_KEY"] == "k" * 40


def _request_from_curl(command: str) -> dict[str, Any]:
    """The test-client arguments of a printed curl command."""
    words = shlex.split(command)
    assert words[0] == "curl", command
    method, url, headers, body = "GET", None, {}, None
    rest = iter(words[1:])
    for word in rest:
        if word == "-X":
            method = next(rest)
        elif word == "-H":
            name, _, value = next(rest).partition(": ")
            headers[name] = value
        elif word == "--data":
            body = next(rest)
        elif not word.startswith("-"):
            url = word
    assert url is not None, command
    assert url.startswith(BASE_URL), command
    parts = urlsplit(url)
    return {
        "method": method,
        "path": parts.path,
        "query_string": parts.query,
        "headers": headers,
        "data": body,
    }


def test_demo_prints_commands_that_work(example, make_host_app, tmp_path, capsys):
    demo = example.demo
    app = make_host_app(f"sqlite:///{tmp_path / 'demo.sqlite3'}")
    demo.apply_migrations(app)
    assert demo.seed_balance(app).startswith(f"seeded {demo.DEMO_USER}")
    assert demo.seed_balance(app) == f"{demo.DEMO_USER} was seeded by an earlier run"

    requests = demo.print_quickstart(app, BASE_URL)

    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("curl ")]
    assert printed == [request.curl(BASE_URL) for request in requests]
    client = app.test_client()
    results = {}
    for command in printed:
        request = _request_from_curl(command)
        response = client.open(
            request["path"],
            method=request["method"],
            query_string=request["query_string"],
            headers=request["headers"],
            data=request["data"],
        )
        results[(request["method"], request["path"], request["query_string"])] = response

    balance = results[("GET", "/api/billing/credits", "")]
    assert balance.status_code == 200, balance.get_data(as_text=True)
    assert balance.json["user_id"] == demo.DEMO_USER
    assert balance.json["balance_usdc"] == "100.0000000"
    admin_read = results[("GET", "/api/billing/credits", f"user_id={demo.DEMO_USER}")]
    assert admin_read.status_code == 200, admin_read.get_data(as_text=True)
    assert admin_read.json["user_id"] == demo.DEMO_USER
    charge = results[("POST", "/api/billing/credits/charge", "")]
    assert charge.status_code == 201, charge.get_data(as_text=True)
    assert charge.json["balance_after_usdc"] == "98.7500000"
    # The host's paid endpoints (@charge_credits), on alice's token.
    quote = results[("GET", "/api/quote", "")]
    assert quote.status_code == 200, quote.get_data(as_text=True)
    assert quote.headers["X-Credits-Charged"] == "0.0100000"
    assert quote.headers["X-Credits-Balance"] == "98.7400000"
    echo = results[("GET", "/api/echo", "text=hello")]
    assert echo.status_code == 200, echo.get_data(as_text=True)
    assert echo.json == {"text": "hello"}
    assert echo.headers["X-Credits-Charged"] == "0.0040000"  # set_final_price
    assert echo.headers["X-Credits-Balance"] == "98.7360000"
    history = results[("GET", "/api/billing/credits/transactions", "")]
    assert history.status_code == 200, history.get_data(as_text=True)
    assert [entry["type"] for entry in history.json["data"]] == [
        "hold_capture",
        "hold_capture",
        "charge",
        "topup",
    ]
    openapi = results[("GET", "/api/billing/openapi.json", "")]
    assert openapi.status_code == 200
    assert openapi.json["openapi"].startswith("3.1")

    # The printed charge is safe to paste twice: the key replays it.
    again = _request_from_curl(next(line for line in printed if " -X POST " in line))
    replay = client.open(
        again["path"], method="POST", headers=again["headers"], data=again["data"]
    )
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_data() == charge.get_data()
