"""One hot account under concurrent load stays exact, on real databases.

Threads each drive their own ``app.test_client()``; the multi-process test
spawns OS processes that each build their own app. Idempotency keys are
duplicated on purpose: the two halves of a pair wait on a two-party barrier
and send the same key and body at the same moment.

On PostgreSQL the threaded tests also run through a PgBouncer in transaction
pooling mode (``through_pgbouncer_too``).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, SERVICE_SCOPE, make_token, through_pgbouncer_too
from invariants import Reply, account_problems, replies_problems, snapshot

from callora_credits import current_ledger

U = 10_000_000  # units per USDC
BASE = "/api/billing/credits"
TESTS_DIR = str(Path(__file__).resolve().parent)
WAIT = 60  # seconds a barrier waits before it is declared broken (a hang, not a sync)

MIX_ALLOWED = {
    (201, None),
    (402, "INSUFFICIENT_CREDITS"),
    (409, "IDEMPOTENCY_IN_PROGRESS"),
    (422, "REFUND_EXCEEDS_CHARGE"),
}


def usdc(units: int) -> str:
    return f"{units // U}.{units % U:07d}"


def units_of(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, fraction = text.lstrip("-").partition(".")
    return sign * (int(whole) * U + int(fraction.ljust(7, "0")))


# --- capturing the library's 500s ---------------------------------------------------


class _ErrorLog(logging.Handler):
    """Keeps every ERROR the library logs, with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        with self._guard:
            self.lines.append(text)


@contextmanager
def library_errors() -> Iterator[_ErrorLog]:
    handler = _ErrorLog()
    logger = logging.getLogger("callora_credits")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# --- the plan of a mixed load ---------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One planned request. ``pair`` is set on both halves of a duplicated key."""

    index: int
    kind: str  # topup | charge | refund
    key: str
    units: int  # topup/charge amount; a refund's fallback top-up amount
    share: float | None  # refund: None = the whole rest, else this share of the charge
    pick: float  # refund: which of the recent charges
    pair: int | None = None
    leader: bool = True


@dataclass
class Plan:
    queues: list[list[Op]]
    pairs: int

    @property
    def requests(self) -> int:
        return sum(len(q) for q in self.queues)


def make_plan(seed: int, user_id: str, workers: int, singles: int, pairs: int) -> Plan:
    """``singles`` requests plus ``pairs`` duplicated keys, spread over ``workers``.

    Every queue lists its pairs in one global order, so the pair barriers can
    never wait on each other in a cycle.
    """
    rng = random.Random(seed)
    slots = ["single"] * singles + ["pair"] * pairs
    rng.shuffle(slots)
    queues: list[list[Op]] = [[] for _ in range(workers)]
    pair_no = 0
    for index, slot in enumerate(slots):
        roll = rng.random()
        kind = "topup" if roll < 0.35 else "charge" if roll < 0.8 else "refund"
        units = rng.randint(1, (15 if kind == "charge" else 10) * U)
        op = Op(
            index=index,
            kind=kind,
            key=f"{user_id}:mix:{index}",
            units=units,
            share=None if rng.random() < 0.5 else rng.uniform(0.05, 0.9),
            pick=rng.random(),
        )
        if slot == "single":
            queues[min(range(workers), key=lambda w: (len(queues[w]), rng.random()))].append(op)
        else:
            first, second = rng.sample(range(workers), 2)
            queues[first].append(replace(op, pair=pair_no, leader=True))
            queues[second].append(replace(op, pair=pair_no, leader=False))
            pair_no += 1
    return Plan(queues, pair_no)


class Slots:
    """Where a pair's leader publishes the exact request both halves send.

    A ``bytearray`` between threads, a shared ``RawArray`` between processes;
    the pair barrier orders the write before the read.
    """

    SIZE = 1024

    def __init__(self, count: int, ctx: Any = None) -> None:
        size = max(count, 1) * self.SIZE
        self.buf: Any = ctx.RawArray("c", size) if ctx is not None else bytearray(size)

    def put(self, index: int, data: bytes) -> None:
        assert len(data) <= self.SIZE - 2
        start = index * self.SIZE
        framed = len(data).to_bytes(2, "big") + data
        self.buf[start : start + len(framed)] = framed

    def get(self, index: int) -> bytes:
        start = index * self.SIZE
        n = int.from_bytes(bytes(self.buf[start : start + 2]), "big")
        return bytes(self.buf[start + 2 : start + 2 + n])


