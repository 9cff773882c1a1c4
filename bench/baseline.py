"""The floor the library is measured against: the same SQL, no library code.

The statements below are copied from what ``callora_credits/db/store.py`` and
``callora_credits/db/grant_rows.py`` emit on PostgreSQL through SQLAlchemy's
psycopg 3 dialect (same text, same casts, same named parameters), so the
database does the same work for both sides. Neither side prepares
statements on the server: the library's connections have psycopg's
``prepare_threshold`` set to ``None`` (unless ``CREDITS_PG_PREPARED_STATEMENTS``
is on), and so have the baseline's. Each operation runs in its own
transaction on a plain psycopg 3 connection: no ORM, no SQLAlchemy, no
``callora_credits`` import.

A charge is six statements: the conditional account update, the read of the
user's spendable grants, the update of each grant drawn (one, for the
benchmark's charges), the ledger row, its allocation row, and the
idempotency record. A balance read is one statement.

Used by ``bench/run.py`` (in process) and ``bench/bare_app.py`` (over HTTP).
"""

from __future__ import annotations

import hashlib
import json
import queue
import secrets
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import psycopg

UNITS_PER_USDC = 10_000_000
IDEMPOTENCY_TTL = timedelta(seconds=86400)

# store.debit(): the conditional relative update that locks the account row;
# its guard is what is available (balance - held, the held total on the row);
# it matches nothing while an event (an expiry, a hold's expiry, a scheduled
# grant) is due on the account.
CHARGE_UPDATE = (
    "UPDATE credits SET balance_units=(credits.balance_units - %(p_units)s::BIGINT), "
    "last_seq=(credits.last_seq + %(last_seq_1)s::BIGINT), "
    "updated_at=%(p_now)s::TIMESTAMP WITHOUT TIME ZONE "
    "WHERE credits.user_id = %(p_user_id)s::VARCHAR "
    "AND credits.balance_units - credits.held_units >= %(p_units)s::BIGINT "
    "AND (credits.next_due_at IS NULL "
    "OR credits.next_due_at > %(p_now)s::TIMESTAMP WITHOUT TIME ZONE) "
    "RETURNING credits.balance_units, credits.last_seq"
)

_GRANT_COLUMNS = (
    "id",
    "user_id",
    "number",
    "category",
    "origin",
    "amount_units",
    "remaining_units",
    "held_units",
    "priority",
    "effective_at",
    "expires_at",
    "voided_at",
    "status",
    "reference",
    "description",
    "metadata_json",
    "transaction_id",
    "actor_id",
    "created_at",
)
# Positions in a row of SPENDABLE_GRANTS.
_ID, _NUMBER, _CATEGORY, _REMAINING, _PRIORITY, _EFFECTIVE, _EXPIRES = (
    _GRANT_COLUMNS.index(name)
    for name in (
        "id",
        "number",
        "category",
        "remaining_units",
        "priority",
        "effective_at",
        "expires_at",
    )
)

# grant_rows.spendable_grants(): after the account lock, the user's active
# grants with something unheld; the order is chosen in Python.
SPENDABLE_GRANTS = (
    "SELECT "
    + ", ".join(f"credits_grants.{column}" for column in _GRANT_COLUMNS)
    + " \nFROM credits_grants \n"
    "WHERE credits_grants.user_id = %(p_user_id)s::VARCHAR "
    "AND credits_grants.status = %(status_1)s::VARCHAR "
    "AND credits_grants.remaining_units > %(remaining_units_1)s::BIGINT "
    "AND (credits_grants.expires_at IS NULL "
    "OR credits_grants.expires_at > %(p_now)s::TIMESTAMP WITHOUT TIME ZONE)"
)

