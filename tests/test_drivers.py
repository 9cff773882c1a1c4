"""Database drivers: the URLs the docs show, the extras, a missing driver.

Flask-SQLAlchemy opens the driver while the host app is being created, so a
missing one stops the app from importing. ``flask credits`` (also a
``flask.commands`` plugin) must then print one line naming the extra to
install, not a traceback followed by ``No such command 'credits'``.

A driver is made "not installed" by a ``None`` in ``sys.modules``, which
makes its import fail exactly as a missing package does, whatever happens to
be installed here.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from flask.cli import FlaskGroup

from callora_credits.cli import cli, missing_driver_message

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "configuration.md"]


def setup_keywords() -> dict[str, Any]:
    """The literal keyword arguments of ``setup()`` in setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            return {
                kw.arg: ast.literal_eval(kw.value)
                for kw in node.keywords
                if kw.arg in ("extras_require", "entry_points")
            }
    raise AssertionError("no setup() call in setup.py")


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def documented_urls() -> list[str]:
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        found += re.findall(r"\b(?:postgresql|mysql)[+\w]*://[\w.:@/-]+", text)
    return found


def test_the_documented_urls_use_the_drivers_the_extras_install() -> None:
    urls = documented_urls()
    assert {sa.make_url(url).get_backend_name() for url in urls} == {"postgresql", "mysql"}
    extras = {
        name: {requirement_name(req) for req in reqs}
        for name, reqs in setup_keywords()["extras_require"].items()
    }
    distributions = importlib.metadata.packages_distributions()
    for url in urls:
        # create_engine imports the driver without connecting.
        engine = sa.create_engine(url)
        module = engine.dialect.loaded_dbapi.__name__.split(".")[0]
        names = {name.lower().replace("_", "-") for name in distributions[module]}
        extra = "postgres" if engine.dialect.name == "postgresql" else "mysql"
        assert names & extras[extra], f"{url}: {module} is not in the {extra!r} extra"
        engine.dispose()


HOST_APP = """\
import os

from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy

from callora_credits import credits_bp

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
app.config["JWT_SECRET_KEY"] = "driver-test-" + "0" * 32
db = SQLAlchemy(app)
JWTManager(app)
app.register_blueprint(credits_bp, url_prefix="/api/billing")
"""

FACTORY_APP = """\
from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy

from callora_credits import credits_bp

db = SQLAlchemy()


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = {url!r}
    app.config["JWT_SECRET_KEY"] = "driver-test-" + "0" * 32
    db.init_app(app)
    JWTManager(app)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")
    return app
"""

MISSING = [
    pytest.param(
        "mysql://root@127.0.0.1/shop",
        "MySQLdb",
        "write mysql+pymysql://… and install callora-credits[mysql]",
        id="mysql-means-mysqlclient",
    ),
    pytest.param(
        "postgresql+psycopg2://postgres@127.0.0.1/shop",
        "psycopg2",
        "write postgresql+psycopg://… and install callora-credits[postgres]",
        id="psycopg2",
    ),
    pytest.param(
        "postgresql+psycopg://postgres@127.0.0.1/shop",
        "psycopg",
        "install callora-credits[postgres]",
        id="psycopg-3",
    ),
    pytest.param(
        "mysql+pymysql://root@127.0.0.1/shop",
        "pymysql",
        "install callora-credits[mysql]",
        id="pymysql",
    ),
    pytest.param(
        "postgresql+pg8000://postgres@127.0.0.1/shop",
        "pg8000",
        "write postgresql+psycopg://… (extra postgres), mysql+pymysql://… (extra mysql) "
        "or sqlite:///…",
        id="an-unsupported-driver",
    ),
]


def flask_cli() -> FlaskGroup:
    """``flask`` as the console script builds it, with the plugin registered."""
    group = FlaskGroup(load_dotenv=False, set_debug_flag=False)
    group.add_command(cli, "credits")
    return group


def write_module(folder: Path, source: str) -> str:
    name = f"host_{uuid.uuid4().hex[:10]}"
    (folder / f"{name}.py").write_text(source, encoding="utf-8")
    return name