class ChargeBook:
    """Charges that succeeded (in this process), for refunds to pick from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._charges: dict[str, int] = {}

    def add(self, entry_id: str, units: int) -> None:
        with self._lock:
            self._charges.setdefault(entry_id, units)

    def pick(self, where: float) -> tuple[str, int] | None:
        with self._lock:
            recent = list(self._charges.items())[-4:]  # refunds of recent charges collide
        return recent[int(where * len(recent))] if recent else None


@dataclass
class Context:
    """What a worker needs; shared by the workers of one process."""

    user_id: str
    tokens: dict[str, str]
    start: Any  # barrier of all workers
    pair_barriers: Sequence[Any]
    slots: Slots
    charges: ChargeBook = field(default_factory=ChargeBook)


def request_for(op: Op, ctx: Context) -> dict[str, Any]:
    """The concrete request of ``op``: path, token and body.

    Each body is told apart from the others by its texts and metadata, so an
    entry written with another request's fields is caught.
    """
    if op.kind == "refund":
        target = ctx.charges.pick(op.pick)
        if target is not None:
            entry_id, units = target
            body: dict[str, Any] = {"reason": f"refund {op.index}"}
            if op.share is not None:
                body["amount_usdc"] = usdc(max(1, int(units * op.share)))
            return {"path": f"/transactions/{entry_id}/refund", "as": "admin", "body": body}
    body = {
        "user_id": ctx.user_id,
        "amount_usdc": usdc(op.units),
        "description": f"{op.kind} {op.index}",
        "metadata": {"op": str(op.index), "kind": op.kind},
    }
    if op.kind == "charge":
        return {"path": "/charge", "as": "service", "body": body}
    # A top-up, or a refund with nothing yet to refund.
    return {"path": "/topup", "as": "admin", "body": body}


def run_queue(name: str, queue: list[Op], client: Any, ctx: Context) -> list[Reply]:
    replies: list[Reply] = []
    ctx.start.wait(timeout=WAIT)
    for op in queue:
        if op.pair is None:
            request = request_for(op, ctx)
        else:
            if op.leader:
                ctx.slots.put(op.pair, json.dumps(request_for(op, ctx)).encode())
            ctx.pair_barriers[op.pair].wait(timeout=WAIT)
            request = json.loads(ctx.slots.get(op.pair))
        response = client.post(
            BASE + request["path"],
            json=request["body"],
            headers={
                "Authorization": f"Bearer {ctx.tokens[request['as']]}",
                "Idempotency-Key": op.key,
            },
        )
        reply = Reply(
            key=op.key,
            path=request["path"],
            status=response.status_code,
            body=response.get_data(),
            replayed=response.headers.get("Idempotent-Replayed") == "true",
            worker=name,
            sent=request["body"],
        )
        replies.append(reply)
        if request["path"] == "/charge" and reply.status == 201:
            ctx.charges.add(reply.json["id"], -units_of(reply.json["amount_usdc"]))
    return replies


def run_workers(
    app: Any, queues: Sequence[list[Op]], ctx: Context, prefix: str
) -> tuple[list[Reply], list[str]]:
    """Run each queue in a thread with its own test client."""
    replies: list[Reply] = []
    failures: list[str] = []
    guard = threading.Lock()

    def work(n: int, queue: list[Op]) -> None:
        try:
            got = run_queue(f"{prefix}{n}", queue, app.test_client(), ctx)
        except BaseException:
            with guard:
                failures.append(f"{prefix}{n}: {traceback.format_exc()}")
            ctx.start.abort()
            for barrier in ctx.pair_barriers:
                barrier.abort()
            return
        with guard:
            replies.extend(got)

    threads = [threading.Thread(target=work, args=(n, q)) for n, q in enumerate(queues)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies, failures


def tokens() -> dict[str, str]:
    return {
        "admin": make_token(ADMIN, scopes=ADMIN_SCOPE),
        "service": make_token("gateway", scopes=SERVICE_SCOPE),
    }


def engine_of(app: Any) -> Any:
    with app.app_context():
        return app.extensions["sqlalchemy"].engine


def run_thread_mix(
    app: Any, user_id: str, seed: int, singles: int, pairs: int, workers: int
) -> tuple[Plan, list[Reply], list[str], list[str]]:
    plan = make_plan(seed, user_id, workers, singles, pairs)
    ctx = Context(
        user_id=user_id,
        tokens=tokens(),
        start=threading.Barrier(workers),
        pair_barriers=[threading.Barrier(2) for _ in range(plan.pairs)],
        slots=Slots(plan.pairs),
    )
    with library_errors() as errors:
        replies, failures = run_workers(app, plan.queues, ctx, "thread-")
    return plan, replies, failures, errors.lines


def assert_mix_is_exact(engine: Any, user_id: str, replies, failures, error_lines) -> None:
    assert failures == [], "\n".join(failures)
    server_errors = [r for r in replies if r.status >= 500]
    assert server_errors == [], (
        f"{len(server_errors)} 5xx, e.g. {server_errors[:3]}\n" + "\n".join(error_lines[:3])
    )
    snap = snapshot(engine, user_id)
    problems = account_problems(snap) + replies_problems(snap, replies, MIX_ALLOWED)
    assert problems == [], "\n".join(problems)


def assert_mix_exercised_every_path(replies: list[Reply]) -> None:
    """The mix really raced: replays, refunds, 402s and refused refunds happened."""
    seen = Counter((r.path.split("/")[-1], r.status) for r in replies)
    for outcome in [("topup", 201), ("charge", 201), ("refund", 201)]:
        assert seen[outcome], (outcome, seen)
    for outcome in [("charge", 402), ("refund", 422)]:
        assert seen[outcome], (outcome, seen)
    assert any(r.replayed for r in replies), seen


# --- 1. mixed load over HTTP from threads ------------------------------------------


@through_pgbouncer_too
def test_mixed_load_on_one_account_from_threads(app, user_id):
    plan, replies, failures, errors = run_thread_mix(
        app, user_id, seed=20260115, singles=272, pairs=24, workers=16
    )
    assert failures == [], "\n".join(failures)
    assert len(replies) == plan.requests
    assert_mix_is_exact(engine_of(app), user_id, replies, failures, errors)
    assert_mix_exercised_every_path(replies)
    duplicated = sum(1 for q in plan.queues for op in q if op.pair is not None)
    assert 0.12 <= duplicated / plan.requests <= 0.18


# --- 2. the same mix from OS processes -----------------------------------------------


def _child(
    url: str,
    tests_dir: str,
    number: int,
    queues: list[list[Op]],
    user_id: str,
    tokens_: dict[str, str],
    start: Any,
    pair_barriers: list[Any],
    slots: Slots,
    out: Any,
) -> None:
    """One OS process: its own app and engine, one thread per queue."""
    try:
        if tests_dir not in sys.path:
            sys.path.insert(0, tests_dir)
        from conftest import make_app

        app = make_app(url)
        ctx = Context(user_id, tokens_, start, pair_barriers, slots)
        try:
            with library_errors() as errors:
                replies, failures = run_workers(app, queues, ctx, f"proc{number}-thread-")
        finally:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()
        out.put((number, replies, failures, errors.lines))
    except BaseException:
        start.abort()
        for barrier in pair_barriers:
            barrier.abort()
        out.put((number, [], [f"proc{number}: {traceback.format_exc()}"], []))


def test_mixed_load_on_one_account_from_processes(databases, engine_name, user_id):
    if engine_name == "sqlite":
        pytest.skip("multi-process load targets the server engines; SQLite is embedded")
    url = databases.url(engine_name)
    processes, per_process = 4, 4
    workers = processes * per_process
    plan = make_plan(7, user_id, workers, singles=204, pairs=18)
    owner = {id(op): w // per_process for w, q in enumerate(plan.queues) for op in q}
    halves: dict[int, set[int]] = {}
    for q in plan.queues:
        for op in q:
            if op.pair is not None:
                halves.setdefault(op.pair, set()).add(owner[id(op)])
    shared = sum(1 for procs in halves.values() if len(procs) == 2)
    assert shared >= 5, "the plan shares keys across processes"

    mp = multiprocessing.get_context("spawn")
    start = mp.Barrier(workers)
    pair_barriers = [mp.Barrier(2) for _ in range(plan.pairs)]
    slots = Slots(plan.pairs, mp)
    out = mp.Queue()
    children = [
        mp.Process(
            target=_child,
            args=(
                url,
                TESTS_DIR,
                n,
                plan.queues[n * per_process : (n + 1) * per_process],
                user_id,
                tokens(),
                start,
                pair_barriers,
                slots,
                out,
            ),
        )
        for n in range(processes)
    ]
    for child in children:
        child.start()
    replies: list[Reply] = []
    failures: list[str] = []
    errors: list[str] = []
    try:
        for _ in children:
            _, got, failed, logged = out.get(timeout=120)
            replies += got
            failures += failed
            errors += logged
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():  # pragma: no cover - only after a failure above
                child.kill()
                child.join()
        exit_codes = [child.exitcode for child in children]
        for child in children:
            child.close()
        out.close()
        out.join_thread()
    assert failures == [], "\n".join(failures)
    assert exit_codes == [0] * processes
    assert len(replies) == plan.requests
    engine = sa.create_engine(url)
    try:
        assert_mix_is_exact(engine, user_id, replies, failures, errors)
    finally:
        engine.dispose()
    assert_mix_exercised_every_path(replies)


# --- 3. overdraw race ------------------------------------------------------------------


def concurrently(count: int, send: Callable[[int, Any], Any], app: Any) -> list[Any]:
    """``send(i, client)`` from ``count`` threads released together."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def work(i: int) -> None:
        client = app.test_client()
        try:
            barrier.wait(timeout=WAIT)
            results[i] = send(i, client)
        except BaseException:
            results[i] = traceback.format_exc()
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@through_pgbouncer_too
def test_overdraw_race_lets_exactly_the_balance_through(app, user_id):
    auth = tokens()
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U, idempotency_key=f"{user_id}:seed")

    def charge(i: int, client: Any) -> Any:
        return client.post(
            f"{BASE}/charge",
            json={"user_id": user_id, "amount_usdc": "1.0000000"},
            headers={
                "Authorization": f"Bearer {auth['service']}",
                "Idempotency-Key": f"{user_id}:overdraw:{i}",
            },
        )

    with library_errors() as errors:
        responses = concurrently(50, charge, app)
    broken = [r for r in responses if isinstance(r, str)]
    assert broken == [], "\n".join(broken)
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {201: 10, 402: 40}, (statuses, errors.lines[:3])
    assert {r.json["code"] for r in responses if r.status_code == 402} == {"INSUFFICIENT_CREDITS"}
    after = sorted(r.json["balance_after_usdc"] for r in responses if r.status_code == 201)
    assert after == [f"{n}.0000000" for n in range(10)]
    snap = snapshot(engine_of(app), user_id)
    assert snap.balance_units == 0
    assert [e.type for e in snap.entries].count("charge") == 10
    assert len(snap.entries) == 11
    assert account_problems(snap) == []