# grant_rows.move_grant(): one grant's figures, changed relatively and guarded.
MOVE_GRANT = (
    "UPDATE credits_grants "
    "SET remaining_units=(credits_grants.remaining_units + %(p_remaining)s::BIGINT), "
    "held_units=(credits_grants.held_units + %(p_held)s::BIGINT) "
    "WHERE credits_grants.id = %(p_grant_id)s::VARCHAR "
    "AND credits_grants.remaining_units + %(p_remaining)s::BIGINT >= %(param_1)s::BIGINT "
    "AND credits_grants.held_units + %(p_held)s::BIGINT >= %(param_2)s::BIGINT"
)

# entry_rows.insert_entry(): the ledger row.
INSERT_ENTRY = (
    "INSERT INTO credits_transactions (id, user_id, seq, type, amount_units, "
    "balance_after_units, reference, description, metadata_json, hold_id, refund_of, "
    "refunded_units, actor_id, created_at, grant_id) "
    "VALUES (%(id)s::VARCHAR, %(user_id)s::VARCHAR, %(seq)s::BIGINT, %(type)s::VARCHAR, "
    "%(amount_units)s::BIGINT, %(balance_after_units)s::BIGINT, %(reference)s::VARCHAR, "
    "%(description)s::VARCHAR, %(metadata_json)s::VARCHAR, %(hold_id)s::VARCHAR, "
    "%(refund_of)s::VARCHAR, %(refunded_units)s::BIGINT, %(actor_id)s::VARCHAR, "
    "%(created_at)s::TIMESTAMP WITHOUT TIME ZONE, %(grant_id)s::VARCHAR)"
)

# grant_rows.insert_allocations() with one row: what the entry drew from a grant.
INSERT_ALLOCATION = (
    "INSERT INTO credits_allocations (user_id, entry_id, hold_id, position, grant_id, "
    "amount_units) "
    "VALUES (%(user_id)s::VARCHAR, %(entry_id)s::VARCHAR, %(hold_id)s::VARCHAR, "
    "%(position)s::INTEGER, %(grant_id)s::VARCHAR, %(amount_units)s::BIGINT) "
    "RETURNING credits_allocations.id"
)

# key_rows.insert_idempotency(): the key claimed with the stored response.
INSERT_IDEMPOTENCY = (
    "INSERT INTO credits_idempotency (key_hash, user_id, actor_id, method, path, "
    "idempotency_key, fingerprint, status_code, response_body, created_at, expires_at) "
    "VALUES (%(key_hash)s::VARCHAR, %(user_id)s::VARCHAR, %(actor_id)s::VARCHAR, "
    "%(method)s::VARCHAR, %(path)s::VARCHAR, %(idempotency_key)s::VARCHAR, "
    "%(fingerprint)s::VARCHAR, %(status_code)s::INTEGER, %(response_body)s::VARCHAR, "
    "%(created_at)s::TIMESTAMP WITHOUT TIME ZONE, %(expires_at)s::TIMESTAMP WITHOUT TIME ZONE)"
)

#: A charge drawing from one grant, in the order sent.
CHARGE_STATEMENTS = (
    CHARGE_UPDATE,
    SPENDABLE_GRANTS,
    MOVE_GRANT,
    INSERT_ENTRY,
    INSERT_ALLOCATION,
    INSERT_IDEMPOTENCY,
)

_ACTIVE_UNHELD = (
    "\nFROM credits_grants \n"
    "WHERE credits_grants.user_id = %(p_user_id)s::VARCHAR "
    "AND credits_grants.status = %(status_{n})s::VARCHAR "
    "AND credits_grants.remaining_units > %(remaining_units_{m})s::BIGINT"
)
_NEXT_EXPIRY_AT = "(SELECT min(credits_grants.expires_at) AS min_1 " + _ACTIVE_UNHELD.format(
    n=3, m=1
)

