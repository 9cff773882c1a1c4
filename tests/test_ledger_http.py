"""POST /credits/topup, /charge, /adjustments, refunds and the history, over HTTP."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, SERVICE_SCOPE, assert_error

from callora_credits.db.models import Account, LedgerEntry

BASE = "/api/billing/credits"


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


@pytest.fixture
def admin(auth):
    return auth(ADMIN, scopes=ADMIN_SCOPE)


@pytest.fixture
def service(auth):
    return auth("gateway", scopes=SERVICE_SCOPE)


def top_up(client, admin, user_id, amount="10.0000000", **extra):
    body = {"user_id": user_id, "amount_usdc": amount, **extra}
    return client.post(f"{BASE}/topup", json=body, headers={**admin, **key()})


def balance_units(app, user_id):
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            t = Account.__table__
            return conn.execute(
                sa.select(t.c.balance_units).where(t.c.user_id == user_id)
            ).scalar()


def entry_count(app, user_id):
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            t = LedgerEntry.__table__
            return conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.user_id == user_id)
            ).scalar_one()


def test_top_up_returns_the_entry(client, admin, user_id):
    response = top_up(client, admin, user_id, "12.5", reference="pay_1", metadata={"a": "b"})
    assert response.status_code == 201, response.json
    entry = response.json
    assert set(entry) == {
        "id", "user_id", "seq", "type", "amount_usdc", "balance_after_usdc", "reference",
        "description", "metadata", "hold_id", "refund_of", "refunded_usdc", "grant_id",
        "allocations", "actor_id", "created_at",
    }  # fmt: skip
    assert entry["id"].startswith("ctx_")
    assert (entry["type"], entry["seq"], entry["amount_usdc"]) == ("topup", 1, "12.5000000")
    assert entry["balance_after_usdc"] == "12.5000000"
    assert (entry["actor_id"], entry["metadata"]) == (ADMIN, {"a": "b"})
    assert response.headers["X-Request-Id"]


def test_charge_and_402(client, admin, service, user_id):
    top_up(client, admin, user_id, "1")
    ok = client.post(
        f"{BASE}/charge", json={"user_id": user_id, "amount_usdc": "0.4"},
        headers={**service, **key()},
    )  # fmt: skip
    assert ok.status_code == 201
    assert ok.json["amount_usdc"] == "-0.4000000"
    short = client.post(
        f"{BASE}/charge", json={"user_id": user_id, "amount_usdc": "0.6000001"},
        headers={**service, **key()},
    )  # fmt: skip
    assert short.status_code == 402
    assert short.json["code"] == "INSUFFICIENT_CREDITS"
    assert balance_units(client.application, user_id) == 6_000_000


@pytest.mark.parametrize(
    "amount",
    [
        10, 1.5, "1e3", "+1", "-1", "NaN", "Infinity", "١٢", "1.12345678", " 1", "1 ", "1\n",
        "1.", ".5", "", "0", "0.0000000", "abc", None, True, [], {}, "1000000000.0000001",
        "9" * 50,
    ],
)  # fmt: skip
def test_bad_amounts_are_400_and_change_nothing(client, admin, user_id, amount):
    response = top_up(client, admin, user_id, amount)
    assert response.status_code == 400, response.json
    assert response.json["code"] == "VALIDATION_ERROR"
    assert response.json["details"][0]["field"] == "amount_usdc"
    assert response.json["details"][0]["message"]
    assert entry_count(client.application, user_id) == 0


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code"),
    [
        (b"not json", "application/json", 400, "VALIDATION_ERROR"),
        (b'{"user_id": "u", "amount_usdc": NaN}', "application/json", 400, "VALIDATION_ERROR"),
        (b"[1, 2]", "application/json", 400, "VALIDATION_ERROR"),
        # 200,000 bytes: past CREDITS_MAX_BODY_BYTES before it is ever parsed.
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 413, "PAYLOAD_TOO_LARGE"),
        (b'"just a string"', "text/plain", 400, "VALIDATION_ERROR"),
    ],
)
def test_non_object_bodies_are_refused(client, admin, raw, content_type, status, code):
    response = client.post(
        f"{BASE}/topup", data=raw, headers={**admin, **key(), "Content-Type": content_type}
    )
    assert_error(response, status, code)


def test_unknown_body_field_is_400(client, admin, user_id):
    response = top_up(client, admin, user_id, "1", bonus="yes")
    assert response.status_code == 400
    assert response.json["details"][0]["field"] == "bonus"


def test_large_body_is_413(client, admin, user_id):
    response = top_up(client, admin, user_id, "1", description="x" * 70_000)
    assert response.status_code == 413
    assert response.json["code"] == "PAYLOAD_TOO_LARGE"


def test_missing_idempotency_key_is_400(client, admin, user_id):
    response = client.post(
        f"{BASE}/topup", json={"user_id": user_id, "amount_usdc": "1"}, headers=admin
    )
    assert response.status_code == 400
    assert response.json["code"] == "IDEMPOTENCY_KEY_REQUIRED"
    bad = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": "1"},
        headers={**admin, "Idempotency-Key": "a\tb"},
    )
    assert bad.status_code == 400
    assert entry_count(client.application, user_id) == 0


def test_replay_is_byte_for_byte_with_header(client, admin, user_id):
    headers = {**admin, **key()}
    body = {"user_id": user_id, "amount_usdc": "3"}
    first = client.post(f"{BASE}/topup", json=body, headers={**headers, "X-Request-Id": "r1"})
    second = client.post(f"{BASE}/topup", json=body, headers={**headers, "X-Request-Id": "r2"})
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.data == second.data
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["X-Request-Id"] == "r2"
    assert balance_units(client.application, user_id) == 30_000_000
    conflict = client.post(f"{BASE}/topup", json={**body, "amount_usdc": "4"}, headers=headers)
    assert conflict.status_code == 422
    assert conflict.json["code"] == "IDEMPOTENCY_CONFLICT"


def test_402_replays_as_402_after_top_up(client, admin, service, user_id):
    headers = {**service, **key(), "X-Request-Id": "first"}
    body = {"user_id": user_id, "amount_usdc": "2"}
    first = client.post(f"{BASE}/charge", json=body, headers=headers)
    assert first.status_code == 402
    top_up(client, admin, user_id, "100")
    again = client.post(f"{BASE}/charge", json=body, headers={**headers, "X-Request-Id": "x"})
    assert again.status_code == 402
    assert again.data == first.data
    assert again.json["requestId"] == "first"
    assert balance_units(client.application, user_id) == 1_000_000_000


def test_validation_errors_are_not_stored(client, admin, user_id):
    headers = {**admin, **key()}
    bad = client.post(
        f"{BASE}/topup", json={"user_id": user_id, "amount_usdc": 1}, headers=headers
    )
    assert bad.status_code == 400
    good = client.post(
        f"{BASE}/topup", json={"user_id": user_id, "amount_usdc": "1"}, headers=headers
    )
    assert good.status_code == 201


def test_keys_are_scoped_per_caller(client, auth, user_id):
    shared = {"Idempotency-Key": "same-key"}
    body = {"user_id": user_id, "amount_usdc": "1"}
    a = client.post(
        f"{BASE}/topup", json=body, headers={**auth("admin_a", scopes=ADMIN_SCOPE), **shared}
    )
    b = client.post(
        f"{BASE}/topup", json=body, headers={**auth("admin_b", scopes=ADMIN_SCOPE), **shared}
    )
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json["id"] != b.json["id"]
    assert "Idempotent-Replayed" not in b.headers


def test_duplicate_reference_409_names_the_entry(client, admin, user_id):
    first = top_up(client, admin, user_id, "1", reference="stellar_abc")
    second = top_up(client, admin, user_id, "1", reference="stellar_abc")
    assert second.status_code == 409
    assert second.json["code"] == "DUPLICATE_REFERENCE"
    assert second.json["details"][0]["transaction_id"] == first.json["id"]


def test_scopes(client, auth, user_id):
    user = auth(user_id)
    service = auth("gw", scopes=SERVICE_SCOPE)
    body = {"user_id": user_id, "amount_usdc": "1"}
    assert client.post(f"{BASE}/topup", json=body, headers={**user, **key()}).status_code == 403
    assert client.post(f"{BASE}/topup", json=body, headers={**service, **key()}).status_code == 403
    assert client.post(f"{BASE}/charge", json=body, headers={**user, **key()}).status_code == 403
    spoof = auth(user_id, scopes="credits:charge:extra credits:adminx")
    assert client.post(f"{BASE}/charge", json=body, headers={**spoof, **key()}).status_code == 403


def test_refund_and_history(client, admin, service, auth, user_id):
    top_up(client, admin, user_id, "10")
    charge = client.post(
        f"{BASE}/charge", json={"user_id": user_id, "amount_usdc": "4"},
        headers={**service, **key()},
    ).json  # fmt: skip
    refund = client.post(
        f"{BASE}/transactions/{charge['id']}/refund", json={"amount_usdc": "1"},
        headers={**admin, **key()},
    )  # fmt: skip
    assert refund.status_code == 201, refund.json
    assert (refund.json["refund_of"], refund.json["amount_usdc"]) == (charge["id"], "1.0000000")
    rest = client.post(f"{BASE}/transactions/{charge['id']}/refund", headers={**admin, **key()})
    assert rest.json["amount_usdc"] == "3.0000000"
    over = client.post(f"{BASE}/transactions/{charge['id']}/refund", headers={**admin, **key()})
    assert over.status_code == 422
    assert over.json["code"] == "REFUND_EXCEEDS_CHARGE"
    mine = auth(user_id)
    history = client.get(f"{BASE}/transactions", headers=mine).json
    assert [e["seq"] for e in history["data"]] == [4, 3, 2, 1]
    assert history["has_more"] is False
    one = client.get(f"{BASE}/transactions/{charge['id']}", headers=mine)
    assert one.json["refunded_usdc"] == "4.0000000"
    other = client.get(f"{BASE}/transactions/{charge['id']}", headers=auth("someone_else"))
    assert other.status_code == 404
    typed = client.get(f"{BASE}/transactions?type=refund", headers=mine).json
    assert [e["type"] for e in typed["data"]] == ["refund", "refund"]
    assert (
        client.get(f"{BASE}/transactions?user_id={user_id}", headers=auth("x")).status_code == 403
    )
    assert client.get(f"{BASE}/transactions?limit=0", headers=mine).status_code == 400
    assert client.get(f"{BASE}/transactions?limit=101", headers=mine).status_code == 400
    assert client.get(f"{BASE}/transactions?cursor=%%%", headers=mine).status_code == 400
    assert client.get(f"{BASE}/transactions?bogus=1", headers=mine).status_code == 400


def test_adjustments(client, admin, user_id):
    top_up(client, admin, user_id, "5")
    body = {"user_id": user_id, "amount_usdc": "-2.5", "reason": "chargeback"}
    response = client.post(f"{BASE}/adjustments", json=body, headers={**admin, **key()})
    assert response.status_code == 201, response.json
    assert response.json["amount_usdc"] == "-2.5000000"
    body["amount_usdc"] = "-2.6"
    too_much = client.post(f"{BASE}/adjustments", json=body, headers={**admin, **key()})
    assert too_much.status_code == 402
    assert balance_units(client.application, user_id) == 25_000_000


def test_history_time_filters(client, admin, auth, user_id):
    top_up(client, admin, user_id, "1")
    mine = auth(user_id)
    everything = client.get(f"{BASE}/transactions?since=2000-01-01T00:00:00Z", headers=mine)
    assert len(everything.json["data"]) == 1
    naive = client.get(f"{BASE}/transactions?since=2000-01-01T00:00:00", headers=mine)
    assert len(naive.json["data"]) == 1
    nothing = client.get(f"{BASE}/transactions?until=2000-01-01T00:00:00Z", headers=mine)
    assert nothing.json["data"] == []
    bad = client.get(f"{BASE}/transactions?since=yesterday", headers=mine)
    assert bad.status_code == 400
    assert bad.json["details"][0]["field"] == "since"
