"""The floor the library is measured against: the same SQL, no library code.

The statements below are copied from what ``callora_credits/db/store.py`` emits
on PostgreSQL through SQLAlchemy's psycopg 3 dialect (same text, same casts,
same named parameters), so the database does the same work for both sides
and psycopg's automatic server-side prepare treats them alike. Each operation
runs in its own transaction on a plain psycopg 3 connection: no ORM, no
SQLAlchemy, no ``callora_credits`` import.

Used by ``bench/run.py`` (in process) and ``bench/bare_app.py`` (over HTTP).
"""

from __future__ import annotations

import hashlib
import json
import queue
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

UNITS_PER_USDC = 10_000_000
IDEMPOTENCY_TTL = timedelta(seconds=86400)

# store.debit(): the conditional relative update that locks the account row.
CHARGE_UPDATE = (
    "UPDATE credits SET balance_units=(credits.balance_units - %(balance_units_1)s::BIGINT), "
    "last_seq=(credits.last_seq + %(last_seq_1)s::BIGINT), "
    "updated_at=%(updated_at)s::TIMESTAMP WITHOUT TIME ZONE "
    "WHERE credits.user_id = %(user_id_1)s::VARCHAR "
    "AND credits.balance_units >= %(balance_units_2)s::BIGINT "
    "RETURNING credits.balance_units, credits.last_seq"
)

# store.insert_entry(require_available=now): the ledger row, inserted only if
# balance_after still covers the live holds.
CHARGE_INSERT_ENTRY = (
    "INSERT INTO credits_transactions (id, user_id, seq, type, amount_units, "
    "balance_after_units, reference, description, metadata_json, hold_id, refund_of, "
    "refunded_units, actor_id, created_at) "
    "SELECT %(param_1)s::VARCHAR AS anon_1, %(param_2)s::VARCHAR AS anon_2, "
    "%(param_3)s::BIGINT AS anon_3, %(param_4)s::VARCHAR AS anon_4, "
    "%(param_5)s::BIGINT AS anon_5, %(param_6)s::BIGINT AS anon_6, "
    "%(param_7)s::VARCHAR AS anon_7, %(param_8)s::VARCHAR AS anon_8, "
    "%(param_9)s::VARCHAR AS anon_9, %(param_10)s::VARCHAR AS anon_10, "
    "%(param_11)s::VARCHAR AS anon_11, %(param_12)s::BIGINT AS anon_12, "
    "%(param_13)s::VARCHAR AS anon_13, %(param_14)s::TIMESTAMP WITHOUT TIME ZONE AS anon_14 \n"
    "WHERE %(param_15)s::BIGINT >= (SELECT coalesce(sum(credits_holds.amount_units), "
    "%(coalesce_2)s::INTEGER) AS coalesce_1 \n"
    "FROM credits_holds \n"
    "WHERE credits_holds.user_id = %(user_id_1)s::VARCHAR "
    "AND credits_holds.status = %(status_1)s::VARCHAR "
    "AND credits_holds.expires_at > %(expires_at_1)s::TIMESTAMP WITHOUT TIME ZONE)"
)

# store.insert_idempotency(): the key claimed with the stored response.
CHARGE_INSERT_IDEMPOTENCY = (
    "INSERT INTO credits_idempotency (key_hash, user_id, actor_id, method, path, "
    "idempotency_key, fingerprint, status_code, response_body, created_at, expires_at) "
    "VALUES (%(key_hash)s::VARCHAR, %(user_id)s::VARCHAR, %(actor_id)s::VARCHAR, "
    "%(method)s::VARCHAR, %(path)s::VARCHAR, %(idempotency_key)s::VARCHAR, "
    "%(fingerprint)s::VARCHAR, %(status_code)s::INTEGER, %(response_body)s::VARCHAR, "
    "%(created_at)s::TIMESTAMP WITHOUT TIME ZONE, %(expires_at)s::TIMESTAMP WITHOUT TIME ZONE)"
)