# --- 4. one key, twenty senders ----------------------------------------------------------


@through_pgbouncer_too
def test_concurrent_same_key_applies_once(app, user_id):
    auth = tokens()
    with app.app_context():
        current_ledger().top_up(user_id, 5 * U, idempotency_key=f"{user_id}:seed")
    key = f"{user_id}:same"
    body = {"user_id": user_id, "amount_usdc": "1.2345678", "description": "one call"}

    def charge(i: int, client: Any) -> Any:
        return client.post(
            f"{BASE}/charge",
            json=body,
            headers={
                "Authorization": f"Bearer {auth['service']}",
                "Idempotency-Key": key,
                "X-Request-Id": f"req-same-{i}",
            },
        )

    with library_errors() as errors:
        responses = concurrently(20, charge, app)
    broken = [r for r in responses if isinstance(r, str)]
    assert broken == [], "\n".join(broken)
    created = [r for r in responses if r.status_code == 201]
    others = [r for r in responses if r.status_code != 201]
    assert created, [(r.status_code, r.get_data()) for r in responses]
    assert len({r.get_data() for r in created}) == 1
    assert [r.headers.get("Idempotent-Replayed") for r in created].count(None) == 1
    assert all(r.status_code == 409 for r in others), (
        [(r.status_code, r.get_data()) for r in others],
        errors.lines[:3],
    )
    assert {r.json["code"] for r in others} <= {"IDEMPOTENCY_IN_PROGRESS"}
    snap = snapshot(engine_of(app), user_id)
    charges = [e for e in snap.entries if e.type == "charge"]
    assert [e.id for e in charges] == [created[0].json["id"]]
    assert snap.balance_units == 5 * U - 12_345_678
    assert snap.idempotency_keys == 2  # the seed top-up's and this one
    assert account_problems(snap) == []


