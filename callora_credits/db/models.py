"""The library's tables, on its own metadata.

The tables never reference host tables: ``user_id`` is a plain string, so the
host may keep its users anywhere (or nowhere). Identifier columns compare byte
for byte on every engine (MariaDB tables use ``utf8mb4_nopad_bin``), so ``Alice``
and ``alice`` are two users.

Timestamps are stored as naive UTC with microseconds (MariaDB ``DATETIME(6)``)
and turned into aware UTC datetimes when read.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Account",
    "AllocationRow",
    "Base",
    "GrantRow",
    "HoldRow",
    "IdempotencyRecord",
    "LedgerEntry",
    "metadata",
]

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: Naive UTC with microseconds on every engine.
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
#: JSON documents (metadata, stored responses); MariaDB TEXT stops at 64 KiB.
Document = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

USER_ID_LENGTH = 128
ID_LENGTH = 32
REFERENCE_LENGTH = 255

_MARIADB_TABLE = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_nopad_bin"}


class Base(DeclarativeBase):
    """Declarative base of the library's models (not the host's)."""

    metadata = metadata


class Account(Base):
    """One user's balance; the row every balance change locks first."""

    __tablename__ = "credits"
    __table_args__ = (
        CheckConstraint("balance_units >= 0", name="balance_nonnegative"),
        CheckConstraint("last_seq >= 0", name="last_seq_nonnegative"),
        CheckConstraint("held_units >= 0", name="held_nonnegative"),
        CheckConstraint("held_units <= balance_units", name="held_within_balance"),
        _MARIADB_TABLE,
    )

    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), primary_key=True)
    balance_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    #: The ``seq`` of the user's newest ledger entry, advanced in the same
    #: statement that changes the balance.
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    #: No later than the account's next due event (a hold's expiry, a
    #: scheduled grant's start, a grant's expiry); ``None``: nothing is due.
    #: An operation that finds it passed settles what is due first.
    next_due_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: The sum of the account's scheduled grants, counted by the balance limit.
    scheduled_units: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    #: The ``number`` of the account's newest grant (creation order).
    last_grant_number: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")
    #: What the pending holds reserve, as written: the sum of the grants'
    #: held parts. Every hold, capture, release and hold expiry changes it in
    #: the statement that guards the balance, so available (balance - held)
    #: is checked and changed on this one row.
    held_units: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default="0")


