"""The SQL of ledger entries: inserting one, finding one by id or by
reference, and recording what was refunded of a debit.

Like :mod:`.store`, nothing here opens or ends a transaction; every function
takes the connection of the current transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from .constraints import unique_constraint
from .prepared import PreparedStatement
from .store import entries

__all__ = [
    "ENTRY_REFERENCE",
    "add_refunded",
    "entry_by_reference",
    "entry_row",
    "insert_entry",
]

#: The unique constraint that makes a reference credit (or debit) at most once
#: per user and entry type.
ENTRY_REFERENCE = unique_constraint(entries, "user_id", "type", "reference")

_ENTRY_COLUMNS = [column.name for column in entries.columns]
_INSERT_ENTRY = PreparedStatement(insert(entries), column_keys=_ENTRY_COLUMNS)


def insert_entry(conn: Connection, values: dict[str, Any]) -> None:
    """Insert a ledger row."""
    _INSERT_ENTRY.rowcount(conn, values)


def entry_by_reference(conn: Connection, user_id: str, type_: str, reference: str) -> str | None:
    """The id of the user's entry of ``type_`` with ``reference``, if any."""
    stmt = select(entries.c.id).where(
        entries.c.user_id == user_id, entries.c.type == type_, entries.c.reference == reference
    )
    found: str | None = conn.execute(stmt).scalar()
    return found


def entry_row(conn: Connection, entry_id: str, *, lock: bool = False) -> Any:
    stmt = select(entries).where(entries.c.id == entry_id)
    if lock:
        stmt = stmt.with_for_update()
    return conn.execute(stmt).first()


def add_refunded(conn: Connection, entry_id: str, units: int) -> bool:
    """Record ``units`` refunded on a debit entry, never past its amount."""
    stmt = (
        update(entries)
        .where(
            entries.c.id == entry_id,
            entries.c.refunded_units + units <= -entries.c.amount_units,
        )
        .values(refunded_units=entries.c.refunded_units + units)
    )
    return bool(conn.execute(stmt).rowcount == 1)
