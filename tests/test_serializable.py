"""PostgreSQL at SERIALIZABLE, as distributed SQL engines run: the library
retries serialization failures and the ledger stays exact."""

from __future__ import annotations

import random
import threading

import pytest
from conftest import make_app
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.errors import InsufficientCredits


@pytest.fixture
def serializable_app(databases, engine_name):
    if engine_name != "postgresql":
        pytest.skip("SERIALIZABLE retry behaviour is exercised on PostgreSQL")
    app = make_app(
        databases.url(engine_name),
        SQLALCHEMY_ENGINE_OPTIONS={"isolation_level": "SERIALIZABLE", "pool_size": 20},
        CREDITS_DB_RETRIES=25,
    )
    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


def test_concurrent_mix_is_exact_and_retries_are_counted(serializable_app, user_id):
    app = serializable_app
    with app.app_context():
        current_ledger().top_up(user_id, 1_000)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    applied: list[int] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with app.app_context():
            ledger = current_ledger()
            barrier.wait()
            for _ in range(15):
                try:
                    if rng.random() < 0.5:
                        entry = ledger.top_up(user_id, rng.randint(1, 50))
                    else:
                        entry = ledger.charge(user_id, rng.randint(1, 120))
                    with lock:
                        applied.append(entry.amount_units)
                except InsufficientCredits:
                    pass
                except BaseException as exc:
                    errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with app.app_context():
        ledger = current_ledger()
        balance = ledger.find_by_user_id(user_id)
        assert balance.balance_units == 1_000 + sum(applied)
        assert balance.balance_units >= 0
        assert ledger.reconcile(user_id).ok
        assert ledger_problems(ledger.engine, user_id) == []
        stats = app.extensions["callora_credits"].stats
    assert stats.counts.get("serialization", 0) > 0, stats.counts