# store.balance_row(): the balance read: the held total from the account
# row, the grants' figures in subqueries.
BALANCE_SELECT = (
    "SELECT credits.user_id, credits.balance_units, credits.created_at, "
    "credits.updated_at, credits.next_due_at, credits.held_units, "
    "(SELECT coalesce(sum(credits_grants.remaining_units + credits_grants.held_units), "
    "%(coalesce_2)s::INTEGER) AS coalesce_1 \nFROM credits_grants \n"
    "WHERE credits_grants.user_id = %(p_user_id)s::VARCHAR "
    "AND credits_grants.category = %(category_1)s::VARCHAR "
    "AND credits_grants.status != %(status_1)s::VARCHAR) AS paid_units, "
    "(SELECT coalesce(sum(credits_grants.remaining_units + credits_grants.held_units), "
    "%(coalesce_4)s::INTEGER) AS coalesce_3 \nFROM credits_grants \n"
    "WHERE credits_grants.user_id = %(p_user_id)s::VARCHAR "
    "AND credits_grants.category = %(category_2)s::VARCHAR "
    "AND credits_grants.status != %(status_2)s::VARCHAR) AS promotional_units, "
    + _NEXT_EXPIRY_AT
    + ") AS next_expiry_at, "
    "(SELECT coalesce(sum(credits_grants.remaining_units), %(coalesce_6)s::INTEGER) "
    "AS coalesce_5 " + _ACTIVE_UNHELD.format(n=4, m=2) + " "
    "AND credits_grants.expires_at = " + _NEXT_EXPIRY_AT + ")) AS next_expiry_units \n"
    "FROM credits \n"
    "WHERE credits.user_id = %(p_user_id)s::VARCHAR"
)
_BALANCE_PARAMS = {
    "coalesce_2": 0,
    "category_1": "paid",
    "status_1": "scheduled",
    "coalesce_4": 0,
    "category_2": "promotional",
    "status_2": "scheduled",
    "status_3": "active",
    "remaining_units_1": 0,
    "coalesce_6": 0,
    "status_4": "active",
    "remaining_units_2": 0,
}

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
    "credits_transactions.created_at, credits_transactions.grant_id \n"
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


class SomethingDue(Exception):
    """An event fell due on the account and is not yet written.

    The library writes it (or, for a read, counts it) first; the benchmark's
    accounts have nothing due, so the floor leaves that work out.
    """


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
    """A plain psycopg 3 connection (transactions opened implicitly, as SQLAlchemy's)
    that never prepares statements on the server, as the library's."""
    conn = psycopg.connect(dsn, autocommit=False)
    conn.prepare_threshold = None
    return conn


def read_balance_row(conn: psycopg.Connection[Any], user_id: str) -> tuple[Any, ...]:
    """The balance read: one SELECT in its own transaction (three on a first read).

    Returns ``(user_id, balance_units, created_at, updated_at, next_due_at,
    held_units, paid_units, promotional_units, next_expiry_at,
    next_expiry_units)``. Raises :class:`SomethingDue` when an event fell
    due on the account.
    """
    now = utcnow_naive()
    params = {**_BALANCE_PARAMS, "p_user_id": user_id}
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
    next_due_at = row[4]
    if next_due_at is not None and next_due_at <= now:
        raise SomethingDue(user_id)
    return tuple(row)


def balance_json(row: tuple[Any, ...]) -> dict[str, Any]:
    """The balance as ``GET /credits`` shows it."""
    user_id, balance, created_at, updated_at, _, held, paid, promotional = row[:8]
    expiry_at, expiry_units = row[8], row[9]
    return {
        "user_id": user_id,
        "balance_usdc": format_units(balance),
        "held_usdc": format_units(int(held)),
        "available_usdc": format_units(balance - int(held)),
        "paid_usdc": format_units(int(paid)),
        "promotional_usdc": format_units(int(promotional)),
        "next_expiry": None
        if expiry_at is None
        else {"at": iso(expiry_at), "amount_usdc": format_units(int(expiry_units))},
        "created_at": iso(created_at),
        "updated_at": iso(updated_at),
    }


def _consumption_key(grant: Sequence[Any]) -> tuple[Any, ...]:
    # Priority ascending, the soonest expiry (none last), promotional before
    # paid, then the effective time and the creation order.
    expires_at = grant[_EXPIRES]
    return (
        grant[_PRIORITY],
        expires_at is None,
        expires_at or datetime.min,
        grant[_CATEGORY] != "promotional",
        grant[_EFFECTIVE],
        grant[_NUMBER],
    )


