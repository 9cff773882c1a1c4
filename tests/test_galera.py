"""The ledger on a three-node MariaDB Galera cluster, written through every node.

Galera certifies written rows only: a row lock taken on one node does not stop
a conflicting write on another, and the loser of two conflicting transactions
fails certification at COMMIT (a deadlock, retried). These races send the
conflicting operations to different nodes at once, repeatedly, and judge the
result with the independent checks of ``tests/invariants.py`` read on every
node. The cluster (``tests/galera.py``) is started once for the session.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_token
from invariants import ledger_problems, snapshot
from sqlalchemy.pool import NullPool

from callora_credits import current_ledger

pytestmark = [pytest.mark.galera, pytest.mark.xdist_group("galera")]

U = 10_000_000
TRIALS = 20
BASE = "/api/billing/credits"
SERVICE = {"Authorization": f"Bearer {make_token('svc', scopes='credits:charge')}"}


def new_user() -> str:
    return f"user_{uuid.uuid4().hex[:12]}"


def race(apps: list[Any], tasks: list[tuple[int, Callable[[Any], Any]]]) -> list[Any]:
    """Run each ``(node, task)`` on its own thread with that node's ledger,
    all released together; each task's result or exception, in task order."""
    results: list[Any] = [None] * len(tasks)
    barrier = threading.Barrier(len(tasks))

    def work(index: int) -> None:
        node, task = tasks[index]
        with apps[node].app_context():
            ledger = current_ledger()
            barrier.wait(timeout=60)
            try:
                results[index] = task(ledger)
            except BaseException as exc:  # judged by the caller
                results[index] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(tasks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def seed(galera: Any, apps: list[Any], user_id: str, units: int) -> None:
    """Top the user up on node 1, and wait until every node has applied it."""
    with apps[0].app_context():
        current_ledger().top_up(user_id, units, idempotency_key=f"{user_id}:seed")
    galera.catch_up()


@pytest.fixture
def node_engines(galera: Any) -> Iterator[list[sa.Engine]]:
    """A plain engine per node, for the independent checks."""
    engines = [sa.create_engine(url, poolclass=NullPool) for url in galera.urls()]
    yield engines
    for engine in engines:
        engine.dispose()


def same_everywhere(galera: Any, engines: list[sa.Engine], user_id: str) -> list[str]:
    """Problems of the user's rows on each node, and any difference between nodes."""
    galera.catch_up()
    problems: list[str] = []
    snaps = []
    for number, engine in enumerate(engines, start=1):
        problems += [f"node{number}: {p}" for p in ledger_problems(engine, user_id)]
        snaps.append(snapshot(engine, user_id))
    for number, snap in enumerate(snaps[1:], start=2):
        if snap != snaps[0]:
            problems.append(f"node{number}'s rows differ from node1's")
    return problems


def available(snap: Any) -> int:
    held = sum(int(h.amount_units) for h in snap.holds if h.status == "pending")
    return int(snap.balance_units or 0) - held


def unexpected(results: list[Any], *allowed: type[BaseException]) -> list[Any]:
    return [r for r in results if isinstance(r, BaseException) and not isinstance(r, allowed)]


def test_cluster_has_three_synced_nodes_that_see_each_others_writes(galera, node_apps):
    for index in range(3):
        status = galera.status(index)
        assert status["wsrep_cluster_size"] == "3"
        assert status["wsrep_ready"] == "ON"
    user_id = new_user()
    seed(galera, node_apps, user_id, 5 * U)
    with node_apps[2].app_context():
        shown = current_ledger().find_by_user_id(user_id)
    assert shown is not None
    assert shown.balance_units == 5 * U