# store.balance_row(): the balance read, held units in a subquery.
BALANCE_SELECT = (
    "SELECT credits.user_id, credits.balance_units, credits.created_at, credits.updated_at, "
    "(SELECT coalesce(sum(credits_holds.amount_units), %(coalesce_2)s::INTEGER) AS coalesce_1 \n"
    "FROM credits_holds \n"
    "WHERE credits_holds.user_id = %(p_user_id)s::VARCHAR "
    "AND credits_holds.status = %(status_1)s::VARCHAR "
    "AND credits_holds.expires_at > %(p_now)s::TIMESTAMP WITHOUT TIME ZONE) "
    "AS held_units \n"
    "FROM credits \n"
    "WHERE credits.user_id = %(p_user_id)s::VARCHAR"
)

# store.insert_account_if_missing(): only for a first read (not benchmarked).
ACCOUNT_INSERT = (
    "INSERT INTO credits (user_id, balance_units, last_seq, created_at, updated_at) "
    "VALUES (%(user_id)s::VARCHAR, %(balance_units)s::BIGINT, %(last_seq)s::BIGINT, "
    "%(created_at)s::TIMESTAMP WITHOUT TIME ZONE, %(updated_at)s::TIMESTAMP WITHOUT TIME ZONE) "
    "ON CONFLICT DO NOTHING"
)

_HISTORY_COLUMNS = (
    "SELECT credits_transactions.id, credits_transactions.user_id, credits_transactions.seq, "
    "credits_transactions.type, credits_transactions.amount_units, "
    "credits_transactions.balance_after_units, credits_transactions.reference, "
    "credits_transactions.description, credits_transactions.metadata_json, "
    "credits_transactions.hold_id, credits_transactions.refund_of, "
    "credits_transactions.refunded_units, credits_transactions.actor_id, "
    "credits_transactions.created_at \n"
    "FROM credits_transactions \n"
    "WHERE credits_transactions.user_id = %(user_id_1)s::VARCHAR "
)

# Ledger.history(): keyset pagination on seq (the first page has no seq bound).
HISTORY_KEYSET_FIRST = (
    _HISTORY_COLUMNS + "ORDER BY credits_transactions.seq DESC \n LIMIT %(param_1)s::INTEGER"
)
HISTORY_KEYSET_AFTER = (
    _HISTORY_COLUMNS + "AND credits_transactions.seq < %(seq_1)s::BIGINT "
    "ORDER BY credits_transactions.seq DESC \n LIMIT %(param_1)s::INTEGER"
)
# The contrast: what OFFSET pagination would cost at the same depth.
HISTORY_OFFSET = (
    _HISTORY_COLUMNS + "ORDER BY credits_transactions.seq DESC \n"
    " LIMIT %(param_1)s::INTEGER OFFSET %(param_2)s::INTEGER"
)


class InsufficientCredits(Exception):
    """The balance (or what the holds leave of it) does not cover the charge."""


def utcnow_naive() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def format_units(units: int) -> str:
    sign = "-" if units < 0 else ""
    whole, fraction = divmod(abs(units), UNITS_PER_USDC)
    return f"{sign}{whole}.{fraction:07d}"


def iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def fingerprint(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def connect(dsn: str) -> psycopg.Connection[Any]:
    """A plain psycopg 3 connection (transactions opened implicitly, as SQLAlchemy's)."""
    return psycopg.connect(dsn, autocommit=False)


def read_balance_row(conn: psycopg.Connection[Any], user_id: str) -> tuple[Any, ...]:
    """The balance read: one SELECT in its own transaction (three on a first read).

    Returns ``(user_id, balance_units, created_at, updated_at, held_units)``.
    """
    now = utcnow_naive()
    params = {"coalesce_2": 0, "status_1": "pending", "p_now": now, "p_user_id": user_id}
    try:
        row = conn.execute(BALANCE_SELECT, params).fetchone()
        if row is None:
            conn.execute(
                ACCOUNT_INSERT,
                {
                    "user_id": user_id,
                    "balance_units": 0,
                    "last_seq": 0,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            row = conn.execute(BALANCE_SELECT, params).fetchone()
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    assert row is not None
    return tuple(row)


def balance_json(row: tuple[Any, ...]) -> dict[str, Any]:
    """The balance as ``GET /credits`` shows it."""
    user_id, balance, created_at, updated_at, held = row
    return {
        "user_id": user_id,
        "balance_usdc": format_units(balance),
        "held_usdc": format_units(int(held)),
        "available_usdc": format_units(balance - int(held)),
        "created_at": iso(created_at),
        "updated_at": iso(updated_at),
    }


def charge(
    conn: psycopg.Connection[Any],
    user_id: str,
    units: int,
    *,
    actor_id: str = "",
    method: str = "CALL",
    path: str = "ledger.charge",
    key: str | None = None,
    request_fingerprint: str | None = None,
) -> tuple[dict[str, Any], bytes]:
    """A charge: the three statements of the library, in one transaction.

    Returns the entry and the stored response body. Raises
    ``psycopg.errors.UniqueViolation`` when the idempotency key is taken.
    """
    now = utcnow_naive()
    key = key if key is not None else "auto:" + uuid.uuid4().hex
    if request_fingerprint is None:
        request_fingerprint = fingerprint({"user_id": user_id, "amount_units": units})
    try:
        row = conn.execute(
            CHARGE_UPDATE,
            {
                "balance_units_1": units,
                "last_seq_1": 1,
                "updated_at": now,
                "user_id_1": user_id,
                "balance_units_2": units,
            },
        ).fetchone()
        if row is None:
            raise InsufficientCredits()
        balance_after, seq = row
        entry = {
            "id": "ctx_" + secrets.token_hex(12),
            "user_id": user_id,
            "seq": seq,
            "type": "charge",
            "amount_usdc": format_units(-units),
            "balance_after_usdc": format_units(balance_after),
            "reference": None,
            "description": None,
            "metadata": {},
            "hold_id": None,
            "refund_of": None,
            "refunded_usdc": "0.0000000",
            "actor_id": actor_id or None,
            "created_at": iso(now),
        }
        inserted = conn.execute(
            CHARGE_INSERT_ENTRY,
            {
                "param_1": entry["id"],
                "param_2": user_id,
                "param_3": seq,
                "param_4": "charge",
                "param_5": -units,
                "param_6": balance_after,
                "param_7": None,
                "param_8": None,
                "param_9": "{}",
                "param_10": None,
                "param_11": None,
                "param_12": 0,
                "param_13": actor_id or None,
                "param_14": now,
                "param_15": balance_after,
                "coalesce_2": 0,
                "user_id_1": user_id,
                "status_1": "pending",
                "expires_at_1": now,
            },
        ).rowcount
        if inserted != 1:
            raise InsufficientCredits()
        body = dumps(entry)
        scope = "\x00".join((actor_id, method, path, key))
        conn.execute(
            CHARGE_INSERT_IDEMPOTENCY,
            {
                "key_hash": hashlib.sha256(scope.encode()).hexdigest(),
                "user_id": user_id,
                "actor_id": actor_id,
                "method": method,
                "path": path,
                "idempotency_key": key,
                "fingerprint": request_fingerprint,
                "status_code": 201,
                "response_body": body.decode(),
                "created_at": now,
                "expires_at": now + IDEMPOTENCY_TTL,
            },
        )
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    return entry, body


class SmallPool:
    """A fixed set of psycopg connections handed out last-in first-out.

    Enough for the bare view (one connection per worker thread); a connection
    that broke is replaced on its way back.
    """

    def __init__(self, dsn: str, size: int) -> None:
        self.dsn = dsn
        self._idle: queue.LifoQueue[psycopg.Connection[Any]] = queue.LifoQueue()
        for _ in range(size):
            self._idle.put(connect(dsn))

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._idle.get(timeout=30)
        try:
            yield conn
        finally:
            if conn.closed or conn.broken:
                conn = connect(self.dsn)
            self._idle.put(conn)
