"""Applying the library's migrations to the host's database.

The Alembic history ships inside the package (``callora_credits/migrations``
in the wheel, the top-level ``migrations/`` in a source tree) and is applied
with its own version table, so it lives beside the host's own history.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from .db.models import metadata

__all__ = [
    "LIBRARY_TABLES",
    "VERSION_TABLE",
    "current",
    "downgrade",
    "head",
    "include_name",
    "migrations_path",
    "upgrade",
]

VERSION_TABLE = "credits_alembic_version"
#: The tables the library owns, version table included.
LIBRARY_TABLES = frozenset(metadata.tables) | {VERSION_TABLE}


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """An Alembic ``include_name`` filter that hides the library's tables.

    Pass it to the host's ``Migrate(app, db, include_name=include_name)`` so
    the host's autogenerate never proposes to create or drop them.
    """
    if type_ == "table":
        return name not in LIBRARY_TABLES
    return True


def migrations_path() -> Path:
    """Where the migration scripts are, installed or in a source tree.

    Found beside the package's own files (``callora_credits/migrations`` in
    a wheel, the top-level ``migrations/`` of a source tree), never through
    the import system, which an editable install may point at another
    checkout than the code running.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "migrations", package.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("callora_credits: the migration scripts are missing from the install")


def _config(connection: object) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_path()))
    cfg.attributes["connection"] = connection
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply the library's migrations up to ``revision``."""
    with engine.begin() as conn:
        command.upgrade(_config(conn), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Revert the library's migrations down to ``revision`` (all by default)."""
    with engine.begin() as conn:
        command.downgrade(_config(conn), revision)


def current(engine: Engine) -> str | None:
    """The revision applied to the database, or ``None``."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head() -> str | None:
    """The newest revision the installed library ships."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_path()))
    return ScriptDirectory.from_config(cfg).get_current_head()
