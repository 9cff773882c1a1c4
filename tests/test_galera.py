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
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_app, make_token
from invariants import account_problems, grants_problems, holds_problems, snapshot

from callora_credits import current_ledger
from callora_credits.errors import (
    CreditsError,
    DuplicateReference,
    IdempotencyInProgress,
    InsufficientCredits,
)

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


def same_everywhere(galera: Any, engines: list[sa.Engine], user_id: str) -> list[str]:
    """Problems of the user's rows on each node, and any difference between nodes."""
    galera.catch_up()
    problems: list[str] = []
    snaps = []
    for number, engine in enumerate(engines, start=1):
        snap = snapshot(engine, user_id)
        found = account_problems(snap) + holds_problems(snap) + grants_problems(snap)
        problems += [f"node{number}: {p}" for p in found]
        snaps.append(snap)
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


# --- two nodes spending one balance ---------------------------------------------------


@pytest.mark.parametrize(
    ("first", "earlier_hold"), [("charge", False), ("hold", False), ("charge", True)]
)
def test_cross_node_spend_and_hold_never_overdraw(
    galera, node_apps, node_engines, first, earlier_hold
):
    """A charge (or hold) of 8 on node 1 and a hold of 8 on node 2, on an
    available 10: exactly one succeeds, twenty times over. With an earlier
    pending hold the account's next due time is already set, so the new hold
    has no due time to write there."""
    both = []
    for trial in range(TRIALS):
        user_id = new_user()
        seed(galera, node_apps, user_id, 11 if earlier_hold else 10)
        if earlier_hold:
            with node_apps[0].app_context():
                current_ledger().hold(user_id, 1)
            galera.catch_up()

        def spend(ledger: Any, kind: str = first, user_id: str = user_id) -> Any:
            if kind == "charge":
                return ledger.charge(user_id, 8)
            return ledger.hold(user_id, 8)

        results = race(
            node_apps, [(0, spend), (1, lambda ledger, user_id=user_id: ledger.hold(user_id, 8))]
        )
        assert unexpected(results, InsufficientCredits) == [], (trial, results)
        if sum(not isinstance(r, BaseException) for r in results) != 1:
            both.append(trial)
        galera.catch_up()
        for engine in node_engines:
            snap = snapshot(engine, user_id)
            assert available(snap) >= 0, (trial, snap.balance_units, snap.holds)
            assert account_problems(snap) + holds_problems(snap) == []
    assert both == [], f"both succeeded in {len(both)}/{TRIALS} trials"


# --- one key, one reference, two nodes -------------------------------------------------


def test_same_key_on_two_nodes_applies_once(galera, node_apps, node_engines):
    for trial in range(TRIALS):
        user_id = new_user()
        seed(galera, node_apps, user_id, 10 * U)
        key = f"{user_id}:twice"

        def charge(ledger: Any, user_id: str = user_id, key: str = key) -> Any:
            return ledger.charge(user_id, 3 * U, idempotency_key=key, description="once")

        results = race(node_apps, [(0, charge), (1, charge)])
        assert unexpected(results, IdempotencyInProgress) == [], (trial, results)
        entries = {r.id for r in results if not isinstance(r, BaseException)}
        assert len(entries) == 1, (trial, results)
        problems = same_everywhere(galera, node_engines, user_id)
        assert problems == [], (trial, problems)
        snap = snapshot(node_engines[2], user_id)
        assert [e.id for e in snap.entries if e.type == "charge"] == list(entries)
        assert snap.balance_units == 7 * U


def test_same_reference_on_two_nodes_credits_once(galera, node_apps, node_engines):
    for trial in range(TRIALS):
        user_id = new_user()
        reference = f"pay_{uuid.uuid4().hex[:10]}"

        def credit(
            ledger: Any, node: int, user_id: str = user_id, reference: str = reference
        ) -> Any:
            return ledger.top_up(
                user_id, 5 * U, reference=reference, idempotency_key=f"{user_id}:{node}"
            )

        results = race(
            node_apps,
            [(0, lambda ledger: credit(ledger, 0)), (1, lambda ledger: credit(ledger, 1))],
        )
        assert unexpected(results, DuplicateReference) == [], (trial, results)
        assert sum(isinstance(r, DuplicateReference) for r in results) == 1, (trial, results)
        problems = same_everywhere(galera, node_engines, user_id)
        assert problems == [], (trial, problems)
        snap = snapshot(node_engines[2], user_id)
        assert [e.type for e in snap.entries] == ["topup"]
        assert snap.balance_units == 5 * U


