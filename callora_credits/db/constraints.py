"""Unique constraints, found by their columns, and integrity errors told
apart by the constraint they violate."""

from __future__ import annotations

from sqlalchemy import Table, UniqueConstraint
from sqlalchemy.exc import DBAPIError

__all__ = ["unique_constraint", "violates"]


def unique_constraint(table: Table, *columns: str) -> UniqueConstraint:
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint) and [
            c.name for c in constraint.columns
        ] == list(columns):
            return constraint
    raise LookupError(f"{table.name} has no unique constraint on {columns}")  # pragma: no cover


def _constraint_name(constraint: UniqueConstraint) -> str:
    # The naming convention of models.metadata, as the migrations spell it.
    table = constraint.table.name
    return f"uq_{table}_" + "_".join(column.name for column in constraint.columns)


def violates(exc: DBAPIError, constraint: UniqueConstraint) -> bool:
    """Whether ``exc`` is a violation of ``constraint``, and of nothing else.

    Told apart by the constraint's name (PostgreSQL's diagnostics, MariaDB's
    message) or, on SQLite, which reports no name, by its columns. A CHECK or
    NOT NULL violation is never mistaken for a duplicate.
    """
    orig = exc.orig
    name = _constraint_name(constraint)
    diag = getattr(orig, "diag", None)
    if diag is not None:  # psycopg 3 and psycopg2
        return bool(getattr(diag, "constraint_name", None) == name)
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):  # PyMySQL: (1062, "Duplicate entry … for key '…'")
        return args[0] == 1062 and f"'{name}'" in str(args[1] if len(args) > 1 else "")
    table = constraint.table.name
    columns = ", ".join(f"{table}.{column.name}" for column in constraint.columns)
    return str(orig) == f"UNIQUE constraint failed: {columns}"