# --- 5. first top-up race on a brand-new account ------------------------------------


@through_pgbouncer_too
def test_first_top_up_race_creates_one_account(app, user_id):
    auth = tokens()

    def top_up(i: int, client: Any) -> Any:
        return client.post(
            f"{BASE}/topup",
            json={"user_id": user_id, "amount_usdc": usdc((i + 1) * U + i)},
            headers={
                "Authorization": f"Bearer {auth['admin']}",
                "Idempotency-Key": f"{user_id}:first:{i}",
            },
        )

    with library_errors() as errors:
        responses = concurrently(16, top_up, app)
    broken = [r for r in responses if isinstance(r, str)]
    assert broken == [], "\n".join(broken)
    statuses = [r.status_code for r in responses]
    assert statuses == [201] * 16, (
        [(r.status_code, r.get_data()[:200]) for r in responses if r.status_code != 201],
        errors.lines[:3],
    )
    assert sorted(r.json["seq"] for r in responses) == list(range(1, 17))
    snap = snapshot(engine_of(app), user_id)
    assert len(snap.accounts) == 1
    assert [int(e.seq) for e in snap.entries] == list(range(1, 17))
    assert snap.balance_units == sum((i + 1) * U + i for i in range(16))
    assert account_problems(snap) == []


# --- 6. reconcile after a mixed load ---------------------------------------------------


