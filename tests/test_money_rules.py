"""Money rules a plausible change to the core would break, each held over
HTTP and through the Python API, on every engine.

- Only debits (``charge``, ``hold_capture``) can be refunded: refunding a
  top-up, an adjustment or a refund would create money.
- A negative adjustment may not take the balance below what live holds
  reserve.
- An idempotency key is scoped to its concrete path (and, in Python, to its
  operation): the same key on two holds' captures, or on ``/topup`` and
  ``/charge``, is two keys.
- ``GET /credits/holds`` lists only holds that are still live.
- ``prune`` deletes expired keys only: a live key still replays afterwards.
- ``reconcile`` checks the ``balance_after`` chain and the ``seq`` chain, and
  the independent checker of ``tests/invariants.py`` agrees with it.
- A capture's ledger entry carries the hold's metadata.
- Every stored outcome (2xx, 402, 404 of the target, 409
  ``HOLD_NOT_PENDING`` / ``DUPLICATE_REFERENCE``, 422
  ``HOLD_AMOUNT_EXCEEDED`` / ``REFUND_EXCEEDS_CHARGE`` /
  ``BALANCE_LIMIT_EXCEEDED``) replays byte for byte, even after the state
  that produced it has changed.

State is read back with plain SQL (``tests/invariants.py``), never only
through the library that wrote it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, SERVICE_SCOPE, Clock, assert_error
from flask import Flask
from invariants import account_problems, ledger_problems, snapshot

from callora_credits import current_ledger
from callora_credits.core.ledger import Ledger
from callora_credits.db.models import Account, IdempotencyRecord, LedgerEntry
from callora_credits.errors import (
    BalanceLimitExceeded,
    CreditsError,
    DuplicateReference,
    HoldAmountExceeded,
    HoldNotPending,
    IdempotencyConflict,
    InsufficientCredits,
    NotFound,
    RefundExceedsCharge,
    ValidationError,
)

U = 10_000_000  # units per USDC
BASE = "/api/billing/credits"
MISSING_HOLD = "hold_" + "0" * 24
MISSING_ENTRY = "ctx_" + "0" * 24


@pytest.fixture
def admin(auth: Callable[..., dict[str, str]]) -> dict[str, str]:
    return auth(ADMIN, scopes=ADMIN_SCOPE)


@pytest.fixture
def service(auth: Callable[..., dict[str, str]]) -> dict[str, str]:
    return auth("gateway", scopes=SERVICE_SCOPE)


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def engine_of(app: Flask) -> Any:
    return app.extensions["sqlalchemy"].engines[None]


def ledger_of(app: Flask) -> Ledger:
    with app.app_context():
        return current_ledger()


def money_state(app: Flask, user_id: str) -> tuple[Any, ...]:
    """The user's balance row, entries and holds, raw (idempotency records aside)."""
    snap = snapshot(engine_of(app), user_id)
    return snap.accounts, snap.entries, snap.holds


def exact(app: Flask, user_id: str, now: datetime | None = None) -> None:
    problems = ledger_problems(engine_of(app), user_id, now)
    assert problems == [], "\n".join(problems)


def stored_keys(app: Flask, key_text: str) -> list[Any]:
    t = IdempotencyRecord.__table__
    with engine_of(app).connect() as conn:
        return list(
            conn.execute(
                sa.select(t.c.method, t.c.path, t.c.status_code).where(
                    t.c.idempotency_key == key_text
                )
            ).all()
        )


def post(client: Any, path: str, body: Any, headers: dict[str, str], **extra: str) -> Any:
    return client.post(f"{BASE}{path}", json=body, headers={**headers, **extra})


# --- Only debits are refundable ------------------------------------------------


def every_kind_of_entry(app: Flask, user_id: str) -> dict[str, str]:
    """One entry of each kind for ``user_id`` (balance 16 USDC after them)."""
    with app.app_context():
        ledger = current_ledger()
        topup = ledger.top_up(user_id, 20 * U)
        credit = ledger.adjust(user_id, 3 * U, "goodwill")
        debit = ledger.adjust(user_id, -2 * U, "chargeback")
        charge = ledger.charge(user_id, 4 * U)
        refund = ledger.refund(charge.id, 1 * U)
        hold = ledger.capture(ledger.hold(user_id, 5 * U).id, 2 * U)
    assert hold.transaction_id is not None
    return {
        "topup": topup.id,
        "credit adjustment": credit.id,
        "debit adjustment": debit.id,
        "charge": charge.id,
        "refund": refund.id,
        "hold_capture": hold.transaction_id,
    }


