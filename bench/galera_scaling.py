"""Charges per second through one Galera node and through three, in one run.

    python bench/galera_scaling.py [--seconds 8] [--clients 6]

Starts the three-node cluster of ``tests/galera.py`` (needs the MariaDB
server, ``galera-4`` and rsync; see docs/scaling.md), then runs four rows, each
for ``--seconds``, with ``--clients`` client processes calling
``Ledger.charge`` through the Python API (one engine per process, bound to
one node):

- own accounts, one node: every client on node 1, each on its own account;
- own accounts, three nodes: clients spread over the nodes, round-robin;
- one hot account, one node / three nodes: every client charges one account.

Prints each row's charges per second, the retries the library made (a
certification failure is a retried deadlock), any errors (retries
exhausted), the nodes' certification failures and brute-force aborts (a
local transaction aborted because a replicated one needed its locks), then the
three-node/one-node ratios. Not part of ``make test``; not a goal of
docs/benchmarks.md: the figures say how the cluster behaves on this machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

U = 10_000_000


def _client(url: str, user_id: str, seconds: float, start_at: float, queue: Any) -> None:
    """One client process: charge ``user_id`` one unit at a time through ``url``."""
    from conftest import make_app

    from callora_credits import current_ledger

    app = make_app(url, SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 2, "max_overflow": 0})
    done = errors = 0
    with app.app_context():
        ledger = current_ledger()
        ledger.find_by_user_id(user_id)  # connect before the clock starts
        time.sleep(max(0.0, start_at - time.time()))
        stop = time.monotonic() + seconds
        n = 0
        while time.monotonic() < stop:
            n += 1
            try:
                ledger.charge(user_id, 1, idempotency_key=f"{uuid.uuid4().hex}")
                done += 1
            except Exception:  # counted, reported
                errors += 1
        retries = dict(ledger.stats.counts)
        app.extensions["sqlalchemy"].engine.dispose()
    queue.put((done, errors, retries))


#: Counters summed over the nodes: commits refused by certification, and local
#: transactions aborted for a replicated one ("brute force").
COUNTERS = ("wsrep_local_cert_failures", "wsrep_local_bf_aborts")


def counters(cluster: Any) -> dict[str, int]:
    totals = dict.fromkeys(COUNTERS, 0)
    for index in range(len(cluster.nodes)):
        status = cluster.status(index)
        for name in COUNTERS:
            totals[name] += int(status.get(name, 0))
    return totals


def row(cluster: Any, urls: list[str], users: list[str], seconds: float) -> dict[str, Any]:
    """Clients ``i`` charge ``users[i]`` through ``urls[i]``, together."""
    before = counters(cluster)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 4.0  # spawned clients import and connect first
    procs = [
        ctx.Process(target=_client, args=(url, user, seconds, start_at, queue))
        for url, user in zip(urls, users, strict=True)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    done = sum(r[0] for r in results)
    reasons: dict[str, int] = {}
    for r in results:
        for reason, count in r[2].items():
            reasons[reason] = reasons.get(reason, 0) + count
    after = counters(cluster)
    return {
        "cert_failures": after[COUNTERS[0]] - before[COUNTERS[0]],
        "bf_aborts": after[COUNTERS[1]] - before[COUNTERS[1]],
        "per_second": done / seconds,
        "charges": done,
        "errors": sum(r[1] for r in results),
        "retries": sum(reasons.values()),
        "reasons": reasons,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=6)
    args = parser.parse_args()

    from conftest import make_app
    from galera import GaleraCluster, prerequisites

    from callora_credits import current_ledger

    missing = prerequisites()
    if missing is not None:
        print(f"cannot run the cluster: {missing}", file=sys.stderr)
        return 2
    with GaleraCluster() as cluster:
        urls = cluster.urls()
        seeder = make_app(urls[0])
        own = [f"bench_{uuid.uuid4().hex[:10]}" for _ in range(args.clients)]
        hot = f"bench_hot_{uuid.uuid4().hex[:8]}"
        with seeder.app_context():
            ledger = current_ledger()
            for user_id in [*own, hot]:
                ledger.top_up(user_id, 10_000 * U)
            seeder.extensions["sqlalchemy"].engine.dispose()
        cluster.catch_up()
        n = args.clients
        spread = [urls[i % 3] for i in range(n)]
        rows = {
            "own accounts, one node": row(cluster, [urls[0]] * n, own, args.seconds),
            "own accounts, three nodes": row(cluster, spread, own, args.seconds),
            "one hot account, one node": row(cluster, [urls[0]] * n, [hot] * n, args.seconds),
            "one hot account, three nodes": row(cluster, spread, [hot] * n, args.seconds),
        }
    print(f"Galera, {n} client processes, {args.seconds:.0f} s per row, Ledger.charge")
    print(
        f"{'row':30} {'charges/s':>9} {'charges':>7} {'retries':>7} {'errors':>6} "
        f"{'cert fail':>9} {'bf abort':>8}"
    )
    for name, r in rows.items():
        print(
            f"{name:30} {r['per_second']:9.0f} {r['charges']:7d} {r['retries']:7d} "
            f"{r['errors']:6d} {r['cert_failures']:9d} {r['bf_aborts']:8d}"
        )
    for kind in ("own accounts", "one hot account"):
        one, three = rows[f"{kind}, one node"], rows[f"{kind}, three nodes"]
        print(f"{kind}: three nodes / one node = {three['per_second'] / one['per_second']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