@pytest.fixture
def host_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path for host modules; Flask's CLI flag undone after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    # FlaskGroup sets it to turn app.run() into a no-op; no later test may see it.
    monkeypatch.setenv("FLASK_RUN_FROM_CLI", "false")
    return tmp_path


@pytest.mark.parametrize(("url", "driver", "fix"), MISSING)
@pytest.mark.parametrize("style", ["module", "factory"])
def test_a_missing_driver_is_one_line_naming_the_extra(
    host_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    driver: str,
    fix: str,
    style: str,
) -> None:
    monkeypatch.setitem(sys.modules, driver, None)
    monkeypatch.setenv("DATABASE_URL", url)
    if style == "module":
        target = write_module(host_dir, HOST_APP)
    else:
        target = write_module(host_dir, FACTORY_APP.format(url=url)) + ":create_app()"
    result = CliRunner().invoke(flask_cli(), ["--app", target, "credits", "db", "upgrade"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        f"Error: The database URL needs the driver {driver}, which is not installed: {fix}."
    ]


def test_a_hosts_own_missing_module_is_not_called_a_driver(
    host_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    monkeypatch.setenv("DATABASE_URL", "sqlite://")
    target = write_module(host_dir, "import psycopg2\n" + HOST_APP)
    result = CliRunner().invoke(flask_cli(), ["--app", target, "credits", "db", "upgrade"])
    assert result.exit_code != 0
    assert "The database URL needs" not in result.output
    assert "import psycopg2" in result.output  # Flask's own report, where it failed


def test_help_works_even_when_the_app_cannot_load(
    host_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "MySQLdb", None)
    monkeypatch.setenv("DATABASE_URL", "mysql://root@127.0.0.1/shop")
    target = write_module(host_dir, HOST_APP)
    result = CliRunner().invoke(flask_cli(), ["--app", target, "credits", "--help"])
    assert result.exit_code == 0, result.output
    assert "reconcile" in result.output


def test_an_app_without_the_blueprint_is_told_how_to_add_it(host_dir: Path) -> None:
    target = write_module(host_dir, "from flask import Flask\n\napp = Flask(__name__)\n")
    result = CliRunner().invoke(flask_cli(), ["--app", target, "credits", "balance", "u1"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines() == [
        "Error: callora_credits is not set up on this app: call "
        'app.register_blueprint(credits_bp, url_prefix="/api/billing") in it.'
    ]


def test_other_errors_are_not_driver_errors() -> None:
    assert missing_driver_message(RuntimeError("boom")) is None
    with pytest.raises(ModuleNotFoundError) as raised:
        import callora_credits_no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert missing_driver_message(raised.value) is None


def test_the_flask_command_finds_the_plugin_declared_in_setup_py(tmp_path: Path) -> None:
    """The real ``flask`` executable, with setup.py's entry points installed
    as a distribution's metadata, on an app whose driver is missing."""
    entry_points = setup_keywords()["entry_points"]
    dist_info = tmp_path / "site" / "callora_credits_plugin-0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: callora-credits-plugin\nVersion: 0\n", encoding="utf-8"
    )
    lines = []
    for group, declared in entry_points.items():
        lines.append(f"[{group}]")
        lines += declared
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # Stands for "mysqlclient is not installed", before the app is imported.
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import sys\nsys.modules['MySQLdb'] = None\n", encoding="utf-8"
    )
    host = tmp_path / "host"
    host.mkdir()
    (host / "app.py").write_text(HOST_APP, encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path / "site")]),
        "DATABASE_URL": "mysql://root@127.0.0.1/shop",
    }

    def flask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app", *args],
            cwd=host, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    broken = flask("credits", "db", "upgrade")
    assert broken.returncode == 1, broken.stderr
    assert broken.stdout == ""
    assert broken.stderr.splitlines() == [
        "Error: The database URL needs the driver MySQLdb, which is not installed: "
        "write mysql+pymysql://… and install callora-credits[mysql]."
    ]

    env["DATABASE_URL"] = f"sqlite:///{host / 'credits.sqlite3'}"
    working = flask("credits", "db", "upgrade")
    assert working.returncode == 0, working.stderr
    assert working.stdout.startswith("credits schema at ")
    assert working.stderr == ""