NOT_REFUNDABLE = ["topup", "credit adjustment", "debit adjustment", "refund"]


def test_only_debits_can_be_refunded_over_http(app, client, admin, user_id):
    ids = every_kind_of_entry(app, user_id)
    before = snapshot(engine_of(app), user_id)
    for kind in NOT_REFUNDABLE:
        for body in ({}, {"amount_usdc": "1"}, {"amount_usdc": "0.0000001"}):
            response = post(client, f"/transactions/{ids[kind]}/refund", body, admin, **key())
            error = assert_error(response, 400, "VALIDATION_ERROR")
            assert [(d["field"], d["code"]) for d in error["details"]] == [
                ("transaction_id", "not_refundable")
            ], (kind, body)
    # Nothing moved, and a 400 is not stored under its key.
    assert snapshot(engine_of(app), user_id) == before
    exact(app, user_id)


def test_only_debits_can_be_refunded_in_python(app, user_id):
    ids = every_kind_of_entry(app, user_id)
    before = snapshot(engine_of(app), user_id)
    ledger = ledger_of(app)
    with app.app_context():
        for kind in NOT_REFUNDABLE:
            for amount in (None, 1 * U, 1):
                with pytest.raises(ValidationError) as caught:
                    ledger.refund(ids[kind], amount, idempotency_key=f"{kind}:{amount}")
                assert [d["code"] for d in caught.value.details] == ["not_refundable"]
    assert snapshot(engine_of(app), user_id) == before