class LedgerEntry(Base):
    """An append-only ledger entry; only ``refunded_units`` ever changes."""

    __tablename__ = "credits_transactions"
    __table_args__ = (
        UniqueConstraint("user_id", "seq"),
        UniqueConstraint("user_id", "type", "reference"),
        # Usage sums and time-bounded history read one user's range of entries.
        Index("ix_credits_transactions_user_id_created_at", "user_id", "created_at"),
        CheckConstraint(
            "type IN ('topup', 'charge', 'refund', 'hold_capture', 'adjustment',"
            " 'grant', 'expiration', 'void')",
            name="type_known",
        ),
        CheckConstraint("balance_after_units >= 0", name="balance_after_nonnegative"),
        CheckConstraint("refunded_units >= 0", name="refunded_nonnegative"),
        _MARIADB_TABLE,
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    type: Mapped[str] = mapped_column(String(16), nullable=False)
    amount_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance_after_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reference: Mapped[str | None] = mapped_column(String(REFERENCE_LENGTH))
    description: Mapped[str | None] = mapped_column(String(500))
    metadata_json: Mapped[str] = mapped_column(Document, nullable=False)
    hold_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    refund_of: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    refunded_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    actor_id: Mapped[str | None] = mapped_column(String(USER_ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    #: The one grant a ``topup``, ``grant``, positive ``adjustment``,
    #: ``expiration`` or ``void`` entry is about.
    grant_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))


class GrantRow(Base):
    """A grant: credit that entered (or will enter) a balance, and what is
    left of it. ``status`` is as last written; reads derive the status at an
    instant from it and the grant's times."""

    __tablename__ = "credits_grants"
    __table_args__ = (
        UniqueConstraint("user_id", "number"),
        UniqueConstraint("user_id", "origin", "reference"),
        Index("ix_credits_grants_user_id_status", "user_id", "status"),
        CheckConstraint("category IN ('paid', 'promotional')", name="category_known"),
        CheckConstraint(
            "status IN ('scheduled', 'active', 'expired', 'voided')", name="status_known"
        ),
        CheckConstraint(
            "origin IN ('topup', 'grant', 'adjustment', 'refund', 'migration')",
            name="origin_known",
        ),
        CheckConstraint("amount_units > 0", name="amount_positive"),
        CheckConstraint(
            "remaining_units >= 0 AND held_units >= 0"
            " AND remaining_units + held_units <= amount_units",
            name="parts_within_amount",
        ),
        CheckConstraint("priority >= 0 AND priority <= 100", name="priority_range"),
        _MARIADB_TABLE,
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), nullable=False)
    #: Creation order within the user: 1, 2, 3...
    number: Mapped[int] = mapped_column(BigInteger, nullable=False)
    category: Mapped[str] = mapped_column(String(16), nullable=False)
    origin: Mapped[str] = mapped_column(String(16), nullable=False)
    amount_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    remaining_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    held_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    priority: Mapped[int] = mapped_column(Integer, nullable=False)
    effective_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    voided_at: Mapped[datetime | None] = mapped_column(Timestamp)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reference: Mapped[str | None] = mapped_column(String(REFERENCE_LENGTH))
    description: Mapped[str | None] = mapped_column(String(500))
    metadata_json: Mapped[str] = mapped_column(Document, nullable=False)
    transaction_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    actor_id: Mapped[str | None] = mapped_column(String(USER_ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)


class AllocationRow(Base):
    """What one entry drew from (or gave back to) one grant, or what one hold
    pinned on it: exactly one of ``entry_id`` and ``hold_id`` is set.
    ``position`` is the order drawn (or pinned)."""

    __tablename__ = "credits_allocations"
    __table_args__ = (
        UniqueConstraint("entry_id", "position"),
        UniqueConstraint("hold_id", "position"),
        Index("ix_credits_allocations_grant_id", "grant_id"),
        CheckConstraint("amount_units > 0", name="amount_positive"),
        CheckConstraint("(entry_id IS NULL) <> (hold_id IS NULL)", name="entry_or_hold"),
        _MARIADB_TABLE,
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), nullable=False)
    entry_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    hold_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    grant_id: Mapped[str] = mapped_column(String(ID_LENGTH), nullable=False)
    amount_units: Mapped[int] = mapped_column(BigInteger, nullable=False)


class HoldRow(Base):
    """A two-phase reservation against a user's balance."""

    __tablename__ = "credits_holds"
    __table_args__ = (
        UniqueConstraint("user_id", "reference"),
        Index("ix_credits_holds_user_id_status_expires_at", "user_id", "status", "expires_at"),
        Index("ix_credits_holds_user_id_created_at", "user_id", "created_at"),
        CheckConstraint(
            "status IN ('pending', 'captured', 'released', 'expired')",
            name="status_known",
        ),
        CheckConstraint("amount_units > 0", name="amount_positive"),
        CheckConstraint(
            "captured_units >= 0 AND captured_units <= amount_units",
            name="captured_within_amount",
        ),
        _MARIADB_TABLE,
    )

    id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    amount_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    captured_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    resolved_at: Mapped[datetime | None] = mapped_column(Timestamp)
    transaction_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    reference: Mapped[str | None] = mapped_column(String(REFERENCE_LENGTH))
    metadata_json: Mapped[str] = mapped_column(Document, nullable=False)
    actor_id: Mapped[str | None] = mapped_column(String(USER_ID_LENGTH))


class IdempotencyRecord(Base):
    """A claimed Idempotency-Key and the response it produced.

    ``key_hash`` is the SHA-256 of (caller, method, path, key): the key's
    scope in a fixed-size primary key, which arbitrates concurrent claims.
    ``user_id`` is the target account, so the row shards with the money it
    moved.
    """

    __tablename__ = "credits_idempotency"
    __table_args__ = (
        Index("ix_credits_idempotency_expires_at", "expires_at"),
        _MARIADB_TABLE,
    )

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(USER_ID_LENGTH))
    actor_id: Mapped[str] = mapped_column(String(USER_ID_LENGTH), nullable=False)
    method: Mapped[str] = mapped_column(String(8), nullable=False)
    path: Mapped[str] = mapped_column(String(512), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(255), nullable=False)
    fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    status_code: Mapped[int] = mapped_column(Integer, nullable=False)
    response_body: Mapped[str] = mapped_column(Document, nullable=False)
    created_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(Timestamp, nullable=False)
