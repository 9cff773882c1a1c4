"""Where the library spends its time on the benchmarked paths (not part of ``make bench``).

Needs pyinstrument (``.venv/bin/pip install pyinstrument``). Creates and
drops its own database like bench/run.py, then profiles, in one process and
one thread: ``Ledger.charge``, the balance read, and the two HTTP views
through Flask's test client (no network, so only Python time shows).

    .venv/bin/python bench/profile_hotpaths.py [charge|read|http_get|http_charge ...]
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable

from common import (
    ACCOUNTS,
    JWT_SECRET,
    READER,
    SERVICE,
    Cleanup,
    account,
    create_database,
    libpq_dsn,
    make_token,
    seed_accounts,
)

CALLS = 2000


def main() -> int:
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("pyinstrument is missing: .venv/bin/pip install pyinstrument", file=sys.stderr)
        return 2
    os.environ["BENCH_JWT_SECRET"] = JWT_SECRET
    from app import create_app

    from callora_credits import current_ledger

    wanted = sys.argv[1:] or ["charge", "read", "http_get", "http_charge"]
    cleanup = Cleanup()
    try:
        url = create_database(cleanup)
        seed_accounts(libpq_dsn(url))
        app = create_app(url, pool_size=4)
        with app.app_context():
            ledger = current_ledger()
        cleanup.push("dispose engine", ledger.engine.dispose)
        client = app.test_client()
        reader = {"Authorization": f"Bearer {make_token(READER)}"}
        service = {"Authorization": f"Bearer {make_token(SERVICE, 'credits:charge')}"}

        def http_charge(n: int) -> None:
            response = client.post(
                "/api/billing/credits/charge",
                json={"user_id": account(n % ACCOUNTS), "amount_usdc": "0.0000001"},
                headers={**service, "Idempotency-Key": uuid.uuid4().hex},
            )
            assert response.status_code == 201, response.data

        def http_get(n: int) -> None:
            response = client.get("/api/billing/credits", headers=reader)
            assert response.status_code == 200, response.data

        cases: dict[str, Callable[[int], object]] = {
            "charge": lambda n: ledger.charge(account(n % ACCOUNTS), 1),
            "read": lambda n: ledger.get_or_create_by_user_id(account(n % ACCOUNTS)),
            "http_get": http_get,
            "http_charge": http_charge,
        }
        for name in wanted:
            call = cases[name]
            for n in range(100):
                call(n)
            profiler = Profiler(interval=0.0002)
            profiler.start()
            for n in range(CALLS):
                call(n)
            profiler.stop()
            print(f"==== {name}: {CALLS} calls")
            print(profiler.output_text(unicode=True, color=False, show_all=False))
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