def test_charges_and_captures_are_refundable_over_http(app, client, admin, service, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
    hold = post(client, "/holds", {"user_id": user_id, "amount_usdc": "5"}, service, **key())
    captured = post(client, f"/holds/{hold.json['id']}/capture", {"amount_usdc": "3"}, service,
                    **key())  # fmt: skip
    assert captured.status_code == 200, captured.json
    charge = post(client, "/charge", {"user_id": user_id, "amount_usdc": "2"}, service, **key())
    assert charge.status_code == 201, charge.json
    balance = 5 * U  # 10 - 3 - 2
    for entry_id, debit in ((captured.json["transaction_id"], 3), (charge.json["id"], 2)):
        part = post(client, f"/transactions/{entry_id}/refund", {"amount_usdc": "1"}, admin,
                    **key())  # fmt: skip
        assert part.status_code == 201, part.json
        balance += U
        assert (part.json["type"], part.json["refund_of"], part.json["amount_usdc"]) == (
            "refund", entry_id, "1.0000000",
        )  # fmt: skip
        assert part.json["balance_after_usdc"] == f"{balance // U}.0000000"
        rest = post(client, f"/transactions/{entry_id}/refund", {}, admin, **key())
        assert rest.status_code == 201, rest.json
        balance += (debit - 1) * U
        assert rest.json["amount_usdc"] == f"{debit - 1}.0000000"
        over = post(client, f"/transactions/{entry_id}/refund", {}, admin, **key())
        assert_error(over, 422, "REFUND_EXCEEDS_CHARGE")
        shown = client.get(f"{BASE}/transactions/{entry_id}", headers=admin).json
        assert shown["refunded_usdc"] == f"{debit}.0000000"
    assert balance == 10 * U
    assert snapshot(engine_of(app), user_id).balance_units == 10 * U
    exact(app, user_id)


def test_charges_and_captures_are_refundable_in_python(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 5 * U)
        capture = ledger.capture(hold.id, 3 * U)
        assert capture.transaction_id is not None
        charge = ledger.charge(user_id, 2 * U)
        for entry_id, debit in ((capture.transaction_id, 3 * U), (charge.id, 2 * U)):
            part = ledger.refund(entry_id, 1, reason="goodwill")
            assert (part.type, part.refund_of, part.amount_units) == ("refund", entry_id, 1)
            rest = ledger.refund(entry_id)
            assert rest.amount_units == debit - 1
            with pytest.raises(RefundExceedsCharge):
                ledger.refund(entry_id, 1)
            assert ledger.get_entry(entry_id).refunded_units == debit
    assert snapshot(engine_of(app), user_id).balance_units == 10 * U
    exact(app, user_id)


# --- A negative adjustment respects pending holds ---------------------------------


def test_negative_adjustment_over_http_cannot_eat_into_holds(app, client, admin, service, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
    hold = post(client, "/holds", {"user_id": user_id, "amount_usdc": "8"}, service, **key())
    assert hold.status_code == 201, hold.json
    before = money_state(app, user_id)
    for amount in ("-3", "-2.0000001"):
        body = {"user_id": user_id, "amount_usdc": amount, "reason": "chargeback"}
        refused = post(client, "/adjustments", body, admin, **key())
        assert_error(refused, 402, "INSUFFICIENT_CREDITS")
    assert money_state(app, user_id) == before
    body = {"user_id": user_id, "amount_usdc": "-2", "reason": "chargeback"}
    taken = post(client, "/adjustments", body, admin, **key())
    assert taken.status_code == 201, taken.json
    assert taken.json["balance_after_usdc"] == "8.0000000"
    shown = client.get(f"{BASE}?user_id={user_id}", headers=admin).json
    assert (shown["balance_usdc"], shown["held_usdc"], shown["available_usdc"]) == (
        "8.0000000", "8.0000000", "0.0000000",
    )  # fmt: skip
    body["amount_usdc"] = "-0.0000001"
    assert_error(post(client, "/adjustments", body, admin, **key()), 402, "INSUFFICIENT_CREDITS")
    released = post(client, f"/holds/{hold.json['id']}/release", {}, service, **key())
    assert released.status_code == 200, released.json
    body["amount_usdc"] = "-3"
    assert post(client, "/adjustments", body, admin, **key()).status_code == 201
    assert snapshot(engine_of(app), user_id).balance_units == 5 * U
    exact(app, user_id)


def test_negative_adjustment_in_python_cannot_eat_into_holds(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 8 * U, expires_in_seconds=60)
        before = money_state(app, user_id)
        with pytest.raises(InsufficientCredits):
            ledger.adjust(user_id, -3 * U, "chargeback")
        with pytest.raises(InsufficientCredits):
            ledger.update_balance(user_id, 7 * U, "correction")
        assert money_state(app, user_id) == before
        assert ledger.adjust(user_id, -2 * U, "chargeback").balance_after_units == 8 * U
        clock.advance(59)
        with pytest.raises(InsufficientCredits):
            ledger.adjust(user_id, -1, "still held")
        clock.advance(1)  # the hold expires: its reservation stops counting at once
        assert ledger.get_hold(hold.id).status == "expired"
        assert ledger.update_balance(user_id, 1 * U, "correction").amount_units == -7 * U
    assert snapshot(engine_of(app), user_id).balance_units == 1 * U
    exact(app, user_id, clock.now)


def test_racing_holds_and_negative_adjustments_spend_the_balance_once(app, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
    workers = 10
    barrier = threading.Barrier(workers)
    outcomes: list[tuple[str, object]] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        kind = "hold" if i % 2 else "adjust"
        try:
            with app.app_context():
                ledger = current_ledger()
                barrier.wait(timeout=60)
                if kind == "hold":
                    result: object = ledger.hold(user_id, 2 * U)
                else:
                    result = ledger.adjust(user_id, -2 * U, f"chargeback {i}")
        except InsufficientCredits as exc:
            result = exc
        except BaseException as exc:  # anything else is reported below
            result = exc
        with lock:
            outcomes.append((kind, result))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    unexpected = [r for _, r in outcomes if isinstance(r, BaseException)]
    unexpected = [r for r in unexpected if not isinstance(r, InsufficientCredits)]
    assert unexpected == []
    won = [(kind, r) for kind, r in outcomes if not isinstance(r, BaseException)]
    assert len(won) == 5  # 10 USDC, five reservations or debits of 2
    adjusted = sum(1 for kind, _ in won if kind == "adjust")
    with app.app_context():
        shown = current_ledger().find_by_user_id(user_id)
    assert shown is not None
    assert (shown.balance_units, shown.held_units, shown.available_units) == (
        (10 - 2 * adjusted) * U, 2 * (5 - adjusted) * U, 0,
    )  # fmt: skip
    exact(app, user_id)


# --- An idempotency key is scoped to its path ----------------------------------------


def test_same_key_on_two_holds_captures_both_over_http(app, client, service, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        first, second = ledger.hold(user_id, 2 * U), ledger.hold(user_id, 3 * U)
        third, fourth = ledger.hold(user_id, 1 * U), ledger.hold(user_id, 1 * U)
    shared = key()
    a = post(client, f"/holds/{first.id}/capture", {}, service, **shared)
    b = post(client, f"/holds/{second.id}/capture", {}, service, **shared)
    assert (a.status_code, b.status_code) == (200, 200), (a.json, b.json)
    assert "Idempotent-Replayed" not in b.headers
    assert (a.json["id"], a.json["captured_usdc"]) == (first.id, "2.0000000")
    assert (b.json["id"], b.json["captured_usdc"]) == (second.id, "3.0000000")
    assert b.json["transaction_id"] != a.json["transaction_id"]
    released = key()
    c = post(client, f"/holds/{third.id}/release", {}, service, **released)
    d = post(client, f"/holds/{fourth.id}/release", {}, service, **released)
    assert (c.json["id"], c.json["status"]) == (third.id, "released")
    assert (d.json["id"], d.json["status"], d.status_code) == (fourth.id, "released", 200)
    assert "Idempotent-Replayed" not in d.headers
    snap = snapshot(engine_of(app), user_id)
    assert snap.balance_units == 5 * U
    assert [(e.type, e.hold_id) for e in snap.entries[1:]] == [
        ("hold_capture", first.id), ("hold_capture", second.id),
    ]  # fmt: skip
    exact(app, user_id)


def test_same_key_and_body_on_topup_and_charge_are_two_requests(app, client, admin, user_id):
    body = {"user_id": user_id, "amount_usdc": "5"}
    shared = key()
    topup = post(client, "/topup", body, admin, **shared)
    charge = post(client, "/charge", body, admin, **shared)  # the admin scope may charge
    assert (topup.status_code, charge.status_code) == (201, 201), charge.json
    assert "Idempotent-Replayed" not in charge.headers
    assert (topup.json["type"], charge.json["type"]) == ("topup", "charge")
    assert charge.json["balance_after_usdc"] == "0.0000000"
    refunds = key()
    first = post(client, f"/transactions/{charge.json['id']}/refund", {"amount_usdc": "1"},
                 admin, **refunds)  # fmt: skip
    other = post(client, "/charge", body | {"amount_usdc": "1"}, admin, **key())
    second = post(client, f"/transactions/{other.json['id']}/refund", {"amount_usdc": "1"},
                  admin, **refunds)  # fmt: skip
    assert (first.status_code, second.status_code) == (201, 201), second.json
    assert (first.json["refund_of"], second.json["refund_of"]) == (
        charge.json["id"], other.json["id"],
    )  # fmt: skip
    snap = snapshot(engine_of(app), user_id)
    assert [e.type for e in snap.entries] == ["topup", "charge", "refund", "charge", "refund"]
    assert snap.balance_units == 1 * U
    exact(app, user_id)


def test_same_key_on_two_python_operations_is_two_keys(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        topup = ledger.top_up(user_id, 5 * U, idempotency_key="shared")
        charge = ledger.charge(user_id, 5 * U, idempotency_key="shared")
        assert (topup.type, charge.type) == ("topup", "charge")
        assert charge.id != topup.id
        ledger.top_up(user_id, 10 * U)
        first, second = ledger.hold(user_id, 2 * U), ledger.hold(user_id, 3 * U)
        a = ledger.capture(first.id, idempotency_key="capture")
        assert (a.id, a.status, a.captured_units) == (first.id, "captured", 2 * U)
        # A Python key is scoped to its operation, and the hold is part of
        # the request: another hold under the key is refused, never answered
        # with the first hold's capture.
        with pytest.raises(IdempotencyConflict):
            ledger.capture(second.id, idempotency_key="capture")
        assert ledger.get_hold(second.id).status == "pending"
        assert ledger.capture(first.id, idempotency_key="capture") == a
        b = ledger.capture(second.id, idempotency_key="capture-2")
        assert (b.id, b.captured_units) == (second.id, 3 * U)
    assert snapshot(engine_of(app), user_id).balance_units == 5 * U
    exact(app, user_id)


# --- Only live holds are listed ----------------------------------------------------


def test_hold_list_leaves_out_expired_and_resolved_holds(app, client, auth, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        early = ledger.hold(user_id, 1 * U, expires_in_seconds=60)
        clock.advance(1)
        late = ledger.hold(user_id, 2 * U, expires_in_seconds=120)
        clock.advance(1)
        ledger.capture(ledger.hold(user_id, 1 * U).id, 1)
        ledger.release(ledger.hold(user_id, 1 * U).id)
    mine = auth(user_id)

    def listed(limit: int = 20) -> list[str]:
        page = client.get(f"{BASE}/holds?limit={limit}", headers=mine)
        assert page.status_code == 200, page.json
        ids = [h["id"] for h in page.json["data"]]
        assert all(h["status"] == "pending" for h in page.json["data"])
        with app.app_context():
            python = current_ledger().pending_holds(user_id, limit=limit)
        assert [h.id for h in python.items] == ids
        assert (python.has_more, page.json["has_more"]) == (False, False)
        held = client.get(BASE, headers=mine).json["held_usdc"]
        amounts = sum(int(h["amount_usdc"].split(".")[0]) for h in page.json["data"])
        assert held == f"{amounts}.0000000"  # the list and the balance agree
        return ids

    assert listed() == [late.id, early.id]
    clock.set(early.expires_at - timedelta(microseconds=1))
    assert listed() == [late.id, early.id]
    clock.set(early.expires_at)
    assert listed() == [late.id]
    assert listed(limit=1) == [late.id]
    clock.set(late.expires_at - timedelta(microseconds=1))
    assert listed() == [late.id]
    clock.set(late.expires_at)
    assert listed() == []
    exact(app, user_id, clock.now)


# --- prune deletes expired keys only ---------------------------------------------------


def test_prune_keeps_live_keys_so_a_retry_still_replays(app, client, admin, service, user_id):
    # Long ago, so no other test's key has expired by then.
    clock = Clock(datetime(2001, 1, 1, tzinfo=timezone.utc))
    app.extensions["callora_credits"].clock = clock
    app.config["CREDITS_IDEMPOTENCY_TTL_SECONDS"] = 100
    start = clock.now
    # Another test's keys that would expire within this test's 150 s go first,
    # so the counts below are this test's own whatever ran before.
    clock.set(start + timedelta(seconds=150))
    ledger_of(app).prune_idempotency_keys()
    clock.set(start)
    topup_key, charge_key = key(), key()
    topup_body = {"user_id": user_id, "amount_usdc": "5"}
    charge_body = {"user_id": user_id, "amount_usdc": "1"}
    assert post(client, "/topup", topup_body, admin, **topup_key).status_code == 201
    clock.advance(50)
    charged = post(client, "/charge", charge_body, service, **charge_key)
    assert charged.status_code == 201
    ledger = ledger_of(app)
    ledger.top_up(user_id, 1, idempotency_key="python-key")
    clock.advance(50)  # the top-up's key expires now; the others in 50 s
    assert ledger.prune_idempotency_keys() == 1
    assert stored_keys(app, topup_key["Idempotency-Key"]) == []
    assert len(stored_keys(app, charge_key["Idempotency-Key"])) == 1
    assert len(stored_keys(app, "python-key")) == 1
    # The retries of live keys replay; nothing applies twice.
    again = post(client, "/charge", charge_body, service, **charge_key)
    assert (again.status_code, again.get_data()) == (201, charged.get_data())
    assert again.headers["Idempotent-Replayed"] == "true"
    assert ledger.top_up(user_id, 1, idempotency_key="python-key").seq == 3
    assert len(snapshot(engine_of(app), user_id).entries) == 3
    clock.set(start + timedelta(seconds=150) - timedelta(microseconds=1))
    runner = app.test_cli_runner()
    said = runner.invoke(args=["credits", "prune"])
    assert (said.exit_code, said.output.strip()) == (0, "deleted 0 expired idempotency keys")
    clock.set(start + timedelta(seconds=150))
    said = runner.invoke(args=["credits", "prune"])
    assert (said.exit_code, said.output.strip()) == (0, "deleted 2 expired idempotency keys")
    # An expired key is a new key: its retry applies again.
    fresh = post(client, "/charge", charge_body, service, **charge_key)
    assert fresh.status_code == 201
    assert "Idempotent-Replayed" not in fresh.headers
    assert fresh.json["id"] != charged.json["id"]
    snap = snapshot(engine_of(app), user_id)
    assert (len(snap.entries), snap.balance_units) == (4, 3 * U + 1)
    assert account_problems(snap) == []


# --- reconcile checks every chain, and is not the only judge --------------------------


def _set_entry(app: Flask, entry_id: str, **values: int) -> None:
    t = LedgerEntry.__table__
    with engine_of(app).begin() as conn:
        conn.execute(sa.update(t).where(t.c.id == entry_id).values(**values))


def test_reconcile_catches_a_broken_balance_after_chain(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        middle = ledger.charge(user_id, 3 * U)
        ledger.top_up(user_id, 5 * U)
        assert ledger.reconcile(user_id).ok
    exact(app, user_id)
    # Balance == sum and seq stay right; only the chain of balance_after breaks.
    _set_entry(app, middle.id, balance_after_units=8 * U)
    try:
        with app.app_context():
            report = current_ledger().reconcile(user_id)
        assert not report.ok
        assert {m.user_id for m in report.mismatches} == {user_id}
        assert any("seq 2" in m.problem for m in report.mismatches), report.mismatches
        independent = account_problems(snapshot(engine_of(app), user_id))
        assert any("seq 2" in p and "balance_after" in p for p in independent), independent
        said = app.test_cli_runner().invoke(args=["credits", "reconcile", "--user", user_id])
        assert said.exit_code == 1, said.output
        assert user_id in said.output
    finally:
        _set_entry(app, middle.id, balance_after_units=7 * U)
    with app.app_context():
        assert current_ledger().reconcile(user_id).ok
    exact(app, user_id)


def test_reconcile_catches_a_gap_in_seq(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.charge(user_id, 3 * U)
        last = ledger.top_up(user_id, 5 * U)
    a = Account.__table__
    # The sum and the balance_after chain stay right; seq jumps 2 -> 4.
    _set_entry(app, last.id, seq=4)
    with engine_of(app).begin() as conn:
        conn.execute(sa.update(a).where(a.c.user_id == user_id).values(last_seq=4))
    try:
        with app.app_context():
            report = current_ledger().reconcile(user_id)
        assert not report.ok
        assert any("seq 4" in m.problem for m in report.mismatches), report.mismatches
        independent = account_problems(snapshot(engine_of(app), user_id))
        assert any("missing [3]" in p for p in independent), independent
    finally:
        _set_entry(app, last.id, seq=3)
        with engine_of(app).begin() as conn:
            conn.execute(sa.update(a).where(a.c.user_id == user_id).values(last_seq=3))
    exact(app, user_id)


# --- A capture carries the hold's metadata -------------------------------------------


def test_capture_entry_carries_the_hold_metadata_over_http(app, client, auth, service, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
    tags = {"job": "render-42", "region": "eu-1"}
    for body, metadata in (({"amount_usdc": "1"}, tags), ({}, {"job": "other"}), ({}, {})):
        asked = {"user_id": user_id, "amount_usdc": "2", "metadata": metadata}
        hold = post(client, "/holds", asked, service, **key())
        assert hold.json["metadata"] == metadata
        done = post(client, f"/holds/{hold.json['id']}/capture", body, service, **key())
        assert done.status_code == 200, done.json
        entry = client.get(f"{BASE}/transactions/{done.json['transaction_id']}",
                           headers=auth(user_id)).json  # fmt: skip
        assert (entry["type"], entry["hold_id"], entry["metadata"]) == (
            "hold_capture", hold.json["id"], metadata,
        )  # fmt: skip
    history = client.get(f"{BASE}/transactions?type=hold_capture", headers=auth(user_id)).json
    assert [e["metadata"] for e in history["data"]] == [{}, {"job": "other"}, tags]
    exact(app, user_id)  # the raw checker compares each capture with its hold


def test_capture_entry_carries_the_hold_metadata_in_python(app, user_id):
    tags = {"invoice": "inv_7", "note": ""}
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 2 * U, metadata=tags)
        done = ledger.capture(hold.id, 1 * U, idempotency_key="cap")
        assert done.transaction_id is not None
        entry = ledger.get_entry(done.transaction_id)
        assert entry is not None
        assert (entry.type, entry.hold_id, entry.metadata) == ("hold_capture", hold.id, tags)
        assert ledger.history(user_id, type="hold_capture").items[0].metadata == tags
        assert ledger.capture(hold.id, 1 * U, idempotency_key="cap") == done
    exact(app, user_id)


# --- Every stored outcome replays, byte for byte ---------------------------------------


def send_twice(
    client: Any, path: str, body: Any, headers: dict[str, str], between: Callable[[], Any]
) -> tuple[Any, Any]:
    """POST the same request under one key, with ``between`` run in between;
    the second answer must be the first's stored bytes, marked replayed."""
    shared = key()
    first = post(client, path, body, headers, **shared, **{"X-Request-Id": "req-first"})
    between()
    second = post(client, path, body, headers, **shared, **{"X-Request-Id": "req-second"})
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers.get("Idempotent-Replayed") == "true", second.get_data()
    assert second.status_code == first.status_code
    assert second.get_data() == first.get_data()
    assert second.headers["X-Request-Id"] == "req-second"
    return first, second


def nothing() -> None:
    return None


def test_replayed_404_of_a_missing_target(client, admin, service):
    for path, headers in (
        (f"/holds/{MISSING_HOLD}/capture", service),
        (f"/holds/{MISSING_HOLD}/release", service),
        (f"/transactions/{MISSING_ENTRY}/refund", admin),
    ):
        first, _ = send_twice(client, path, {}, headers, nothing)
        assert assert_error(first, 404, "NOT_FOUND")["requestId"] == "req-first"


def test_replayed_409_hold_not_pending(app, client, service, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 2 * U)
        ledger.release(hold.id)
        other = ledger.hold(user_id, 1 * U)
    first, _ = send_twice(
        client, f"/holds/{hold.id}/capture", {"amount_usdc": "1"}, service,
        lambda: ledger_of(app).capture(other.id),
    )  # fmt: skip
    assert_error(first, 409, "HOLD_NOT_PENDING")
    assert snapshot(engine_of(app), user_id).balance_units == 9 * U


def test_replayed_409_duplicate_reference(app, client, admin, service, user_id):
    paid = {"user_id": user_id, "amount_usdc": "5", "reference": "pay_1"}
    original = post(client, "/topup", paid, admin, **key())
    assert original.status_code == 201
    first, _ = send_twice(
        client, "/topup", {"user_id": user_id, "amount_usdc": "7", "reference": "pay_1"}, admin,
        lambda: ledger_of(app).charge(user_id, 1 * U),
    )  # fmt: skip
    body = assert_error(first, 409, "DUPLICATE_REFERENCE")
    assert body["details"][0]["transaction_id"] == original.json["id"]
    held = post(client, "/holds", {"user_id": user_id, "amount_usdc": "1", "reference": "job_1"},
                service, **key())  # fmt: skip
    assert held.status_code == 201
    first, _ = send_twice(
        client, "/holds", {"user_id": user_id, "amount_usdc": "2", "reference": "job_1"}, service,
        lambda: ledger_of(app).release(held.json["id"]),
    )  # fmt: skip
    body = assert_error(first, 409, "DUPLICATE_REFERENCE")
    assert body["details"][0]["transaction_id"] == held.json["id"]
    assert snapshot(engine_of(app), user_id).balance_units == 4 * U


def test_replayed_422_hold_amount_exceeded_after_the_hold_is_captured(
    app, client, service, user_id
):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 2 * U)
    first, _ = send_twice(
        client, f"/holds/{hold.id}/capture", {"amount_usdc": "2.0000001"}, service,
        lambda: ledger_of(app).capture(hold.id),
    )  # fmt: skip
    # Asked afresh it would now be a 409 HOLD_NOT_PENDING.
    assert_error(first, 422, "HOLD_AMOUNT_EXCEEDED")
    assert snapshot(engine_of(app), user_id).balance_units == 8 * U


def test_replayed_422_refund_exceeds_charge_after_a_refund(app, client, admin, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, 4 * U)
    first, _ = send_twice(
        client, f"/transactions/{charge.id}/refund", {"amount_usdc": "4.0000001"}, admin,
        lambda: ledger_of(app).refund(charge.id, 1 * U),
    )  # fmt: skip
    assert_error(first, 422, "REFUND_EXCEEDS_CHARGE")
    assert snapshot(engine_of(app), user_id).balance_units == 7 * U


def test_replayed_422_balance_limit_after_the_balance_went_down(app, client, admin, user_id):
    app.config["CREDITS_MAX_BALANCE_USDC"] = "10"
    with app.app_context():
        current_ledger().top_up(user_id, 6 * U)
    first, _ = send_twice(
        client, "/topup", {"user_id": user_id, "amount_usdc": "5"}, admin,
        lambda: ledger_of(app).charge(user_id, 3 * U),  # 3 + 5 would now fit
    )  # fmt: skip
    assert_error(first, 422, "BALANCE_LIMIT_EXCEEDED")
    assert snapshot(engine_of(app), user_id).balance_units == 3 * U


@pytest.mark.parametrize("path", ["/charge", "/holds", "/adjustments"])
def test_replayed_402_after_a_top_up(app, client, admin, user_id, path):
    body: dict[str, Any] = {"user_id": user_id, "amount_usdc": "2"}
    if path == "/adjustments":
        body = {**body, "amount_usdc": "-2", "reason": "chargeback"}
    with app.app_context():
        current_ledger().top_up(user_id, 1 * U)
    first, _ = send_twice(
        client, path, body, admin, lambda: ledger_of(app).top_up(user_id, 100 * U)
    )
    assert_error(first, 402, "INSUFFICIENT_CREDITS")
    snap = snapshot(engine_of(app), user_id)
    assert (snap.balance_units, len(snap.entries), snap.holds) == (101 * U, 2, [])


def test_replayed_success_shows_the_state_it_made(app, client, admin, service, user_id):
    first, _ = send_twice(
        client, "/topup", {"user_id": user_id, "amount_usdc": "5"}, admin,
        lambda: ledger_of(app).charge(user_id, 1 * U),
    )  # fmt: skip
    assert (first.status_code, first.json["balance_after_usdc"]) == (201, "5.0000000")
    hold = post(client, "/holds", {"user_id": user_id, "amount_usdc": "2"}, service, **key())
    first, _ = send_twice(
        client, f"/holds/{hold.json['id']}/capture", {"amount_usdc": "1"}, service,
        lambda: ledger_of(app).top_up(user_id, 1 * U),
    )  # fmt: skip
    assert (first.status_code, first.json["status"]) == (200, "captured")
    assert snapshot(engine_of(app), user_id).balance_units == 4 * U
    exact(app, user_id)


def _raised(call: Callable[[], Any]) -> CreditsError:
    with pytest.raises(CreditsError) as caught:
        call()
    return caught.value


def _python_replays(
    app: Flask, key_text: str, call: Callable[[], Any], between: Callable[[], Any]
) -> CreditsError:
    """The error of ``call`` is stored under ``key_text`` and raised again,
    unchanged, after ``between`` changed the state."""
    with app.app_context():
        first = _raised(call)
        assert [(m, status) for m, _, status in stored_keys(app, key_text)] == [("CALL", 1)]
        between()
        second = _raised(call)
    assert type(second) is type(first)
    assert (second.code, second.message, second.details) == (
        first.code, first.message, first.details,
    )  # fmt: skip
    return first


def test_python_replays_every_stored_error(app, user_id):
    app.config["CREDITS_MAX_BALANCE_USDC"] = "20"
    ledger = ledger_of(app)
    with app.app_context():
        ledger.top_up(user_id, 10 * U, reference="pay_1")
        spent = ledger.hold(user_id, 2 * U)
        ledger.release(spent.id)
        pending = ledger.hold(user_id, 2 * U)
        charge = ledger.charge(user_id, 4 * U)
    k = f"{user_id}:"
    cases: list[tuple[type[CreditsError], Callable[[], Any], Callable[[], Any]]] = [
        (NotFound, lambda: ledger.capture(MISSING_HOLD, idempotency_key=k + "1"), nothing),
        (NotFound, lambda: ledger.refund(MISSING_ENTRY, idempotency_key=k + "2"), nothing),
        (HoldNotPending, lambda: ledger.release(spent.id, idempotency_key=k + "3"), nothing),
        (
            DuplicateReference,
            lambda: ledger.top_up(user_id, 1, reference="pay_1", idempotency_key=k + "4"),
            lambda: ledger.charge(user_id, 1 * U),
        ),
        (
            HoldAmountExceeded,
            lambda: ledger.capture(pending.id, 2 * U + 1, idempotency_key=k + "5"),
            lambda: ledger.capture(pending.id, 1 * U),  # now the hold is not pending
        ),
        (
            RefundExceedsCharge,
            lambda: ledger.refund(charge.id, 4 * U + 1, idempotency_key=k + "6"),
            lambda: ledger.refund(charge.id, 1 * U),
        ),
        (
            BalanceLimitExceeded,
            lambda: ledger.top_up(user_id, 16 * U, idempotency_key=k + "7"),
            lambda: ledger.charge(user_id, 5 * U),  # now it would fit
        ),
        (
            InsufficientCredits,
            lambda: ledger.charge(user_id, 5 * U, idempotency_key=k + "8"),
            lambda: ledger.top_up(user_id, 10 * U),  # now it would be covered
        ),
        (
            InsufficientCredits,
            lambda: ledger.hold(user_id, 11 * U, idempotency_key=k + "9"),
            lambda: ledger.top_up(user_id, 2 * U),
        ),
        (
            InsufficientCredits,
            lambda: ledger.adjust(user_id, -13 * U, "chargeback", idempotency_key=k + "10"),
            lambda: ledger.top_up(user_id, 1 * U),
        ),
    ]
    for n, (kind, call, between) in enumerate(cases, start=1):
        error = _python_replays(app, k + str(n), call, between)
        assert type(error) is kind, (n, error)
        if kind is DuplicateReference:
            assert (
                error.details[0]["transaction_id"]
                == snapshot(engine_of(app), user_id).entries[0].id
            )
    snap = snapshot(engine_of(app), user_id)
    # 10 - 4 (charge) - 1 - 1 (capture) + 1 (refund) - 5 + 10 + 2 + 1
    assert snap.balance_units == 13 * U
    exact(app, user_id)
