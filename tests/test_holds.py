"""Two-phase holds: reservation, capture, release, expiry."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, SERVICE_SCOPE
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.db.models import HoldRow
from callora_credits.errors import HoldAmountExceeded, HoldNotPending, InsufficientCredits

BASE = "/api/billing/credits"
U = 10_000_000


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


@pytest.fixture
def service(auth):
    return auth("gateway", scopes=SERVICE_SCOPE)


def fund(app, user_id, units):
    with app.app_context():
        current_ledger().top_up(user_id, units)


def test_hold_reduces_available_and_capture_releases_the_rest(app, client, auth, service, user_id):
    fund(app, user_id, 10 * U)
    hold = client.post(
        f"{BASE}/holds",
        json={"user_id": user_id, "amount_usdc": "4"},
        headers={**service, **key()},
    )
    assert hold.status_code == 201, hold.json
    assert (hold.json["status"], hold.json["amount_usdc"]) == ("pending", "4.0000000")
    shown = client.get(BASE, headers=auth(user_id)).json
    assert (shown["balance_usdc"], shown["held_usdc"], shown["available_usdc"]) == (
        "10.0000000", "4.0000000", "6.0000000",
    )  # fmt: skip
    charge = client.post(
        f"{BASE}/charge", json={"user_id": user_id, "amount_usdc": "6.0000001"},
        headers={**service, **key()},
    )  # fmt: skip
    assert charge.status_code == 402
    captured = client.post(
        f"{BASE}/holds/{hold.json['id']}/capture", json={"amount_usdc": "1.5"},
        headers={**service, **key()},
    )  # fmt: skip
    assert captured.status_code == 200, captured.json
    assert (captured.json["status"], captured.json["captured_usdc"]) == ("captured", "1.5000000")
    entry = client.get(
        f"{BASE}/transactions/{captured.json['transaction_id']}", headers=auth(user_id)
    ).json
    assert (entry["type"], entry["amount_usdc"], entry["hold_id"]) == (
        "hold_capture", "-1.5000000", hold.json["id"],
    )  # fmt: skip
    shown = client.get(BASE, headers=auth(user_id)).json
    assert (shown["balance_usdc"], shown["held_usdc"], shown["available_usdc"]) == (
        "8.5000000", "0.0000000", "8.5000000",
    )  # fmt: skip


def test_six_holds_on_five_thousand_exactly_five_succeed(app, user_id):
    fund(app, user_id, 5000 * U)
    barrier = threading.Barrier(6)
    results: list[object] = []

    def place():
        with app.app_context():
            barrier.wait()
            try:
                results.append(current_ledger().hold(user_id, 1000 * U))
            except InsufficientCredits as exc:
                results.append(exc)

    threads = [threading.Thread(target=place) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, InsufficientCredits) for r in results) == 1
    with app.app_context():
        shown = current_ledger().find_by_user_id(user_id)
    assert (shown.held_units, shown.available_units) == (5000 * U, 0)


def test_resolving_twice_and_capturing_more_are_refused(app, user_id):
    fund(app, user_id, 10 * U)
    with app.app_context():
        ledger = current_ledger()
        hold = ledger.hold(user_id, 2 * U)
        with pytest.raises(HoldAmountExceeded):
            ledger.capture(hold.id, 2 * U + 1)
        ledger.capture(hold.id)
        with pytest.raises(HoldNotPending):
            ledger.capture(hold.id)
        with pytest.raises(HoldNotPending):
            ledger.release(hold.id)
        other = ledger.hold(user_id, 1 * U)
        assert ledger.release(other.id).status == "released"
        with pytest.raises(HoldNotPending):
            ledger.capture(other.id)
        zero = ledger.hold(user_id, 1 * U)
        assert ledger.capture(zero.id, 0).status == "released"
        assert ledger.find_by_user_id(user_id).balance_units == 8 * U
        assert ledger.reconcile(user_id).ok
        assert ledger_problems(ledger.engine, user_id) == []


def test_expiry_frees_available_without_a_sweeper(app, clock, user_id):
    fund(app, user_id, 3 * U)
    with app.app_context():
        ledger = current_ledger()
        hold = ledger.hold(user_id, 3 * U, expires_in_seconds=60)
        assert ledger.find_by_user_id(user_id).available_units == 0
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 1)
        clock.advance(59)
        assert ledger.find_by_user_id(user_id).available_units == 0
        clock.advance(1)
        assert ledger.find_by_user_id(user_id).available_units == 3 * U
        assert ledger.get_hold(hold.id).status == "expired"
        with pytest.raises(HoldNotPending):
            ledger.capture(hold.id)
        ledger.charge(user_id, 3 * U)  # writes the expiry first
        holds = HoldRow.__table__
        with ledger.engine.connect() as conn:
            written = conn.execute(
                sa.select(holds.c.status).where(holds.c.id == hold.id)
            ).scalar_one()
        assert written == "expired"  # as written, before any sweep
        ledger.expire_holds()
        assert ledger.get_hold(hold.id).status == "expired"
        assert ledger.find_by_user_id(user_id).balance_units == 0


def test_concurrent_captures_and_releases_one_wins(app, user_id):
    fund(app, user_id, 10 * U)
    with app.app_context():
        hold = current_ledger().hold(user_id, 5 * U)
    barrier = threading.Barrier(12)
    wins: list[str] = []
    losses: list[Exception] = []

    def resolve(i):
        with app.app_context():
            ledger = current_ledger()
            barrier.wait()
            try:
                if i % 2:
                    wins.append(ledger.capture(hold.id).status)
                else:
                    wins.append(ledger.release(hold.id).status)
            except HoldNotPending as exc:
                losses.append(exc)

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert len(losses) == 11
    with app.app_context():
        ledger = current_ledger()
        expected = 5 * U if wins == ["captured"] else 10 * U
        assert ledger.find_by_user_id(user_id).balance_units == expected
        assert ledger.reconcile(user_id).ok
        assert ledger_problems(ledger.engine, user_id) == []


def test_holds_http_list_get_and_permissions(app, client, auth, service, user_id):
    fund(app, user_id, 10 * U)
    ids = []
    for _ in range(3):
        response = client.post(
            f"{BASE}/holds", json={"user_id": user_id, "amount_usdc": "1", "metadata": {"k": "v"}},
            headers={**service, **key()},
        )  # fmt: skip
        ids.append(response.json["id"])
    first = client.get(f"{BASE}/holds?limit=2", headers=auth(user_id)).json
    assert first["has_more"] is True
    second = client.get(
        f"{BASE}/holds?limit=2&cursor={first['next_cursor']}", headers=auth(user_id)
    ).json
    listed = [h["id"] for h in first["data"] + second["data"]]
    assert sorted(listed) == sorted(ids)
    assert len(set(listed)) == 3
    assert client.get(f"{BASE}/holds/{ids[0]}", headers=auth(user_id)).status_code == 200
    assert client.get(f"{BASE}/holds/{ids[0]}", headers=auth("stranger")).status_code == 404
    admin = auth(ADMIN, scopes=ADMIN_SCOPE)
    assert client.get(f"{BASE}/holds?user_id={user_id}", headers=admin).status_code == 200
    assert client.get(f"{BASE}/holds?user_id={user_id}", headers=auth("x")).status_code == 403
    user_hold = client.post(
        f"{BASE}/holds", json={"user_id": user_id, "amount_usdc": "1"},
        headers={**auth(user_id), **key()},
    )  # fmt: skip
    assert user_hold.status_code == 403
    release = client.post(f"{BASE}/holds/{ids[0]}/release", headers={**service, **key()})
    assert release.status_code == 200
    again = client.post(f"{BASE}/holds/{ids[0]}/release", headers={**service, **key()})
    assert again.status_code == 409
    assert again.json["code"] == "HOLD_NOT_PENDING"
    missing = client.post(f"{BASE}/holds/hold_nope/capture", headers={**service, **key()})
    assert missing.status_code == 404
    too_long = client.post(
        f"{BASE}/holds",
        json={"user_id": user_id, "amount_usdc": "1", "expires_in_seconds": 86401},
        headers={**service, **key()},
    )
    assert too_long.status_code == 400
    unknown_user = client.post(
        f"{BASE}/holds", json={"user_id": f"{user_id}_nobody", "amount_usdc": "1"},
        headers={**service, **key()},
    )  # fmt: skip
    assert unknown_user.status_code == 402
