"""Credit grants: grants and allocations tables; balances become grants.

Every account with a positive balance gets one ``paid`` grant without expiry
holding that balance, its live pending holds pinned to it. Pending holds
already past their expiry are marked ``expired``.

The downgrade writes every due event, folds the ``grant``, ``expiration``
and ``void`` entries back into ``adjustment`` entries (their signed amounts
already sum to the balance) and drops what ``0001`` did not have: expiry,
categories and scheduled grants are lost.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Document = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
MARIADB = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_nopad_bin"}

OLD_ENTRY_TYPES = "type IN ('topup', 'charge', 'refund', 'hold_capture', 'adjustment')"
NEW_ENTRY_TYPES = (
    "type IN ('topup', 'charge', 'refund', 'hold_capture', 'adjustment',"
    " 'grant', 'expiration', 'void')"
)
GRANT_ENTRY_TYPES = ("grant", "expiration", "void")

#: Accounts read (and grants written) per round trip: memory stays flat
#: however many accounts there are.
BATCH_SIZE = 500

# The tables as this revision sees them, for the data migration (never the
# models, which move on with later revisions).
accounts = sa.table(
    "credits",
    sa.column("user_id", sa.String),
    sa.column("balance_units", sa.BigInteger),
    sa.column("created_at", Timestamp),
    sa.column("next_due_at", Timestamp),
    sa.column("last_grant_number", sa.BigInteger),
)
entries = sa.table(
    "credits_transactions",
    sa.column("user_id", sa.String),
    sa.column("seq", sa.BigInteger),
    sa.column("type", sa.String),
    sa.column("reference", sa.String),
)
holds = sa.table(
    "credits_holds",
    sa.column("id", sa.String),
    sa.column("user_id", sa.String),
    sa.column("status", sa.String),
    sa.column("amount_units", sa.BigInteger),
    sa.column("expires_at", Timestamp),
    sa.column("resolved_at", Timestamp),
)
grants = sa.table(
    "credits_grants",
    sa.column("id", sa.String),
    sa.column("user_id", sa.String),
    sa.column("number", sa.BigInteger),
    sa.column("category", sa.String),
    sa.column("origin", sa.String),
    sa.column("amount_units", sa.BigInteger),
    sa.column("remaining_units", sa.BigInteger),
    sa.column("held_units", sa.BigInteger),
    sa.column("priority", sa.Integer),
    sa.column("effective_at", Timestamp),
    sa.column("expires_at", Timestamp),
    sa.column("voided_at", Timestamp),
    sa.column("status", sa.String),
    sa.column("reference", sa.String),
    sa.column("description", sa.String),
    sa.column("metadata_json", Document),
    sa.column("transaction_id", sa.String),
    sa.column("actor_id", sa.String),
    sa.column("created_at", Timestamp),
)
allocations = sa.table(
    "credits_allocations",
    sa.column("user_id", sa.String),
    sa.column("entry_id", sa.String),
    sa.column("hold_id", sa.String),
    sa.column("position", sa.Integer),
    sa.column("grant_id", sa.String),
    sa.column("amount_units", sa.BigInteger),
)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def upgrade() -> None:
    conn = op.get_bind()
    now = _utcnow()
    # Before any DDL: MariaDB commits each ALTER, so a refusal must come
    # while the database is still untouched.
    _refuse_overheld_accounts(conn, now)
    _create_schema()
    _fold_balances_into_grants(conn, now)


def downgrade() -> None:
    conn = op.get_bind()
    # Writes every event due by now (hold expiries, activations, expiries)
    # with its ledger entry, so what is folded back is the balance of now.
    # The library that ships this revision has the code that does it; the
    # held total on the account row came later and is gone by now.
    from callora_credits.core.settlement import settle_all

    settle_all(conn, _utcnow(), held_total=False)
    _fold_grant_entries_into_adjustments(conn)
    _drop_schema()


def _create_schema() -> None:
    with op.batch_alter_table("credits") as batch:
        batch.add_column(sa.Column("next_due_at", Timestamp, nullable=True))
        batch.add_column(
            sa.Column("scheduled_units", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("last_grant_number", sa.BigInteger(), nullable=False, server_default="0")
        )
    # SQLite cannot alter a CHECK constraint: batch mode rebuilds the table
    # there (a copy of the ledger); the other engines alter it in place.
    with op.batch_alter_table("credits_transactions") as batch:
        batch.add_column(sa.Column("grant_id", sa.String(32), nullable=True))
        batch.drop_constraint(op.f("ck_credits_transactions_type_known"), type_="check")
        batch.create_check_constraint(op.f("ck_credits_transactions_type_known"), NEW_ENTRY_TYPES)
    op.create_table(
        "credits_grants",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("number", sa.BigInteger(), nullable=False),
        sa.Column("category", sa.String(16), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("remaining_units", sa.BigInteger(), nullable=False),
        sa.Column("held_units", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("effective_at", Timestamp, nullable=False),
        sa.Column("expires_at", Timestamp, nullable=True),
        sa.Column("voided_at", Timestamp, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reference", sa.String(255), nullable=True),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("metadata_json", Document, nullable=False),
        sa.Column("transaction_id", sa.String(32), nullable=True),
        sa.Column("actor_id", sa.String(128), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credits_grants")),
        sa.UniqueConstraint("user_id", "number", name=op.f("uq_credits_grants_user_id_number")),
        sa.UniqueConstraint(
            "user_id",
            "origin",
            "reference",
            name=op.f("uq_credits_grants_user_id_origin_reference"),
        ),
        sa.CheckConstraint(
            "category IN ('paid', 'promotional')", name=op.f("ck_credits_grants_category_known")
        ),
        sa.CheckConstraint(
            "status IN ('scheduled', 'active', 'expired', 'voided')",
            name=op.f("ck_credits_grants_status_known"),
        ),
        sa.CheckConstraint(
            "origin IN ('topup', 'grant', 'adjustment', 'refund', 'migration')",
            name=op.f("ck_credits_grants_origin_known"),
        ),
        sa.CheckConstraint("amount_units > 0", name=op.f("ck_credits_grants_amount_positive")),
        sa.CheckConstraint(
            "remaining_units >= 0 AND held_units >= 0"
            " AND remaining_units + held_units <= amount_units",
            name=op.f("ck_credits_grants_parts_within_amount"),
        ),
        sa.CheckConstraint(
            "priority >= 0 AND priority <= 100", name=op.f("ck_credits_grants_priority_range")
        ),
        **MARIADB,
    )
    op.create_index("ix_credits_grants_user_id_status", "credits_grants", ["user_id", "status"])
    op.create_table(
        "credits_allocations",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=True),
        sa.Column("hold_id", sa.String(32), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("grant_id", sa.String(32), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credits_allocations")),
        sa.UniqueConstraint(
            "entry_id", "position", name=op.f("uq_credits_allocations_entry_id_position")
        ),
        sa.UniqueConstraint(
            "hold_id", "position", name=op.f("uq_credits_allocations_hold_id_position")
        ),
        sa.CheckConstraint(
            "amount_units > 0", name=op.f("ck_credits_allocations_amount_positive")
        ),
        sa.CheckConstraint(
            "(entry_id IS NULL) <> (hold_id IS NULL)",
            name=op.f("ck_credits_allocations_entry_or_hold"),
        ),
        **MARIADB,
    )
    op.create_index("ix_credits_allocations_grant_id", "credits_allocations", ["grant_id"])
    # Usage sums and time-bounded history read one user's range of entries.
    op.create_index(
        "ix_credits_transactions_user_id_created_at",
        "credits_transactions",
        ["user_id", "created_at"],
    )


def _drop_schema() -> None:
    op.drop_index("ix_credits_transactions_user_id_created_at", table_name="credits_transactions")
    op.drop_index("ix_credits_allocations_grant_id", table_name="credits_allocations")
    op.drop_table("credits_allocations")
    op.drop_index("ix_credits_grants_user_id_status", table_name="credits_grants")
    op.drop_table("credits_grants")
    with op.batch_alter_table("credits_transactions") as batch:
        batch.drop_constraint(op.f("ck_credits_transactions_type_known"), type_="check")
        batch.create_check_constraint(op.f("ck_credits_transactions_type_known"), OLD_ENTRY_TYPES)
        batch.drop_column("grant_id")
    with op.batch_alter_table("credits") as batch:
        batch.drop_column("last_grant_number")
        batch.drop_column("scheduled_units")
        batch.drop_column("next_due_at")


def _live_holds(now: datetime) -> sa.ColumnElement[bool]:
    return sa.and_(holds.c.status == "pending", holds.c.expires_at > now)


def _refuse_overheld_accounts(conn: sa.Connection, now: datetime) -> None:
    """Stop if live holds exceed a balance: no grant could carry them.

    The ``0001`` code never lets this happen; a database edited by hand might.
    """
    held = (
        sa.select(holds.c.user_id, sa.func.sum(holds.c.amount_units).label("held_units"))
        .where(_live_holds(now))
        .group_by(holds.c.user_id)
        .subquery()
    )
    balance = sa.func.coalesce(accounts.c.balance_units, 0)
    overheld = conn.execute(
        sa.select(held.c.user_id, held.c.held_units, balance)
        .select_from(held.outerjoin(accounts, accounts.c.user_id == held.c.user_id))
        .where(held.c.held_units > balance)
        .order_by(held.c.user_id)
        .limit(10)
    ).all()
    if overheld:
        listed = "; ".join(
            f"user {user_id!r}: {held_units} units held, balance {balance_units}"
            for user_id, held_units, balance_units in overheld
        )
        raise RuntimeError(
            "callora_credits migration 0002 stopped: pending holds exceed the balance "
            f"of these accounts ({listed}). Release those holds or correct the balances, "
            "then run the upgrade again; nothing was changed."
        )


def _fold_balances_into_grants(conn: sa.Connection, now: datetime) -> None:
    """One ``paid`` grant per positive balance, its live holds pinned to it."""
    # An expired pending hold no longer counted; say so in its status, as of
    # the instant it expired.
    conn.execute(
        holds.update()
        .where(holds.c.status == "pending", holds.c.expires_at <= now)
        .values(status="expired", resolved_at=holds.c.expires_at)
    )

    # Every pending hold left is live. Per account, what its holds pin.
    held = sa.func.coalesce(
        sa.select(sa.func.sum(holds.c.amount_units))
        .where(holds.c.user_id == accounts.c.user_id, holds.c.status == "pending")
        .scalar_subquery(),
        0,
    )
    after: str | None = None
    while True:
        page = (
            sa.select(
                accounts.c.user_id,
                accounts.c.balance_units,
                accounts.c.created_at,
                held.label("held_units"),
            )
            .where(accounts.c.balance_units > 0)
            .order_by(accounts.c.user_id)
            .limit(BATCH_SIZE)
        )
        if after is not None:
            page = page.where(accounts.c.user_id > after)
        rows = conn.execute(page).all()
        if not rows:
            break
        conn.execute(grants.insert(), [_grant(row, now) for row in rows])
        after = rows[-1].user_id

    pinned = sa.select(
        holds.c.user_id,
        sa.null(),
        holds.c.id,
        sa.literal(0, sa.Integer),
        grants.c.id,
        holds.c.amount_units,
    ).select_from(
        holds.join(
            grants, sa.and_(grants.c.user_id == holds.c.user_id, grants.c.origin == "migration")
        )
    )
    conn.execute(
        allocations.insert().from_select(
            ["user_id", "entry_id", "hold_id", "position", "grant_id", "amount_units"],
            pinned.where(holds.c.status == "pending"),
        )
    )

    conn.execute(accounts.update().where(accounts.c.balance_units > 0).values(last_grant_number=1))
    soonest_expiry = (
        sa.select(sa.func.min(holds.c.expires_at))
        .where(holds.c.user_id == accounts.c.user_id, holds.c.status == "pending")
        .scalar_subquery()
    )
    has_pending = (
        sa.select(holds.c.id)
        .where(holds.c.user_id == accounts.c.user_id, holds.c.status == "pending")
        .exists()
    )
    conn.execute(accounts.update().where(has_pending).values(next_due_at=soonest_expiry))


def _grant(account: Any, now: datetime) -> dict[str, Any]:
    held_units = int(account.held_units)
    return {
        "id": "grant_" + secrets.token_hex(12),
        "user_id": account.user_id,
        "number": 1,
        "category": "paid",
        "origin": "migration",
        "amount_units": account.balance_units,
        "remaining_units": account.balance_units - held_units,
        "held_units": held_units,
        "priority": 50,
        "effective_at": account.created_at,
        "expires_at": None,
        "voided_at": None,
        "status": "active",
        "reference": None,
        "description": None,
        "metadata_json": "{}",
        "transaction_id": None,
        "actor_id": None,
        "created_at": now,
    }


def _fold_grant_entries_into_adjustments(conn: sa.Connection) -> None:
    """``grant``, ``expiration`` and ``void`` entries become ``adjustment``s.

    References are unique per user and type: a converted entry whose
    reference an adjustment of the same user already has (or an earlier
    converted entry will have) loses its reference.
    """
    other = entries.alias("other")
    taken = (
        sa.select(other.c.seq)
        .where(
            other.c.user_id == entries.c.user_id,
            other.c.reference == entries.c.reference,
            sa.or_(
                other.c.type == "adjustment",
                sa.and_(other.c.type.in_(GRANT_ENTRY_TYPES), other.c.seq < entries.c.seq),
            ),
        )
        .exists()
    )
    conn.execute(
        entries.update()
        .where(entries.c.type.in_(GRANT_ENTRY_TYPES), entries.c.reference.is_not(None), taken)
        .values(reference=None)
    )
    conn.execute(
        entries.update().where(entries.c.type.in_(GRANT_ENTRY_TYPES)).values(type="adjustment")
    )
