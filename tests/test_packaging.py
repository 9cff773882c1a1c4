"""The wheel ships the Alembic history and the type marker.

The wheel is built from a copy of the source tree, so the build leaves no
``build/`` or ``*.egg-info`` behind in the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from callora_credits import migrate

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [
    "callora_credits/__init__.py",
    "callora_credits/py.typed",
    "callora_credits/migrations/__init__.py",
    "callora_credits/migrations/env.py",
    "callora_credits/migrations/script.py.mako",
    "callora_credits/migrations/versions/__init__.py",
    "callora_credits/migrations/versions/0001_initial.py",
    "callora_credits/migrations/versions/0002_grants.py",
    "callora_credits/migrations/versions/0003_held_total.py",
]
# Anything below these is not part of the package.
SOURCE_ONLY = (".git", ".venv", "build", "dist", "tests", "examples", "docs", "bench")


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "callora-credits"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            *SOURCE_ONLY, "*.egg-info", "__pycache__", ".*_cache", "*.sqlite3"
        ),
    )
    outdir = tmp_path_factory.mktemp("dist")
    build = [sys.executable, "-m", "build", "--wheel", "--outdir", str(outdir), str(source)]
    isolated = _run(*build, cwd=source)
    if isolated.returncode != 0:
        # No index to fetch the build requirements from: build with the
        # virtualenv's own setuptools (which must then satisfy pyproject).
        local = _run(*build, "--no-isolation", cwd=source)
        assert local.returncode == 0, (
            f"isolated build:\n{isolated.stdout}{isolated.stderr}\n"
            f"--no-isolation build:\n{local.stdout}{local.stderr}"
        )
    wheels = list(outdir.glob("callora_credits-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_ships_migrations_and_type_marker(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())

    assert [name for name in SHIPPED if name not in names] == []
    assert not [name for name in names if name.startswith(("tests/", "examples/", "migrations/"))]
    assert not [name for name in names if "__pycache__" in name]


def test_installed_wheel_applies_its_own_migrations(wheel, tmp_path):
    """Installed (not from the source tree), the library finds its scripts
    inside the package and runs them."""
    target = tmp_path / "site"
    installed = _run(
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-index",
        "--target",
        str(target),
        str(wheel),
        cwd=tmp_path,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr

    script = (
        "import sqlalchemy as sa\n"
        "from callora_credits import migrate\n"
        "print(migrate.migrations_path())\n"
        "engine = sa.create_engine('sqlite:///installed.sqlite3')\n"
        "migrate.upgrade(engine)\n"
        "print(migrate.current(engine), migrate.head())\n"
        "print(sorted(sa.inspect(engine).get_table_names()))\n"
        "engine.dispose()\n"
    )
    # The installed copy comes first on sys.path; the checkout is not on it.
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = _run(sys.executable, "-c", script, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    path, revisions, tables = result.stdout.splitlines()
    assert Path(path) == target / "callora_credits" / "migrations"
    assert revisions == f"{migrate.head()} {migrate.head()}"
    assert tables == str(sorted(migrate.LIBRARY_TABLES))
