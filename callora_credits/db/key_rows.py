"""The SQL of idempotency keys: claim, find, free and prune.

The key's scope is hashed into a fixed-size primary key, which arbitrates
concurrent claims (:mod:`callora_credits.core.idempotency` says how).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select
from sqlalchemy.engine import Connection

from .prepared import PreparedStatement
from .store import idempotency

__all__ = [
    "delete_expired_idempotency",
    "delete_expired_key",
    "find_idempotency",
    "insert_idempotency",
]


_FIND_IDEMPOTENCY = PreparedStatement(
    select(
        idempotency.c.fingerprint,
        idempotency.c.status_code,
        idempotency.c.response_body,
        idempotency.c.expires_at,
    ).where(idempotency.c.key_hash == bindparam("p_key_hash", type_=idempotency.c.key_hash.type))
)


def find_idempotency(conn: Connection, key_hash: str) -> Any:
    """The record of a claimed key, expired or not; a plain (non-locking) read."""
    return _FIND_IDEMPOTENCY.first(conn, {"p_key_hash": key_hash})


_INSERT_IDEMPOTENCY = PreparedStatement(
    insert(idempotency), column_keys=[column.name for column in idempotency.columns]
)


def insert_idempotency(conn: Connection, values: dict[str, Any]) -> None:
    """Claim a key with its response; a duplicate raises ``IntegrityError``."""
    _INSERT_IDEMPOTENCY.rowcount(conn, values)


def delete_expired_idempotency(conn: Connection, now: datetime) -> int:
    """Delete records whose key expired; returns how many."""
    return int(conn.execute(delete(idempotency).where(idempotency.c.expires_at <= now)).rowcount)


def delete_expired_key(conn: Connection, key_hash: str, now: datetime) -> None:
    """Free a key whose record has expired, so it can be claimed again.

    Called only for a record known to exist: a DELETE that matched nothing
    would take a gap lock on MariaDB (REPEATABLE READ) ahead of the account
    row's lock and invert the lock order.
    """
    conn.execute(
        delete(idempotency).where(
            idempotency.c.key_hash == key_hash, idempotency.c.expires_at <= now
        )
    )
