"""The SQL of grants and allocations.

Every function runs on the current transaction's connection, and every
change to a grant is made under its account's row lock (taken first by the
caller), so a grant's figures are only ever changed by one transaction at a
time. Changes are relative and guarded all the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, or_, select, update
from sqlalchemy.engine import Connection

from .constraints import unique_constraint
from .models import AllocationRow, GrantRow, Timestamp
from .prepared import PreparedStatement
from .unit_of_work import RetryTransaction

__all__ = [
    "allocations",
    "entry_allocations",
    "grant_row",
    "grants",
    "hold_pins",
    "insert_allocations",
    "insert_grant",
    "live_grants",
    "move_grant",
    "spendable_grants",
]

grants: Table = GrantRow.__table__  # type: ignore[assignment]
allocations: Table = AllocationRow.__table__  # type: ignore[assignment]


#: A reference names at most one grant per user and origin.
GRANT_REFERENCE = unique_constraint(grants, "user_id", "origin", "reference")

_P_USER = bindparam("p_user_id", type_=grants.c.user_id.type)
_P_NOW = bindparam("p_now", type_=Timestamp)


def _locking(conn: Connection, stmt: Any) -> Any:
    # On MariaDB a plain read would see the transaction's snapshot, which may
    # predate the account lock; a locking read sees the latest committed rows.
    if conn.dialect.name in ("mysql", "mariadb"):
        return stmt.with_for_update()
    return stmt


_SPENDABLE = select(grants).where(
    grants.c.user_id == _P_USER,
    grants.c.status == "active",
    grants.c.remaining_units > 0,
    or_(grants.c.expires_at.is_(None), grants.c.expires_at > _P_NOW),
)


_SPENDABLE_PLAIN = PreparedStatement(_SPENDABLE)
_SPENDABLE_LOCKING = PreparedStatement(_SPENDABLE.with_for_update())


def spendable_grants(conn: Connection, user_id: str, now: datetime) -> list[Any]:
    """The user's active grants with something unheld at ``now`` (read after
    the account lock; a locking read on MariaDB, whose plain reads see the
    transaction's snapshot)."""
    mysql = conn.dialect.name in ("mysql", "mariadb")
    stmt = _SPENDABLE_LOCKING if mysql else _SPENDABLE_PLAIN
    return stmt.all(conn, {"p_user_id": user_id, "p_now": now})


def live_grants(conn: Connection, user_id: str) -> list[Any]:
    """Every grant of the user that can still change the balance: scheduled,
    active, or holding something for a pending hold."""
    stmt = select(grants).where(
        grants.c.user_id == user_id,
        or_(grants.c.status.in_(("scheduled", "active")), grants.c.held_units > 0),
    )
    return list(conn.execute(_locking(conn, stmt)).all())


def grant_row(conn: Connection, grant_id: str, *, lock: bool = False) -> Any:
    """One grant by id, or ``None``."""
    stmt = select(grants).where(grants.c.id == grant_id)
    if lock:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def grant_rows(conn: Connection, grant_ids: Iterable[str]) -> list[Any]:
    """The grants with these ids (read after the account lock)."""
    ids = sorted(set(grant_ids))
    if not ids:
        return []
    stmt = select(grants).where(grants.c.id.in_(ids))
    return list(conn.execute(_locking(conn, stmt)).all())


_INSERT_GRANT = PreparedStatement(
    insert(grants), column_keys=[column.name for column in grants.columns]
)


def insert_grant(conn: Connection, values: dict[str, Any]) -> None:
    """Insert a grant row (every column given)."""
    _INSERT_GRANT.rowcount(conn, values)


_P_ID = bindparam("p_grant_id", type_=grants.c.id.type)
_P_REMAINING = bindparam("p_remaining", type_=grants.c.remaining_units.type)
_P_HELD = bindparam("p_held", type_=grants.c.held_units.type)
_MOVE_GRANT = PreparedStatement(
    update(grants)
    .where(
        grants.c.id == _P_ID,
        grants.c.remaining_units + _P_REMAINING >= 0,
        grants.c.held_units + _P_HELD >= 0,
    )
    .values(
        remaining_units=grants.c.remaining_units + _P_REMAINING,
        held_units=grants.c.held_units + _P_HELD,
    )
)