def draw(grants: Sequence[Sequence[Any]], units: int) -> list[tuple[str, int]] | None:
    """``[(grant id, units), …]`` a debit of ``units`` takes, in consumption
    order; ``None`` when the grants' unheld remaining does not cover it."""
    taken = []
    left = units
    for grant in sorted(grants, key=_consumption_key):
        part = min(grant[_REMAINING], left)
        taken.append((grant[_ID], part))
        left -= part
        if left == 0:
            return taken
    return None


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
    """A charge: the statements of the library, in one transaction.

    Returns the entry and the stored response body. Raises
    :class:`InsufficientCredits` when the balance or the grants' unheld
    remaining is short (or, as the library before it settles, when something
    is due), and ``psycopg.errors.UniqueViolation`` when the idempotency key
    is taken.
    """
    now = utcnow_naive()
    key = key if key is not None else "auto:" + uuid.uuid4().hex
    if request_fingerprint is None:
        # As the Python API fingerprints a call: every argument of the operation.
        request_fingerprint = fingerprint(
            {
                "actor_id": actor_id or None,
                "user_id": user_id,
                "amount_units": units,
                "reference": None,
                "description": None,
                "metadata": {},
            }
        )
    try:
        row = conn.execute(
            CHARGE_UPDATE,
            {"p_units": units, "last_seq_1": 1, "p_now": now, "p_user_id": user_id},
        ).fetchone()
        if row is None:
            raise InsufficientCredits()
        balance_after, seq = row
        grants = conn.execute(
            SPENDABLE_GRANTS,
            {"p_user_id": user_id, "status_1": "active", "remaining_units_1": 0, "p_now": now},
        ).fetchall()
        draws = draw(grants, units)
        if draws is None:
            raise InsufficientCredits()
        for grant_id, part in draws:
            moved = conn.execute(
                MOVE_GRANT,
                {
                    "p_remaining": -part,
                    "p_held": 0,
                    "p_grant_id": grant_id,
                    "param_1": 0,
                    "param_2": 0,
                },
            ).rowcount
            if moved != 1:
                raise RuntimeError(f"grant {grant_id} changed under the account lock")
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
            "grant_id": None,
            "allocations": [
                {"grant_id": grant_id, "amount_usdc": format_units(part)}
                for grant_id, part in draws
            ],
            "actor_id": actor_id or None,
            "created_at": iso(now),
        }
        conn.execute(
            INSERT_ENTRY,
            {
                "id": entry["id"],
                "user_id": user_id,
                "seq": seq,
                "type": "charge",
                "amount_units": -units,
                "balance_after_units": balance_after,
                "reference": None,
                "description": None,
                "metadata_json": "{}",
                "hold_id": None,
                "refund_of": None,
                "refunded_units": 0,
                "actor_id": actor_id or None,
                "created_at": now,
                "grant_id": None,
            },
        )
        # The library sends several allocation rows in one executemany; the
        # benchmark's charges draw from one grant, one statement on both sides.
        for position, (grant_id, part) in enumerate(draws):
            conn.execute(
                INSERT_ALLOCATION,
                {
                    "user_id": user_id,
                    "entry_id": entry["id"],
                    "hold_id": None,
                    "position": position,
                    "grant_id": grant_id,
                    "amount_units": part,
                },
            )
        body = dumps(entry)
        scope = "\x00".join((actor_id, method, path, key))
        conn.execute(
            INSERT_IDEMPOTENCY,
            {
                "key_hash": hashlib.sha256(scope.encode()).hexdigest(),
                "user_id": user_id,
                "actor_id": actor_id,
                "method": method,
                "path": path,
                "idempotency_key": key,
                "fingerprint": request_fingerprint,
                # The Python API stores 0 with the entry; HTTP stores 201.
                "status_code": 0 if method == "CALL" else 201,
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
