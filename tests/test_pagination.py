"""Keyset pagination: no duplicate and no gap while entries are written."""

from __future__ import annotations

import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.errors import InsufficientCredits


def test_walk_a_thousand_entries_while_new_ones_arrive(app, client, auth, user_id):
    with app.app_context():
        ledger = current_ledger()
        engine = ledger.engine
        with engine.begin() as conn:  # a long history, written directly and fast
            from callora_credits.db.grant_rows import grants
            from callora_credits.db.store import accounts, entries

            now = ledger._now()
            conn.execute(
                accounts.insert().values(
                    user_id=user_id, balance_units=1000, last_seq=1000,
                    created_at=now, updated_at=now, last_grant_number=1,
                )
            )  # fmt: skip
            # As the grants migration leaves an older history: one paid grant.
            conn.execute(
                grants.insert().values(
                    id=f"grant_{user_id[-12:]}", user_id=user_id, number=1,
                    category="paid", origin="migration", amount_units=1000,
                    remaining_units=1000, held_units=0, priority=50,
                    effective_at=now, status="active", metadata_json="{}",
                    created_at=now,
                )
            )  # fmt: skip
            conn.execute(
                entries.insert(),
                [
                    {
                        "id": f"ctx_{user_id[-12:]}{seq:08d}",
                        "user_id": user_id,
                        "seq": seq,
                        "type": "topup",
                        "amount_units": 1,
                        "balance_after_units": seq,
                        "reference": None,
                        "description": None,
                        "metadata_json": "{}",
                        "hold_id": None,
                        "refund_of": None,
                        "refunded_units": 0,
                        "actor_id": None,
                        "created_at": now,
                    }
                    for seq in range(1, 1001)
                ],
            )
    headers = auth(user_id)
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        url = "/api/billing/credits/transactions?limit=100"
        if cursor:
            url += f"&cursor={cursor}"
        page = client.get(url, headers=headers).json
        pages += 1
        seen += [entry["seq"] for entry in page["data"]]
        with app.app_context():
            current_ledger().top_up(user_id, 1)  # new entries between page reads
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
        assert set(cursor) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )
    assert seen == list(range(1000, 0, -1))
    assert pages == 10
    with app.app_context():
        assert current_ledger().reconcile(user_id).ok
        assert ledger_problems(current_ledger().engine, user_id) == []


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.integers(min_value=-50, max_value=50).filter(bool), max_size=25))
def test_ledger_arithmetic_matches_a_model(app, amounts):
    """Top-ups and charges against a plain-integer model of the balance."""
    user = f"prop_{uuid.uuid4().hex}"
    model = 0
    with app.app_context():
        ledger = current_ledger()
        for amount in amounts:
            if amount > 0:
                ledger.top_up(user, amount)
                model += amount
            else:
                try:
                    ledger.charge(user, -amount)
                    model += amount
                except InsufficientCredits:
                    assert model < -amount
        balance = ledger.find_by_user_id(user)
        assert (balance.balance_units if balance else 0) == model
        history = ledger.history(user, limit=100).items
        assert sum(e.amount_units for e in history) == model
        assert [e.seq for e in history] == list(range(len(history), 0, -1))