def move_grant(conn: Connection, grant_id: str, remaining: int = 0, held: int = 0) -> None:
    """Add ``remaining`` and ``held`` (signed) to a grant's figures.

    Under the account lock the figures read are the figures written, so a
    refused change means a concurrent writer got past the lock: the
    transaction is run again.
    """
    params = {"p_grant_id": grant_id, "p_remaining": remaining, "p_held": held}
    if _MOVE_GRANT.rowcount(conn, params) != 1:  # pragma: no cover - the lock forbids it
        raise RetryTransaction()


def set_grant(conn: Connection, grant_id: str, **values: Any) -> None:
    """Write a grant's status, ``voided_at``, ``transaction_id`` or figures."""
    conn.execute(update(grants).where(grants.c.id == grant_id).values(**values))


_ALLOCATION_COLUMNS = [column.name for column in allocations.columns if column.name != "id"]
_INSERT_ALLOCATION = PreparedStatement(insert(allocations), column_keys=_ALLOCATION_COLUMNS)


def insert_allocations(
    conn: Connection,
    user_id: str,
    parts: Sequence[tuple[str, int]],
    *,
    entry_id: str | None = None,
    hold_id: str | None = None,
) -> None:
    """Record what one entry drew from (or one hold pinned on) each grant:
    ``parts`` is ``[(grant id, units), …]`` in order (one statement)."""
    rows = [
        {
            "user_id": user_id,
            "entry_id": entry_id,
            "hold_id": hold_id,
            "position": position,
            "grant_id": grant_id,
            "amount_units": units,
        }
        for position, (grant_id, units) in enumerate(parts)
    ]
    if len(rows) == 1:
        _INSERT_ALLOCATION.rowcount(conn, rows[0])
    elif rows:
        conn.execute(insert(allocations), list(rows))


def _grouped(rows: Iterable[Any], key: str) -> dict[str, list[tuple[str, int]]]:
    found: dict[str, list[tuple[str, int]]] = {}
    for row in rows:
        found.setdefault(getattr(row, key), []).append((row.grant_id, int(row.amount_units)))
    return found


def entry_allocations(
    conn: Connection, entry_ids: Iterable[str]
) -> dict[str, list[tuple[str, int]]]:
    """``entry id -> [(grant id, units), …]`` in the order drawn."""
    ids = sorted(set(entry_ids))
    if not ids:
        return {}
    stmt = (
        select(allocations.c.entry_id, allocations.c.grant_id, allocations.c.amount_units)
        .where(allocations.c.entry_id.in_(ids))
        .order_by(allocations.c.entry_id, allocations.c.position)
    )
    return _grouped(conn.execute(stmt).all(), "entry_id")


def hold_pins(conn: Connection, hold_ids: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
    """``hold id -> [(grant id, units), …]`` in the order pinned."""
    ids = sorted(set(hold_ids))
    if not ids:
        return {}
    stmt = (
        select(allocations.c.hold_id, allocations.c.grant_id, allocations.c.amount_units)
        .where(allocations.c.hold_id.in_(ids))
        .order_by(allocations.c.hold_id, allocations.c.position)
    )
    return _grouped(conn.execute(stmt).all(), "hold_id")


def grant_page(
    conn: Connection,
    user_id: str,
    limit: int,
    before: int | None,
) -> list[Any]:
    """The user's grants, newest first (keyset on ``number``)."""
    stmt = select(grants).where(grants.c.user_id == user_id)
    if before is not None:
        stmt = stmt.where(grants.c.number < before)
    return list(conn.execute(stmt.order_by(grants.c.number.desc()).limit(limit)).all())


def grant_by_reference(conn: Connection, user_id: str, reference: str) -> Any:
    """The user's grant made with ``reference`` (``POST /credits/grants``), if any."""
    stmt = select(grants.c.id, grants.c.transaction_id).where(
        grants.c.user_id == user_id, grants.c.origin == "grant", grants.c.reference == reference
    )
    return conn.execute(stmt).first()
