"""The SQL of the hot paths, in SQLAlchemy Core, with the per-engine parts.

Nothing here opens or ends a transaction; :mod:`.unit_of_work` does. Every
function takes the connection of the current transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Row, Table, and_, func, select
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from .models import Account, Hold

__all__ = [
    "accounts",
    "balance_row",
    "held_units_expr",
    "holds",
    "insert_account_if_missing",
]

accounts: Table = Account.__table__  # type: ignore[assignment]
holds: Table = Hold.__table__  # type: ignore[assignment]


def held_units_expr(user_id: Any, now: datetime) -> ColumnElement[int]:
    """Sum of the user's pending holds that have not expired at ``now``.

    An expired hold stops counting the moment it expires: the comparison is
    against ``now``, not against a status a sweeper would have to set.
    """
    return (
        select(func.coalesce(func.sum(holds.c.amount_units), 0))
        .where(
            and_(
                holds.c.user_id == user_id,
                holds.c.status == "pending",
                holds.c.expires_at > now,
            )
        )
        .scalar_subquery()
    )


def balance_row(conn: Connection, user_id: str, now: datetime) -> Row[Any] | None:
    """The account with its held units, in one statement; ``None`` if absent."""
    stmt = select(
        accounts.c.user_id,
        accounts.c.balance_units,
        accounts.c.created_at,
        accounts.c.updated_at,
        held_units_expr(accounts.c.user_id, now).label("held_units"),
    ).where(accounts.c.user_id == user_id)
    return conn.execute(stmt).first()


def insert_account_if_missing(conn: Connection, user_id: str, now: datetime) -> None:
    """Create a zero balance unless one exists; concurrent callers all succeed."""
    values = {
        "user_id": user_id,
        "balance_units": 0,
        "last_seq": 0,
        "created_at": now,
        "updated_at": now,
    }
    dialect = conn.dialect.name
    if dialect == "postgresql":
        conn.execute(postgresql.insert(accounts).values(values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        conn.execute(sqlite.insert(accounts).values(values).on_conflict_do_nothing())
    elif dialect in ("mysql", "mariadb"):
        # A no-op update rather than INSERT IGNORE, which would also swallow
        # errors other than the duplicate key.
        stmt = mysql.insert(accounts).values(values)
        conn.execute(stmt.on_duplicate_key_update(user_id=stmt.inserted.user_id))
    else:  # pragma: no cover - engines outside SPEC §9
        raise RuntimeError(f"callora_credits does not support the {dialect} dialect")
