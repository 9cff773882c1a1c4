"""The SQL of the hot paths, in SQLAlchemy Core, with the per-engine parts.

Nothing here opens or ends a transaction; :mod:`.unit_of_work` does. Every
function takes the connection of the current transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Table,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from .models import Account, HoldRow, IdempotencyRecord, LedgerEntry, Timestamp
from .prepared import PreparedStatement
from .unit_of_work import RetryTransaction

__all__ = [
    "ENTRY_REFERENCE",
    "HOLD_REFERENCE",
    "accounts",
    "balance_row",
    "credit",
    "debit",
    "entries",
    "find_idempotency",
    "held_units_expr",
    "holds",
    "idempotency",
    "insert_account_if_missing",
    "insert_entry",
    "insert_idempotency",
    "lock_account",
    "violates",
]

accounts: Table = Account.__table__  # type: ignore[assignment]
holds: Table = HoldRow.__table__  # type: ignore[assignment]
entries: Table = LedgerEntry.__table__  # type: ignore[assignment]
idempotency: Table = IdempotencyRecord.__table__  # type: ignore[assignment]


def _unique(table: Table, *columns: str) -> UniqueConstraint:
    for constraint in table.constraints:
        if isinstance(constraint, UniqueConstraint) and [
            c.name for c in constraint.columns
        ] == list(columns):
            return constraint
    raise LookupError(f"{table.name} has no unique constraint on {columns}")  # pragma: no cover


#: The unique constraints that make a reference credit (or hold) at most once.
ENTRY_REFERENCE = _unique(entries, "user_id", "type", "reference")
HOLD_REFERENCE = _unique(holds, "user_id", "reference")


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


# The hot statements are built once, with bind parameters: building a
# SQLAlchemy statement costs more CPU than sending it. Names of bind
# parameters differ from column names, which UPDATE … VALUES reserves.
_P_USER = bindparam("p_user_id", type_=accounts.c.user_id.type)
_P_NOW = bindparam("p_now", type_=Timestamp)
_P_UNITS = bindparam("p_units", type_=accounts.c.balance_units.type)
_P_LIMIT = bindparam("p_limit", type_=accounts.c.balance_units.type)

_BALANCE_ROW = PreparedStatement(
    select(
        accounts.c.user_id,
        accounts.c.balance_units,
        accounts.c.created_at,
        accounts.c.updated_at,
        held_units_expr(_P_USER, _P_NOW).label("held_units"),  # type: ignore[arg-type]
    ).where(accounts.c.user_id == _P_USER)
)


def balance_row(conn: Connection, user_id: str, now: datetime) -> Any:
    """The account with its held units, in one statement; ``None`` if absent."""
    return _BALANCE_ROW.first(conn, {"p_user_id": user_id, "p_now": now})


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


def _is_mysql(conn: Connection) -> bool:
    return conn.dialect.name in ("mysql", "mariadb")


_LOCK_ACCOUNT = PreparedStatement(
    select(accounts.c.balance_units, accounts.c.last_seq)
    .where(accounts.c.user_id == _P_USER)
    .with_for_update()
)


def lock_account(conn: Connection, user_id: str) -> Any:
    """Lock the account row (``SELECT … FOR UPDATE``) and return it.

    SQLite ignores ``FOR UPDATE``; its units hold the write lock already.
    """
    return _LOCK_ACCOUNT.first(conn, {"p_user_id": user_id})


_DEBIT = (
    update(accounts)
    .where(accounts.c.user_id == _P_USER, accounts.c.balance_units >= _P_UNITS)
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


def debit(conn: Connection, user_id: str, units: int, now: datetime) -> tuple[int, int] | None:
    """Take ``units`` from the balance unless it would go below zero.

    One conditional relative update that also advances ``last_seq`` and locks
    the row. Returns ``(balance_after, seq)``, or ``None`` when the balance is
    short or the account does not exist.
    """
    params = {"p_user_id": user_id, "p_units": units, "p_now": now}
    if not _is_mysql(conn):
        row = _DEBIT_RETURNING.first(conn, params)
        return None if row is None else (int(row[0]), int(row[1]))
    if _DEBIT_COUNTED.rowcount(conn, params) != 1:
        return None
    locked = lock_account(conn, user_id)
    assert locked is not None
    return int(locked.balance_units), int(locked.last_seq)


def _upsert_credit(dialect_insert: Any) -> Any:
    ins = dialect_insert(accounts).values(
        user_id=_P_USER, balance_units=_P_UNITS, last_seq=1, created_at=_P_NOW, updated_at=_P_NOW
    )
    return ins.on_conflict_do_update(
        index_elements=[accounts.c.user_id],
        set_={
            "balance_units": accounts.c.balance_units + ins.excluded.balance_units,
            "last_seq": accounts.c.last_seq + 1,
            "updated_at": ins.excluded.updated_at,
        },
        where=accounts.c.balance_units + ins.excluded.balance_units <= _P_LIMIT,
    ).returning(accounts.c.balance_units, accounts.c.last_seq)


_UPSERT_CREDIT = {
    "postgresql": PreparedStatement(_upsert_credit(postgresql.insert)),
    "sqlite": PreparedStatement(_upsert_credit(sqlite.insert)),
}
_CREDIT = PreparedStatement(
    update(accounts)
    .where(accounts.c.user_id == _P_USER, accounts.c.balance_units + _P_UNITS <= _P_LIMIT)
    .values(
        balance_units=accounts.c.balance_units + _P_UNITS,
        last_seq=accounts.c.last_seq + 1,
        updated_at=_P_NOW,
    )
)


def credit(
    conn: Connection, user_id: str, units: int, max_balance: int, now: datetime
) -> tuple[int, int] | None:
    """Add ``units`` to the balance, creating the account if needed.

    Returns ``(balance_after, seq)``, or ``None`` when the balance would pass
    ``max_balance`` (the caller checks ``units <= max_balance`` first).
    """
    params = {"p_user_id": user_id, "p_units": units, "p_limit": max_balance, "p_now": now}
    if not _is_mysql(conn):
        upsert = _UPSERT_CREDIT[conn.dialect.name]
        row = upsert.first(conn, params)
        return None if row is None else (int(row.balance_units), int(row.last_seq))
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
                )
            )
        except IntegrityError:
            # A concurrent first credit won; run again and take the update path.
            raise RetryTransaction() from None
        return units, 1
    # SQLAlchemy's MySQL dialects count matched rows (CLIENT.FOUND_ROWS), so
    # rowcount says whether the limit condition held.
    return (int(locked.balance_units), int(locked.last_seq)) if applied == 1 else None


_ENTRY_COLUMNS = [column.name for column in entries.columns]
_INSERT_ENTRY = PreparedStatement(insert(entries), column_keys=_ENTRY_COLUMNS)
_GUARDED_INSERT_ENTRY = PreparedStatement(
    insert(entries)
    .from_select(
        _ENTRY_COLUMNS,
        select(
            *[bindparam(f"v_{name}", type_=entries.c[name].type) for name in _ENTRY_COLUMNS]
        ).where(
            bindparam("v_balance_after_units", type_=entries.c.balance_after_units.type)
            >= held_units_expr(
                bindparam("v_user_id", type_=entries.c.user_id.type),
                _P_NOW,  # type: ignore[arg-type]
            )
        ),
    )
    # rowcount of an INSERT is only kept on request (Connection.execute).
    .execution_options(preserve_rowcount=True)
)


def insert_entry(
    conn: Connection, values: dict[str, Any], *, require_available: datetime | None = None
) -> bool:
    """Insert a ledger row; ``False`` when the guard refused it.

    With ``require_available=now``, the row is inserted only if its
    ``balance_after_units`` still covers the user's live holds at ``now``: the
    available-balance check of a debit, made in a new statement after the
    debit locked the account, so it sees every hold committed before the lock.
    """
    if require_available is None:
        _INSERT_ENTRY.rowcount(conn, values)
        return True
    params = {f"v_{name}": value for name, value in values.items()}
    params["p_now"] = require_available
    return _GUARDED_INSERT_ENTRY.rowcount(conn, params) == 1


def entry_by_reference(conn: Connection, user_id: str, type_: str, reference: str) -> str | None:
    """The id of the user's entry of ``type_`` with ``reference``, if any."""
    stmt = select(entries.c.id).where(
        entries.c.user_id == user_id, entries.c.type == type_, entries.c.reference == reference
    )
    found: str | None = conn.execute(stmt).scalar()
    return found


def hold_by_reference(conn: Connection, user_id: str, reference: str) -> str | None:
    """The id of the user's hold with ``reference``, if any."""
    stmt = select(holds.c.id).where(holds.c.user_id == user_id, holds.c.reference == reference)
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


def held_units(conn: Connection, user_id: str, now: datetime) -> int:
    """Sum of the user's live holds, read after the account row is locked.

    On MariaDB a locking read, so REPEATABLE READ's snapshot cannot hide a
    hold committed before the lock was taken.
    """
    stmt = select(held_units_expr(user_id, now))
    if _is_mysql(conn):
        stmt = (
            select(func.coalesce(func.sum(holds.c.amount_units), 0))
            .where(
                holds.c.user_id == user_id,
                holds.c.status == "pending",
                holds.c.expires_at > now,
            )
            .with_for_update(read=True)
        )
    return int(conn.execute(stmt).scalar_one())


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


def expire_holds(conn: Connection, now: datetime) -> int:
    stmt = (
        update(holds)
        .where(holds.c.status == "pending", holds.c.expires_at <= now)
        .values(status="expired", resolved_at=now)
    )
    return int(conn.execute(stmt).rowcount)
