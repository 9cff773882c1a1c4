"""The usage summary's one statement: a user's entries summed per UTC hour or
day, and the debits of the burn window, with the per-engine bucket expression.

Timestamps are stored as naive UTC, so truncating them needs no time zone:
PostgreSQL's ``date_trunc`` on a ``timestamp without time zone``, SQLite's
``strftime`` and MariaDB's ``DATE_FORMAT`` all work on the stored value, whatever
the session's or the host process's zone.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, literal_column, null, or_, select, union_all
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from .store import entries

__all__ = ["CREDIT_TYPES", "DEBIT_TYPES", "EXPIRY_TYPES", "BucketSums", "usage_sums"]

#: Per bucket start (naive UTC): debited, credited and expired units, and the
#: number of entries.
BucketSums = dict[datetime, tuple[int, int, int, int]]

#: Entry types summed as debited (with negative adjustments), credited (with
#: positive adjustments) and expired. Types are matched by name, so a type the
#: database does not hold yet simply sums to zero.
DEBIT_TYPES = ("charge", "hold_capture")
CREDIT_TYPES = ("topup", "grant", "refund")
EXPIRY_TYPES = ("expiration", "void")

_TEXT_FORMATS = {"hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}


def _bucket(dialect: str, granularity: str) -> ColumnElement[Any]:
    """The start of the bucket an entry falls in, computed by the engine.

    The granularity is written into the SQL, not bound: the select list and
    the GROUP BY must be the same expression, and two bound parameters would
    be two expressions to PostgreSQL.
    """
    if granularity not in _TEXT_FORMATS:
        raise ValueError(
            f"granularity must be one of {sorted(_TEXT_FORMATS)}, not {granularity!r}"
        )
    created = entries.c.created_at
    if dialect == "postgresql":
        return func.date_trunc(literal_column(f"'{granularity}'"), created)
    text_format: ColumnElement[str] = literal_column(f"'{_TEXT_FORMATS[granularity]}'")
    if dialect == "sqlite":
        return func.strftime(text_format, created)
    if dialect not in ("mysql", "mariadb"):  # pragma: no cover - engines not supported
        raise RuntimeError(f"callora_credits does not support the {dialect} dialect")
    return func.date_format(created, text_format)


def _debited() -> ColumnElement[Any]:
    t = entries.c
    is_debit = or_(t.type.in_(DEBIT_TYPES), (t.type == "adjustment") & (t.amount_units < 0))
    return func.coalesce(func.sum(case((is_debit, -t.amount_units), else_=0)), 0)


def _credited() -> ColumnElement[Any]:
    t = entries.c
    is_credit = or_(t.type.in_(CREDIT_TYPES), (t.type == "adjustment") & (t.amount_units > 0))
    return func.coalesce(func.sum(case((is_credit, t.amount_units), else_=0)), 0)


def _expired() -> ColumnElement[Any]:
    t = entries.c
    return func.coalesce(func.sum(case((t.type.in_(EXPIRY_TYPES), -t.amount_units), else_=0)), 0)


def usage_statement(
    dialect: str,
    user_id: str,
    since: datetime,
    until: datetime,
    granularity: str,
    burn_since: datetime,
) -> Any:
    """One statement: a row per non-empty bucket of ``[since, until)``, then
    one row (its bucket ``NULL``) with the debits written from ``burn_since`` on.

    Both parts read one user's entries by a ``created_at`` range, which an
    index on ``(user_id, created_at)`` serves.
    """
    t = entries.c
    bucket = _bucket(dialect, granularity)
    per_bucket = (
        select(
            bucket.label("bucket"),
            _debited().label("debited"),
            _credited().label("credited"),
            _expired().label("expired"),
            func.count().label("entries"),
        )
        .where(t.user_id == user_id, t.created_at >= since, t.created_at < until)
        .group_by(bucket)
    )
    burn = select(
        null().label("bucket"),
        _debited().label("debited"),
        literal_column("0").label("credited"),
        literal_column("0").label("expired"),
        func.count().label("entries"),
    ).where(t.user_id == user_id, t.created_at >= burn_since)
    return union_all(per_bucket, burn)


def _bucket_start(value: Any) -> datetime:
    """A bucket as the engine returned it (a timestamp, or text) as naive UTC."""
    if isinstance(value, datetime):
        stamp: datetime = value if value.tzinfo is None else value.astimezone(timezone.utc)
        return stamp.replace(tzinfo=None)
    if isinstance(value, bytes):
        value = value.decode("ascii")
    return datetime.strptime(str(value), "%Y-%m-%d %H:%M:%S")


def usage_sums(
    conn: Connection,
    user_id: str,
    since: datetime,
    until: datetime,
    granularity: str,
    burn_since: datetime,
) -> tuple[BucketSums, int]:
    """The user's non-empty buckets in ``[since, until)`` (naive UTC), and the
    units debited from ``burn_since`` on, read in one statement."""
    stmt = usage_statement(conn.dialect.name, user_id, since, until, granularity, burn_since)
    rows = conn.execute(stmt).all()
    buckets: BucketSums = {}
    burn = 0
    for row in rows:
        sums = (int(row.debited), int(row.credited), int(row.expired), int(row.entries))
        if row.bucket is None:
            burn = sums[0]
        else:
            buckets[_bucket_start(row.bucket)] = sums
    return buckets, burn