@through_pgbouncer_too
def test_reconcile_is_clean_after_a_mixed_load(app, user_id):
    with app.app_context():
        if not hasattr(current_ledger(), "reconcile"):
            pytest.skip("Ledger.reconcile() is not there yet")
    _, replies, failures, errors = run_thread_mix(
        app, user_id, seed=99, singles=96, pairs=8, workers=16
    )
    assert_mix_is_exact(engine_of(app), user_id, replies, failures, errors)
    with app.app_context():
        report = current_ledger().reconcile(user_id)
    assert report.ok, report.mismatches
    assert report.entries == len(snapshot(engine_of(app), user_id).entries) > 0


# --- 7. the checks themselves -----------------------------------------------------------


def test_checks_catch_entries_that_agree_with_their_answers_but_not_their_requests(app, user_id):
    """A swap the server made consistently (each row stored, and answered,
    with another request's fields) passes every comparison of answers with
    rows; only the comparison with what was asked catches it."""
    client = app.test_client()
    auth = tokens()
    plan = [
        ("/topup", "admin", {"user_id": user_id, "amount_usdc": "10", "metadata": {"op": "t"}}),
        ("/charge", "service", {"user_id": user_id, "amount_usdc": "2", "description": "a"}),
        ("/charge", "service", {"user_id": user_id, "amount_usdc": "3", "metadata": {"op": "b"}}),
    ]
    replies = []
    for n, (path, who, body) in enumerate(plan):
        response = client.post(
            BASE + path,
            json=body,
            headers={"Authorization": f"Bearer {auth[who]}", "Idempotency-Key": f"check:{n}"},
        )
        assert response.status_code == 201, response.get_data()
        replies.append(Reply(f"check:{n}", path, 201, response.get_data(), False, "t", body))
    refund = client.post(
        f"{BASE}/transactions/{replies[1].json['id']}/refund",
        json={"reason": "r"},
        headers={"Authorization": f"Bearer {auth['admin']}", "Idempotency-Key": "check:r"},
    )
    assert refund.status_code == 201, refund.get_data()
    path = f"/transactions/{replies[1].json['id']}/refund"
    replies.append(Reply("check:r", path, 201, refund.get_data(), False, "t", {"reason": "r"}))
    snap = snapshot(engine_of(app), user_id)
    assert replies_problems(snap, replies, MIX_ALLOWED) == []

    charge_a, charge_b, topup = replies[1], replies[2], replies[0]
    for mixed in (
        [topup, replace(charge_a, sent=charge_b.sent), replace(charge_b, sent=charge_a.sent)],
        [replace(topup, path="/charge"), charge_a, charge_b],
        [replace(topup, sent={**topup.sent, "user_id": f"{user_id}_other"}), charge_a, charge_b],
    ):
        problems = replies_problems(snap, [*mixed, replies[3]], MIX_ALLOWED)
        assert len(problems) == 1, problems
        assert "not what their request asked" in problems[0], problems
    # A refund written against another charge than the one in its path.
    too_much = replace(replies[3], path=f"/transactions/{charge_b.json['id']}/refund")
    problems = replies_problems(snap, [*replies[:3], too_much], MIX_ALLOWED)
    assert any("refund_of" in p for p in problems), problems
