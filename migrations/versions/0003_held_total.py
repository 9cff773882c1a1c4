"""The held total on the account row.

``credits.held_units`` is what the account's pending holds reserve, as
written (a pending hold past its expiry counts until its expiry is written,
like the grants' held parts it equals). It is filled from the pending holds,
and two CHECK constraints keep it between zero and the balance, so a hold, a
charge and a capture are guarded by one conditional update of the account
row: the row every engine's write-conflict detection, and a Galera cluster's
certification, sees.

The upgrade refuses, changing nothing, when an account's pending holds
reserve more than its balance. The downgrade drops the column and its
constraints; the grants' held parts still say what is held.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# The tables as this revision sees them (never the models, which move on).
accounts = sa.table(
    "credits",
    sa.column("user_id", sa.String),
    sa.column("balance_units", sa.BigInteger),
    sa.column("held_units", sa.BigInteger),
)
holds = sa.table(
    "credits_holds",
    sa.column("user_id", sa.String),
    sa.column("status", sa.String),
    sa.column("amount_units", sa.BigInteger),
)


def _pending_sum() -> sa.ScalarSelect[int]:
    """Per account, what its pending holds reserve (expired or not: a hold
    stays pending, and its pins stay on its grants, until its expiry is
    written)."""
    return sa.func.coalesce(
        sa.select(sa.func.sum(holds.c.amount_units))
        .where(holds.c.user_id == accounts.c.user_id, holds.c.status == "pending")
        .scalar_subquery(),
        0,
    )


def upgrade() -> None:
    conn = op.get_bind()
    # Before any DDL: MariaDB commits each ALTER, so a refusal must come
    # while the database is still untouched.
    _refuse_overheld_accounts(conn)
    # SQLite cannot add a CHECK constraint in place: batch mode rebuilds the
    # table there; the other engines alter it.
    with op.batch_alter_table("credits") as batch:
        batch.add_column(
            sa.Column("held_units", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.create_check_constraint(op.f("ck_credits_held_nonnegative"), "held_units >= 0")
        batch.create_check_constraint(
            op.f("ck_credits_held_within_balance"), "held_units <= balance_units"
        )
    has_pending = (
        sa.select(holds.c.user_id)
        .where(holds.c.user_id == accounts.c.user_id, holds.c.status == "pending")
        .exists()
    )
    conn.execute(accounts.update().where(has_pending).values(held_units=_pending_sum()))


def downgrade() -> None:
    with op.batch_alter_table("credits") as batch:
        batch.drop_constraint(op.f("ck_credits_held_within_balance"), type_="check")
        batch.drop_constraint(op.f("ck_credits_held_nonnegative"), type_="check")
        batch.drop_column("held_units")


def _refuse_overheld_accounts(conn: sa.Connection) -> None:
    """Stop if an account's pending holds reserve more than its balance.

    The library never lets this happen; a database edited by hand might.
    """
    held = _pending_sum()
    overheld = conn.execute(
        sa.select(accounts.c.user_id, held.label("held_units"), accounts.c.balance_units)
        .where(held > accounts.c.balance_units)
        .order_by(accounts.c.user_id)
        .limit(10)
    ).all()
    if overheld:
        listed = "; ".join(
            f"user {user_id!r}: {held_units} units held, balance {balance_units}"
            for user_id, held_units, balance_units in overheld
        )
        raise RuntimeError(
            "callora_credits migration 0003 stopped: pending holds exceed the balance "
            f"of these accounts ({listed}). Release those holds or correct the balances, "
            "then run the upgrade again; nothing was changed."
        )
