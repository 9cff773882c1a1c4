"""Alembic environment of callora-credits.

Run through ``flask credits db …`` (or :func:`callora_credits.migrate.upgrade`),
which passes the host's connection in ``config.attributes["connection"]``.
The version table is the library's own, so the host's Alembic or
Flask-Migrate history is never touched.
"""

from __future__ import annotations

from alembic import context

from callora_credits.db.models import metadata
from callora_credits.migrate import VERSION_TABLE

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - misuse
    raise RuntimeError(
        "Run the credits migrations with `flask credits db upgrade`, which "
        "passes the app's database connection to Alembic."
    )


def _own_tables_only(name: str | None, type_: str, parent_names: object) -> bool:
    # Compare and autogenerate see only the library's tables (the host's are
    # the host's business). Only table names are filtered: Alembic also asks
    # about the schema (name None) and every column, index and constraint,
    # and refusing those would hide the whole database.
    if type_ == "table":
        return name in metadata.tables
    return True


context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    include_name=_own_tables_only,
    compare_type=True,
    render_as_batch=connection.dialect.name == "sqlite",
)

with context.begin_transaction():
    context.run_migrations()
