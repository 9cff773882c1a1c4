"""A concurrent mix with holds keeps every invariant (SPEC §7, §9)."""

from __future__ import annotations

import random
import threading

import sqlalchemy as sa

from callora_credits import current_ledger
from callora_credits.db.models import Account, HoldRow, LedgerEntry
from callora_credits.errors import CreditsError


def test_mix_of_charges_holds_captures_releases(app, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 500)
    barrier = threading.Barrier(12)
    failures: list[BaseException] = []
    lock = threading.Lock()
    open_holds: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with app.app_context():
            ledger = current_ledger()
            barrier.wait()
            for _ in range(20):
                action = rng.random()
                try:
                    if action < 0.2:
                        ledger.top_up(user_id, rng.randint(1, 40))
                    elif action < 0.45:
                        ledger.charge(user_id, rng.randint(1, 60))
                    elif action < 0.7:
                        hold = ledger.hold(user_id, rng.randint(1, 80))
                        with lock:
                            open_holds.append(hold.id)
                    else:
                        with lock:
                            hold_id = open_holds.pop() if open_holds else None
                        if hold_id is None:
                            continue
                        if action < 0.85:
                            ledger.capture(hold_id, rng.randint(0, 5))
                        else:
                            ledger.release(hold_id)
                except CreditsError:
                    pass  # 402 and friends are legitimate answers here
                except BaseException as exc:
                    failures.append(exc)
                shown = ledger.find_by_user_id(user_id)
                if shown.available_units < 0 or shown.balance_units < 0:
                    failures.append(AssertionError(f"negative: {shown}"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    with app.app_context():
        ledger = current_ledger()
        engine = ledger.engine
        with engine.connect() as conn:
            a, t, h = Account.__table__, LedgerEntry.__table__, HoldRow.__table__
            balance = conn.execute(
                sa.select(a.c.balance_units).where(a.c.user_id == user_id)
            ).scalar_one()
            total = conn.execute(
                sa.select(sa.func.sum(t.c.amount_units)).where(t.c.user_id == user_id)
            ).scalar_one()
            captured = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(h.c.captured_units), 0)).where(
                    h.c.user_id == user_id, h.c.status == "captured"
                )
            ).scalar_one()
            captures = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(t.c.amount_units), 0)).where(
                    t.c.user_id == user_id, t.c.type == "hold_capture"
                )
            ).scalar_one()
        assert balance == total
        assert captured == -captures
        shown = ledger.find_by_user_id(user_id)
        assert shown.available_units >= 0
        assert ledger.reconcile(user_id).ok
