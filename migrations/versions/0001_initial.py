"""The initial schema: accounts, ledger, holds, idempotency keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Timestamp = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
Document = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")
MARIADB = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_nopad_bin"}


def upgrade() -> None:
    op.create_table(
        "credits",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("balance_units", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_credits")),
        sa.CheckConstraint("balance_units >= 0", name=op.f("ck_credits_balance_nonnegative")),
        sa.CheckConstraint("last_seq >= 0", name=op.f("ck_credits_last_seq_nonnegative")),
        **MARIADB,
    )
    op.create_table(
        "credits_transactions",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("balance_after_units", sa.BigInteger(), nullable=False),
        sa.Column("reference", sa.String(255), nullable=True),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("metadata_json", Document, nullable=False),
        sa.Column("hold_id", sa.String(32), nullable=True),
        sa.Column("refund_of", sa.String(32), nullable=True),
        sa.Column("refunded_units", sa.BigInteger(), nullable=False),
        sa.Column("actor_id", sa.String(128), nullable=True),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credits_transactions")),
        sa.UniqueConstraint("user_id", "seq", name=op.f("uq_credits_transactions_user_id_seq")),
        sa.UniqueConstraint(
            "user_id",
            "type",
            "reference",
            name=op.f("uq_credits_transactions_user_id_type_reference"),
        ),
        sa.CheckConstraint(
            "type IN ('topup', 'charge', 'refund', 'hold_capture', 'adjustment')",
            name=op.f("ck_credits_transactions_type_known"),
        ),
        sa.CheckConstraint(
            "balance_after_units >= 0",
            name=op.f("ck_credits_transactions_balance_after_nonnegative"),
        ),
        sa.CheckConstraint(
            "refunded_units >= 0", name=op.f("ck_credits_transactions_refunded_nonnegative")
        ),
        **MARIADB,
    )
    op.create_table(
        "credits_holds",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("amount_units", sa.BigInteger(), nullable=False),
        sa.Column("captured_units", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("resolved_at", Timestamp, nullable=True),
        sa.Column("transaction_id", sa.String(32), nullable=True),
        sa.Column("reference", sa.String(255), nullable=True),
        sa.Column("metadata_json", Document, nullable=False),
        sa.Column("actor_id", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credits_holds")),
        sa.UniqueConstraint(
            "user_id", "reference", name=op.f("uq_credits_holds_user_id_reference")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'captured', 'released', 'expired')",
            name=op.f("ck_credits_holds_status_known"),
        ),
        sa.CheckConstraint("amount_units > 0", name=op.f("ck_credits_holds_amount_positive")),
        sa.CheckConstraint(
            "captured_units >= 0 AND captured_units <= amount_units",
            name=op.f("ck_credits_holds_captured_within_amount"),
        ),
        **MARIADB,
    )
    op.create_index(
        "ix_credits_holds_user_id_status_expires_at",
        "credits_holds",
        ["user_id", "status", "expires_at"],
    )
    op.create_index(
        "ix_credits_holds_user_id_created_at", "credits_holds", ["user_id", "created_at"]
    )
    op.create_table(
        "credits_idempotency",
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=True),
        sa.Column("actor_id", sa.String(128), nullable=False),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_body", Document, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("key_hash", name=op.f("pk_credits_idempotency")),
        **MARIADB,
    )
    op.create_index("ix_credits_idempotency_expires_at", "credits_idempotency", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_credits_idempotency_expires_at", table_name="credits_idempotency")
    op.drop_table("credits_idempotency")
    op.drop_index("ix_credits_holds_user_id_created_at", table_name="credits_holds")
    op.drop_index("ix_credits_holds_user_id_status_expires_at", table_name="credits_holds")
    op.drop_table("credits_holds")
    op.drop_table("credits_transactions")
    op.drop_table("credits")
