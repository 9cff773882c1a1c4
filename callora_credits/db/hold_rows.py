"""The SQL of holds: placing, reading, resolving and expiring them.

Like :mod:`.store`, nothing here opens or ends a transaction, and every
change to a hold is made under its account's row lock, taken first by the
caller.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.engine import Connection

from .constraints import unique_constraint
from .store import holds, is_mysql

__all__ = [
    "HOLD_REFERENCE",
    "expire_hold",
    "hold_by_reference",
    "hold_row",
    "insert_hold",
    "pending_hold_rows",
    "pending_holds_of",
    "resolve_hold",
    "set_hold_transaction",
]

#: The unique constraint that makes a hold's reference unique per user.
HOLD_REFERENCE = unique_constraint(holds, "user_id", "reference")


def hold_by_reference(conn: Connection, user_id: str, reference: str) -> str | None:
    """The id of the user's hold with ``reference``, if any."""
    stmt = select(holds.c.id).where(holds.c.user_id == user_id, holds.c.reference == reference)
    found: str | None = conn.execute(stmt).scalar()
    return found


def pending_holds_of(conn: Connection, user_id: str) -> list[Any]:
    """Every hold of the user still marked pending, expired or not (read
    after the account lock: a locking read on MariaDB)."""
    stmt = select(holds.c.id, holds.c.created_at, holds.c.expires_at).where(
        holds.c.user_id == user_id, holds.c.status == "pending"
    )
    if is_mysql(conn):
        stmt = stmt.with_for_update()
    return list(conn.execute(stmt).all())


def expire_hold(conn: Connection, hold_id: str, at: datetime) -> None:
    """Mark a pending hold expired at its expiry (its pins went back)."""
    conn.execute(
        update(holds)
        .where(holds.c.id == hold_id, holds.c.status == "pending")
        .values(status="expired", resolved_at=at)
    )


def insert_hold(conn: Connection, values: dict[str, Any]) -> None:
    conn.execute(insert(holds).values(values))


def hold_row(conn: Connection, hold_id: str, *, lock: bool = False) -> Any:
    stmt = select(holds).where(holds.c.id == hold_id)
    if lock:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def resolve_hold(
    conn: Connection, hold_id: str, status: str, captured_units: int, now: datetime
) -> bool:
    """Move a pending hold to ``status``; ``False`` if it was not pending."""
    stmt = (
        update(holds)
        .where(holds.c.id == hold_id, holds.c.status == "pending")
        .values(status=status, captured_units=captured_units, resolved_at=now)
    )
    return bool(conn.execute(stmt).rowcount == 1)


def set_hold_transaction(conn: Connection, hold_id: str, transaction_id: str) -> None:
    conn.execute(update(holds).where(holds.c.id == hold_id).values(transaction_id=transaction_id))


def pending_hold_rows(
    conn: Connection,
    user_id: str,
    now: datetime,
    limit: int,
    after: tuple[datetime, str] | None,
) -> list[Any]:
    """Live holds, newest first, keyset on (created_at, id)."""
    stmt = select(holds).where(
        holds.c.user_id == user_id, holds.c.status == "pending", holds.c.expires_at > now
    )
    if after is not None:
        created, hold_id = after
        stmt = stmt.where(
            or_(
                holds.c.created_at < created,
                and_(holds.c.created_at == created, holds.c.id < hold_id),
            )
        )
    stmt = stmt.order_by(holds.c.created_at.desc(), holds.c.id.desc()).limit(limit)
    return list(conn.execute(stmt).all())