def test_overdraw_race_over_three_nodes_lets_exactly_the_balance_through(galera, node_engines):
    # Forty charges of one unit on one row certify one at a time: a generous
    # retry budget, so every charge ends in success or a refusal for money.
    apps = [
        make_app(url, CREDITS_DB_RETRIES=100, CREDITS_DB_RETRY_SECONDS=60) for url in galera.urls()
    ]
    try:
        user_id = new_user()
        seed(galera, apps, user_id, 10 * U)
        tasks = [
            (i % 3, lambda ledger, i=i: ledger.charge(user_id, U, idempotency_key=f"{i}"))
            for i in range(40)
        ]
        results = race(apps, tasks)
    finally:
        for app in apps:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()
    assert unexpected(results, InsufficientCredits) == [], results
    assert sum(not isinstance(r, BaseException) for r in results) == 10
    assert sorted(r.balance_after_units for r in results if not isinstance(r, BaseException)) == [
        n * U for n in range(10)
    ]
    assert same_everywhere(galera, node_engines, user_id) == []
    assert snapshot(node_engines[1], user_id).balance_units == 0


# --- load on one hot account ---------------------------------------------------------


def test_hot_account_from_two_nodes_never_answers_500(galera, node_apps, node_engines):
    user_id = new_user()
    seed(galera, node_apps, user_id, 1_000_000 * U)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + 3.0

    def client(worker: int) -> None:
        http = node_apps[worker % 2].test_client()
        n = 0
        while time.monotonic() < stop:
            n += 1
            response = http.post(
                f"{BASE}/charge",
                json={"user_id": user_id, "amount_usdc": "0.0000001"},
                headers={**SERVICE, "Idempotency-Key": f"{worker}:{n}"},
            )
            if response.status_code == 503:
                assert response.headers.get("Retry-After"), response.headers
            with lock:
                statuses[response.status_code] += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"hot account over two nodes, 12 threads, 3 s: {dict(statuses)}")
    assert statuses[500] == 0, dict(statuses)
    assert set(statuses) <= {201, 503}, dict(statuses)
    assert statuses[201] > 0
    assert same_everywhere(galera, node_engines, user_id) == []
    snap = snapshot(node_engines[0], user_id)
    assert snap.balance_units == 1_000_000 * U - statuses[201]


# --- a node outside the primary component ------------------------------------------------


def test_isolated_node_answers_503_and_the_same_key_succeeds_after_rejoining(galera, node_engines):
    apps = [make_app(url, CREDITS_DB_RETRY_SECONDS=1) for url in galera.urls()]
    user_id = new_user()
    try:
        seed(galera, apps, user_id, 10 * U)
        body = {"user_id": user_id, "amount_usdc": "2"}
        headers = {**SERVICE, "Idempotency-Key": f"{user_id}:isolated"}
        galera.isolate(2)
        try:
            refused = apps[2].test_client().post(f"{BASE}/charge", json=body, headers=headers)
        finally:
            galera.rejoin(2)
        assert refused.status_code == 503, refused.get_data(as_text=True)[:500]
        assert refused.json["code"] == "SERVICE_UNAVAILABLE"
        assert int(refused.headers["Retry-After"]) >= 1
        snap = snapshot(node_engines[0], user_id)
        assert snap.balance_units == 10 * U
        assert snap.idempotency_keys == 1  # the seed's
        done = apps[2].test_client().post(f"{BASE}/charge", json=body, headers=headers)
        assert done.status_code == 201, done.get_data(as_text=True)[:500]
        again = apps[0].test_client().post(f"{BASE}/charge", json=body, headers=headers)
        assert again.status_code == 201
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json["id"] == done.json["id"]
    finally:
        for app in apps:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()
    assert same_everywhere(galera, node_engines, user_id) == []
    assert snapshot(node_engines[2], user_id).balance_units == 8 * U


# --- a node killed mid-run ----------------------------------------------------------------


def test_node_killed_mid_run_and_rejoined_loses_nothing(galera, node_apps, node_engines):
    users = [new_user() for _ in range(4)]
    for user_id in users:
        seed(galera, node_apps, user_id, 1000 * U)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + 4.0

    def client(worker: int) -> None:
        node = worker % 3
        n = 0
        with node_apps[node].app_context():
            ledger = current_ledger()
            while time.monotonic() < stop:
                n += 1
                user_id = users[n % len(users)]
                key = f"{worker}:{n}"
                try:
                    if n % 4 == 0:
                        ledger.top_up(user_id, 3 * U, idempotency_key=key)
                    elif n % 4 == 1:
                        hold = ledger.hold(user_id, 2 * U, idempotency_key=key)
                        ledger.capture(hold.id, U, idempotency_key=f"{key}:c")
                    else:
                        ledger.charge(user_id, U, idempotency_key=key)
                    result = "ok"
                except CreditsError as exc:
                    result = exc.code
                except Exception as exc:  # the killed node's clients: counted, not judged
                    result = f"node{node + 1}: {type(exc).__name__}"
                with lock:
                    outcomes[result] += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    galera.kill(2)
    for thread in threads:
        thread.join()
    galera.restart(2)
    print(f"a node killed mid-run: {dict(outcomes)}")
    assert outcomes["ok"] > 0
    # Only the killed node's clients may see it gone.
    assert [r for r in outcomes if r.startswith(("node1", "node2"))] == [], dict(outcomes)
    for user_id in users:
        assert same_everywhere(galera, node_engines, user_id) == [], user_id
