"""The SQL of the hot paths, in SQLAlchemy Core, with the per-engine parts.

Nothing here opens or ends a transaction; :mod:`.unit_of_work` does. Every
function takes the connection of the current transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from .models import Account, GrantRow, HoldRow, IdempotencyRecord, LedgerEntry, Timestamp
from .prepared import PreparedStatement
from .unit_of_work import RetryTransaction

__all__ = [
    "accounts",
    "balance_row",
    "credit",
    "debit",
    "entries",
    "hold",
    "holds",
    "idempotency",
    "insert_account_if_missing",
    "lock_account",
    "release",
]

accounts: Table = Account.__table__  # type: ignore[assignment]
holds: Table = HoldRow.__table__  # type: ignore[assignment]
entries: Table = LedgerEntry.__table__  # type: ignore[assignment]
idempotency: Table = IdempotencyRecord.__table__  # type: ignore[assignment]
_grants: Table = GrantRow.__table__  # type: ignore[assignment]


# The hot statements are built once, with bind parameters: building a
# SQLAlchemy statement costs more CPU than sending it. Names of bind
# parameters differ from column names, which UPDATE … VALUES reserves.
_P_USER = bindparam("p_user_id", type_=accounts.c.user_id.type)
_P_NOW = bindparam("p_now", type_=Timestamp)
_P_UNITS = bindparam("p_units", type_=accounts.c.balance_units.type)
_P_LIMIT = bindparam("p_limit", type_=accounts.c.balance_units.type)


def _grant_sum(expr: Any, *conditions: Any) -> Any:
    return (
        select(func.coalesce(func.sum(expr), 0))
        .where(_grants.c.user_id == _P_USER, *conditions)
        .scalar_subquery()
    )


_NEXT_EXPIRY_AT = (
    select(func.min(_grants.c.expires_at))
    .where(
        _grants.c.user_id == _P_USER,
        _grants.c.status == "active",
        _grants.c.remaining_units > 0,
    )
    .scalar_subquery()
)

_BALANCE_ROW = PreparedStatement(
    select(
        accounts.c.user_id,
        accounts.c.balance_units,
        accounts.c.created_at,
        accounts.c.updated_at,
        accounts.c.next_due_at,
        accounts.c.held_units,
        _grant_sum(
            _grants.c.remaining_units + _grants.c.held_units,
            _grants.c.category == "paid",
            _grants.c.status != "scheduled",
        ).label("paid_units"),
        _grant_sum(
            _grants.c.remaining_units + _grants.c.held_units,
            _grants.c.category == "promotional",
            _grants.c.status != "scheduled",
        ).label("promotional_units"),
        _NEXT_EXPIRY_AT.label("next_expiry_at"),
        _grant_sum(
            _grants.c.remaining_units,
            _grants.c.status == "active",
            _grants.c.remaining_units > 0,
            _grants.c.expires_at == _NEXT_EXPIRY_AT,
        ).label("next_expiry_units"),
    ).where(accounts.c.user_id == _P_USER)
)


def balance_row(conn: Connection, user_id: str) -> Any:
    """The account (its held total included) with its grants' figures as
    written, in one statement; ``None`` if absent. Exact at ``now`` while
    ``next_due_at`` is later: until then no pending hold has expired, so the
    held total is what the live holds reserve."""
    return _BALANCE_ROW.first(conn, {"p_user_id": user_id})


def account_row(conn: Connection, user_id: str) -> Any:
    """The account row as written (no lock), or ``None``."""
    return conn.execute(select(accounts).where(accounts.c.user_id == user_id)).first()


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
    else:  # pragma: no cover - engines the library does not support
        raise RuntimeError(f"callora_credits does not support the {dialect} dialect")


def is_mysql(conn: Connection) -> bool:
    """Whether ``conn`` is on MariaDB/MySQL (no RETURNING, snapshot reads)."""
    return conn.dialect.name in ("mysql", "mariadb")


_LOCK_ACCOUNT = PreparedStatement(
    select(
        accounts.c.balance_units,
        accounts.c.last_seq,
        accounts.c.next_due_at,
        accounts.c.scheduled_units,
        accounts.c.last_grant_number,
    )
    .where(accounts.c.user_id == _P_USER)
    .with_for_update()
)


def lock_account(conn: Connection, user_id: str) -> Any:
    """Lock the account row (``SELECT … FOR UPDATE``) and return it.

    SQLite ignores ``FOR UPDATE``; its units hold the write lock already.
    """
    return _LOCK_ACCOUNT.first(conn, {"p_user_id": user_id})


def _nothing_due() -> ColumnElement[bool]:
    return or_(accounts.c.next_due_at.is_(None), accounts.c.next_due_at > _P_NOW)


_P_RELEASE = bindparam("p_release", type_=accounts.c.held_units.type)

# The guard is on what is available, balance - held, read and changed in the
# one statement that writes the row: the row every engine's write-conflict
# detection (and a Galera cluster's certification) sees, so a hold and a
# charge arriving on two nodes at once cannot both pass it.
_DEBIT = (
    update(accounts)
    .where(
        accounts.c.user_id == _P_USER,
        accounts.c.balance_units - accounts.c.held_units >= _P_UNITS,
        _nothing_due(),
    )
    .values(
        balance_units=accounts.c.balance_units - _P_UNITS,
        last_seq=accounts.c.last_seq + 1,
        updated_at=_P_NOW,
    )
)
_DEBIT_RETURNING = PreparedStatement(
    _DEBIT.returning(accounts.c.balance_units, accounts.c.last_seq)
)
_DEBIT_COUNTED = PreparedStatement(_DEBIT)
# A capture spends ``p_units`` of what a hold reserved and releases the whole
# hold (``p_release``) in one statement: available never drops.
_CAPTURE = (
    update(accounts)
    .where(
        accounts.c.user_id == _P_USER,
        accounts.c.held_units >= _P_RELEASE,
        _nothing_due(),
    )
    .values(
        balance_units=accounts.c.balance_units - _P_UNITS,
        held_units=accounts.c.held_units - _P_RELEASE,
        last_seq=accounts.c.last_seq + 1,
        updated_at=_P_NOW,
    )
)
_CAPTURE_RETURNING = PreparedStatement(
    _CAPTURE.returning(accounts.c.balance_units, accounts.c.last_seq)
)
_CAPTURE_COUNTED = PreparedStatement(_CAPTURE)


def debit(
    conn: Connection, user_id: str, units: int, now: datetime, *, release: int = 0
) -> tuple[int, int] | None:
    """Take ``units`` from the balance unless what is available (balance -
    held) does not cover them.

    With ``release``, the units were reserved by a hold of ``release`` units
    being captured: the hold's whole amount leaves the held total in the same
    statement, and the guard is that it is there to release.

    One conditional relative update that also advances ``last_seq`` and locks
    the row. Returns ``(balance_after, seq)``, or ``None`` when the balance is
    short, the account does not exist, or something is due on it (the caller
    settles and tries again).
    """
    params = {"p_user_id": user_id, "p_units": units, "p_now": now}
    returning, counted = _DEBIT_RETURNING, _DEBIT_COUNTED
    if release:
        params["p_release"] = release
        returning, counted = _CAPTURE_RETURNING, _CAPTURE_COUNTED
    if not is_mysql(conn):
        row = returning.first(conn, params)
        return None if row is None else (int(row[0]), int(row[1]))
    if counted.rowcount(conn, params) != 1:
        return None
    locked = lock_account(conn, user_id)
    assert locked is not None
    return int(locked.balance_units), int(locked.last_seq)


_P_DUE = bindparam("p_due", type_=Timestamp)
_P_GRANTS = bindparam("p_grants", type_=accounts.c.last_grant_number.type)


def _sooner_due(due: Any = _P_DUE) -> Any:
    """The account's next due time, brought forward to ``due`` if sooner
    (``due`` NULL: unchanged)."""
    return case(
        (
            and_(
                due.is_not(None),
                or_(accounts.c.next_due_at.is_(None), accounts.c.next_due_at > due),
            ),
            due,
        ),
        else_=accounts.c.next_due_at,
    )


_HOLD = PreparedStatement(
    update(accounts)
    .where(
        accounts.c.user_id == _P_USER,
        accounts.c.balance_units - accounts.c.held_units >= _P_UNITS,
        _nothing_due(),
    )
    .values(
        held_units=accounts.c.held_units + _P_UNITS,
        next_due_at=_sooner_due(),
    )
)


def hold(conn: Connection, user_id: str, units: int, now: datetime, expires_at: datetime) -> bool:
    """Reserve ``units`` of what is available for a hold expiring at
    ``expires_at``, and bring the next due time forward to it.

    One conditional relative update, which locks the row. ``False`` when what
    is available (balance - held) does not cover ``units``, the account does
    not exist, or something is due on it (the caller settles and tries
    again).
    """
    params = {"p_user_id": user_id, "p_units": units, "p_now": now, "p_due": expires_at}
    return _HOLD.rowcount(conn, params) == 1


def release(conn: Connection, user_id: str, units: int) -> None:
    """Give back ``units`` a hold reserved (under the account's lock; the
    CHECK constraint refuses a held total below zero)."""
    conn.execute(
        update(accounts)
        .where(accounts.c.user_id == user_id)
        .values(held_units=accounts.c.held_units - units)
    )


_CREDITED = (accounts.c.balance_units, accounts.c.last_seq, accounts.c.last_grant_number)


def _upsert_credit(dialect_insert: Any) -> Any:
    ins = dialect_insert(accounts).values(
        user_id=_P_USER,
        balance_units=_P_UNITS,
        last_seq=1,
        created_at=_P_NOW,
        updated_at=_P_NOW,
        next_due_at=_P_DUE,
        scheduled_units=0,
        last_grant_number=_P_GRANTS,
    )
    return ins.on_conflict_do_update(
        index_elements=[accounts.c.user_id],
        set_={
            "balance_units": accounts.c.balance_units + ins.excluded.balance_units,
            "last_seq": accounts.c.last_seq + 1,
            "updated_at": ins.excluded.updated_at,
            "last_grant_number": accounts.c.last_grant_number + _P_GRANTS,
            "next_due_at": _sooner_due(),
        },
        where=and_(
            accounts.c.balance_units + accounts.c.scheduled_units + ins.excluded.balance_units
            <= _P_LIMIT,
            _nothing_due(),
        ),
    ).returning(*_CREDITED)


_UPSERT_CREDIT = {
    "postgresql": PreparedStatement(_upsert_credit(postgresql.insert)),
    "sqlite": PreparedStatement(_upsert_credit(sqlite.insert)),
}
_CREDIT = PreparedStatement(
    update(accounts)
    .where(
        accounts.c.user_id == _P_USER,
        accounts.c.balance_units + accounts.c.scheduled_units + _P_UNITS <= _P_LIMIT,
        _nothing_due(),
    )
    .values(
        balance_units=accounts.c.balance_units + _P_UNITS,
        last_seq=accounts.c.last_seq + 1,
        updated_at=_P_NOW,
        last_grant_number=accounts.c.last_grant_number + _P_GRANTS,
        next_due_at=_sooner_due(),
    )
)


def credit(
    conn: Connection,
    user_id: str,
    units: int,
    max_balance: int,
    now: datetime,
    *,
    grants: int = 0,
    due: datetime | None = None,
) -> tuple[int, int, int] | None:
    """Add ``units`` to the balance, creating the account if needed.

    ``grants`` grant numbers are taken (the new grants' creation order) and
    the next due time is brought forward to ``due``. Returns ``(balance_after,
    seq, last_grant_number)``, or ``None`` when the balance and the scheduled
    grants would pass ``max_balance`` (the caller checks ``units <=
    max_balance`` first) or something is due on the account (the caller
    settles and tries again).
    """
    params = {
        "p_user_id": user_id,
        "p_units": units,
        "p_limit": max_balance,
        "p_now": now,
        "p_due": due,
        "p_grants": grants,
    }
    if not is_mysql(conn):
        upsert = _UPSERT_CREDIT[conn.dialect.name]
        row = upsert.first(conn, params)
        return None if row is None else (int(row[0]), int(row[1]), int(row[2]))
    # MariaDB: a conditional update (which locks the row), then a locking read
    # that tells an absent account from one at its limit.
    applied = _CREDIT.rowcount(conn, params)
    locked = lock_account(conn, user_id)
    if locked is None:
        try:
            conn.execute(
                insert(accounts).values(
                    user_id=user_id,
                    balance_units=units,
                    last_seq=1,
                    created_at=now,
                    updated_at=now,
                    next_due_at=due,
                    scheduled_units=0,
                    last_grant_number=grants,
                )
            )
        except IntegrityError:
            # A concurrent first credit won; run again and take the update path.
            raise RetryTransaction() from None
        return units, 1, grants
    # SQLAlchemy's MySQL dialects count matched rows (CLIENT.FOUND_ROWS), so
    # rowcount says whether the limit condition held.
    if applied != 1:
        return None
    return int(locked.balance_units), int(locked.last_seq), int(locked.last_grant_number)


def settle_account(
    conn: Connection,
    user_id: str,
    *,
    balance_units: int,
    last_seq: int,
    scheduled_units: int,
    next_due_at: datetime | None,
    held_units: int | None,
    now: datetime,
) -> None:
    """Write an account's figures after its due events (under its lock).

    ``held_units`` ``None``: the schema predates the held total (a
    migration's downgrade settles through here)."""
    values: dict[str, Any] = {
        "balance_units": balance_units,
        "last_seq": last_seq,
        "scheduled_units": scheduled_units,
        "next_due_at": next_due_at,
        "updated_at": now,
    }
    if held_units is not None:
        values["held_units"] = held_units
    conn.execute(update(accounts).where(accounts.c.user_id == user_id).values(**values))


def schedule(
    conn: Connection, user_id: str, units: int, max_balance: int, due: datetime
) -> int | None:
    """Count a scheduled grant of ``units`` on the locked account: its number,
    or ``None`` when the balance and the scheduled grants would pass
    ``max_balance``."""
    stmt = (
        update(accounts)
        .where(
            accounts.c.user_id == user_id,
            accounts.c.balance_units + accounts.c.scheduled_units + units <= max_balance,
        )
        .values(
            scheduled_units=accounts.c.scheduled_units + units,
            last_grant_number=accounts.c.last_grant_number + 1,
            next_due_at=_sooner_due(bindparam("p_due", due, type_=Timestamp)),
        )
    )
    if conn.execute(stmt).rowcount != 1:
        return None
    locked = lock_account(conn, user_id)
    return int(locked.last_grant_number)


def unschedule(conn: Connection, user_id: str, units: int) -> None:
    """Stop counting a voided scheduled grant."""
    conn.execute(
        update(accounts)
        .where(accounts.c.user_id == user_id)
        .values(scheduled_units=accounts.c.scheduled_units - units)
    )


def due_accounts(conn: Connection, now: datetime, limit: int) -> list[str]:
    """Users with something due at ``now`` (oldest due first)."""
    stmt = (
        select(accounts.c.user_id)
        .where(accounts.c.next_due_at <= now)
        .order_by(accounts.c.next_due_at)
        .limit(limit)
    )
    return [row.user_id for row in conn.execute(stmt).all()]
