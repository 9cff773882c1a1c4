"""Credit grants over HTTP and on the command line: create, list, read, void,
top-ups with an expiry and a priority, and what a balance shows of them."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import ADMIN, ADMIN_SCOPE, SERVICE_SCOPE, Clock, Databases, assert_error, make_app
from conftest import CLOCK_START as START

from callora_credits import current_ledger

BASE = "/api/billing/credits"
U = 10_000_000
GRANT_KEYS = {
    "id",
    "user_id",
    "category",
    "amount_usdc",
    "remaining_usdc",
    "held_usdc",
    "priority",
    "effective_at",
    "expires_at",
    "voided_at",
    "status",
    "reference",
    "description",
    "metadata",
    "transaction_id",
    "created_at",
}


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@pytest.fixture
def admin(auth):
    return auth(ADMIN, scopes=ADMIN_SCOPE)


@pytest.fixture
def service(auth):
    return auth("gateway", scopes=SERVICE_SCOPE)


def grant(client, admin, user_id, amount="10", **fields: Any):
    return client.post(
        f"{BASE}/grants",
        json={"user_id": user_id, "amount_usdc": amount, **fields},
        headers={**admin, **key()},
    )


def granted(client, admin, user_id, amount="10", **fields: Any) -> dict[str, Any]:
    response = grant(client, admin, user_id, amount, **fields)
    assert response.status_code == 201, response.json
    return dict(response.json)


def top_up(client, admin, user_id, amount="10", **fields: Any) -> dict[str, Any]:
    response = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": amount, **fields},
        headers={**admin, **key()},
    )
    assert response.status_code == 201, response.json
    return dict(response.json)


def balance(client, admin, user_id) -> dict[str, Any]:
    response = client.get(f"{BASE}?user_id={user_id}", headers=admin)
    assert response.status_code == 200, response.json
    return dict(response.json)


def listed(client, admin, user_id, query: str = "") -> list[dict[str, Any]]:
    response = client.get(f"{BASE}/grants?user_id={user_id}{query}", headers=admin)
    assert response.status_code == 200, response.json
    return list(response.json["data"])


def history(client, admin, user_id) -> list[dict[str, Any]]:
    response = client.get(f"{BASE}/transactions?user_id={user_id}", headers=admin)
    assert response.status_code == 200, response.json
    return list(response.json["data"])


def untouched(app, user_id) -> None:
    """Nothing at all exists for ``user_id``: no balance, no grant."""
    with app.app_context():
        ledger = current_ledger()
        assert ledger.find_by_user_id(user_id) is None
        assert ledger.grants(user_id, status="all").items == []


def reconciled(app, user_id) -> None:
    with app.app_context():
        report = current_ledger().reconcile(user_id)
    assert report.ok, report.mismatches


# --- creating and reading ---------------------------------------------------------------


def test_a_promotional_grant_with_an_expiry(app, client, admin, auth, clock, user_id):
    top_up(client, admin, user_id, "5")
    expires = START + timedelta(days=30)
    created = grant(
        client,
        admin,
        user_id,
        "10",
        expires_at=expires.isoformat(),
        description="Launch offer",
        metadata={"campaign": "launch"},
    )
    assert created.status_code == 201, created.json
    body = created.json
    assert set(body) == GRANT_KEYS
    assert body["id"].startswith("grant_")
    assert body["transaction_id"].startswith("ctx_")
    assert {k: body[k] for k in GRANT_KEYS - {"id", "transaction_id"}} == {
        "user_id": user_id,
        "category": "promotional",
        "amount_usdc": "10.0000000",
        "remaining_usdc": "10.0000000",
        "held_usdc": "0.0000000",
        "priority": 50,
        "effective_at": iso(START),
        "expires_at": iso(expires),
        "voided_at": None,
        "status": "active",
        "reference": None,
        "description": "Launch offer",
        "metadata": {"campaign": "launch"},
        "created_at": iso(START),
    }
    entry = client.get(f"{BASE}/transactions/{body['transaction_id']}", headers=auth(user_id))
    assert entry.status_code == 200
    assert (entry.json["type"], entry.json["amount_usdc"], entry.json["grant_id"]) == (
        "grant", "10.0000000", body["id"],
    )  # fmt: skip
    assert entry.json["balance_after_usdc"] == "15.0000000"
    shown = client.get(BASE, headers=auth(user_id)).json
    assert (shown["balance_usdc"], shown["paid_usdc"], shown["promotional_usdc"]) == (
        "15.0000000", "5.0000000", "10.0000000",
    )  # fmt: skip
    assert shown["next_expiry"] == {"at": iso(expires), "amount_usdc": "10.0000000"}
    # The owner reads it by id, and as the one active grant besides the top-up's.
    mine = client.get(f"{BASE}/grants/{body['id']}", headers=auth(user_id))
    assert (mine.status_code, mine.json) == (200, body)
    own_list = client.get(f"{BASE}/grants", headers=auth(user_id))
    assert own_list.status_code == 200
    assert [g["category"] for g in own_list.json["data"]] == ["promotional", "paid"]
    reconciled(app, user_id)


def test_every_field_given(client, admin, clock, user_id):
    effective = START + timedelta(hours=1)
    expires = START + timedelta(days=2)
    body = granted(
        client,
        admin,
        user_id,
        "2.5",
        category="paid",
        priority=0,
        effective_at=effective.isoformat(),
        expires_at="2026-06-03T14:00:00+02:00",
        reference="promo-1",
    )
    assert (body["category"], body["priority"], body["reference"]) == ("paid", 0, "promo-1")
    assert (body["effective_at"], body["expires_at"]) == (iso(effective), iso(expires))


def test_top_up_takes_an_expiry_and_a_priority(app, client, admin, auth, clock, user_id):
    expires = START + timedelta(days=7)
    entry = top_up(client, admin, user_id, "3", expires_at=iso(expires), priority=10)
    assert entry["type"] == "topup"
    assert entry["grant_id"].startswith("grant_")
    made = client.get(f"{BASE}/grants/{entry['grant_id']}", headers=auth(user_id)).json
    assert (made["category"], made["priority"], made["expires_at"], made["transaction_id"]) == (
        "paid", 10, iso(expires), entry["id"],
    )  # fmt: skip
    plain = top_up(client, admin, user_id, "1")
    default = client.get(f"{BASE}/grants/{plain['grant_id']}", headers=auth(user_id)).json
    assert (default["priority"], default["expires_at"]) == (50, None)
    assert balance(client, admin, user_id)["next_expiry"] == {
        "at": iso(expires),
        "amount_usdc": "3.0000000",
    }
    reconciled(app, user_id)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"priority": 50.0}, "priority"),
        ({"priority": "50"}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": 101}, "priority"),
        ({"expires_at": "2026-06-08"}, "expires_at"),
        ({"expires_at": "2026-06-08T12:00:00"}, "expires_at"),
        ({"expires_at": 1790000000}, "expires_at"),
        ({"expires_at": "2026-06-01T11:00:00Z"}, "expires_at"),
    ],
)
def test_bad_top_up_grant_fields_are_400_and_change_nothing(
    app, client, admin, clock, user_id, fields, field
):
    response = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": "1", **fields},
        headers={**admin, **key()},
    )
    body = assert_error(response, 400, "VALIDATION_ERROR")
    assert [d["field"] for d in body["details"]] == [field]
    untouched(app, user_id)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"category": "gift"}, "category"),
        ({"category": "Promotional"}, "category"),
        ({"priority": 50.0}, "priority"),
        ({"priority": "50"}, "priority"),
        ({"priority": True}, "priority"),
        ({"priority": None}, "priority"),
        ({"priority": -1}, "priority"),
        ({"priority": 101}, "priority"),
        ({"effective_at": "tomorrow"}, "effective_at"),
        ({"effective_at": "2026-06-02T12:00:00"}, "effective_at"),  # no offset
        ({"expires_at": "2026-06-08"}, "expires_at"),
        ({"expires_at": "2026-W30-1T00:00:00Z"}, "expires_at"),  # a week date
        ({"expires_at": "20260720T000000Z"}, "expires_at"),  # the basic format
        ({"expires_at": "2026-07-20X00:00:00Z"}, "expires_at"),
        ({"expires_at": "2026-06-08T25:00:00Z"}, "expires_at"),
        ({"expires_at": "2026-06-08T12:00:00+24:00"}, "expires_at"),
        ({"expires_at": 1790000000}, "expires_at"),
        ({"expires_at": "9999-12-31T23:59:59-05:00"}, "expires_at"),  # past year 9999 in UTC
        # Not later than effective_at, or not in the future.
        (
            {"effective_at": "2026-06-05T00:00:00Z", "expires_at": "2026-06-05T00:00:00Z"},
            "expires_at",
        ),
        (
            {"effective_at": "2026-06-05T00:00:00Z", "expires_at": "2026-06-04T00:00:00Z"},
            "expires_at",
        ),
        ({"expires_at": "2026-06-01T12:00:00Z"}, "expires_at"),
        ({"expires_at": "2026-06-01T11:59:59Z"}, "expires_at"),
        (
            {"effective_at": "2026-05-01T00:00:00Z", "expires_at": "2026-05-15T00:00:00Z"},
            "expires_at",
        ),
        ({"amount_usdc": "0"}, "amount_usdc"),
        ({"amount_usdc": 10}, "amount_usdc"),
        ({"reference": ""}, "reference"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"voided_at": None}, "voided_at"),
    ],
)
def test_bad_grants_are_400_and_change_nothing(app, client, admin, clock, user_id, fields, field):
    body = {"user_id": user_id, "amount_usdc": "10", **fields}
    response = client.post(f"{BASE}/grants", json=body, headers={**admin, **key()})
    error = assert_error(response, 400, "VALIDATION_ERROR")
    assert [d["field"] for d in error["details"]] == [field], error
    untouched(app, user_id)


def test_a_past_effective_at_means_now(client, admin, clock, user_id):
    body = granted(client, admin, user_id, "1", effective_at="2020-01-01T00:00:00Z")
    assert (body["status"], body["effective_at"]) == ("active", iso(START))
    assert balance(client, admin, user_id)["balance_usdc"] == "1.0000000"


# --- consumption order, as the entries show it ---------------------------------------------


def test_a_charge_spans_grants_in_consumption_order(app, client, admin, service, clock, user_id):
    paid = top_up(client, admin, user_id, "5")["grant_id"]
    soon = granted(
        client, admin, user_id, "3", expires_at=iso(START + timedelta(days=3))
    )["id"]  # fmt: skip
    first = granted(client, admin, user_id, "2", priority=10)["id"]
    later = granted(
        client, admin, user_id, "1", expires_at=iso(START + timedelta(days=9))
    )["id"]  # fmt: skip
    charge = client.post(
        f"{BASE}/charge",
        json={"user_id": user_id, "amount_usdc": "6.5"},
        headers={**service, **key()},
    )
    assert charge.status_code == 201, charge.json
    # Priority first; then the soonest expiry, no expiry last.
    assert charge.json["allocations"] == [
        {"grant_id": first, "amount_usdc": "2.0000000"},
        {"grant_id": soon, "amount_usdc": "3.0000000"},
        {"grant_id": later, "amount_usdc": "1.0000000"},
        {"grant_id": paid, "amount_usdc": "0.5000000"},
    ]
    shown = balance(client, admin, user_id)
    assert (shown["balance_usdc"], shown["paid_usdc"], shown["promotional_usdc"]) == (
        "4.5000000", "4.5000000", "0.0000000",
    )  # fmt: skip
    assert shown["next_expiry"] is None
    depleted = listed(client, admin, user_id, "&status=depleted")
    assert {g["id"] for g in depleted} == {first, soon, later}
    assert all(g["remaining_usdc"] == "0.0000000" for g in depleted)
    reconciled(app, user_id)


def test_promotional_before_paid_at_equal_priority_and_expiry(client, admin, service, user_id):
    paid = top_up(client, admin, user_id, "5")["grant_id"]
    promo = granted(client, admin, user_id, "1")["id"]
    charge = client.post(
        f"{BASE}/charge",
        json={"user_id": user_id, "amount_usdc": "2"},
        headers={**service, **key()},
    )
    assert charge.json["allocations"] == [
        {"grant_id": promo, "amount_usdc": "1.0000000"},
        {"grant_id": paid, "amount_usdc": "1.0000000"},
    ]


# --- scheduled grants and expiry ------------------------------------------------------------


def test_a_scheduled_grant_is_listed_but_not_in_the_balance(app, client, admin, clock, user_id):
    top_up(client, admin, user_id, "1")
    later = START + timedelta(hours=2)
    body = granted(client, admin, user_id, "4", effective_at=iso(later), reference="next-month")
    assert (body["status"], body["transaction_id"], body["effective_at"]) == (
        "scheduled", None, iso(later),
    )  # fmt: skip
    assert body["remaining_usdc"] == "4.0000000"
    shown = balance(client, admin, user_id)
    assert (shown["balance_usdc"], shown["promotional_usdc"]) == ("1.0000000", "0.0000000")
    assert [g["status"] for g in listed(client, admin, user_id)] == ["scheduled", "active"]
    assert [g["id"] for g in listed(client, admin, user_id, "&status=scheduled")] == [body["id"]]
    assert body["id"] not in {g["id"] for g in listed(client, admin, user_id, "&status=active")}

    clock.advance(hours=3)
    now_active = client.get(f"{BASE}/grants/{body['id']}", headers=admin).json
    assert now_active["status"] == "active"
    shown = balance(client, admin, user_id)
    assert (shown["balance_usdc"], shown["promotional_usdc"]) == ("5.0000000", "4.0000000")
    # Written by the next operation on the account: the `grant` entry first,
    # at the instant the grant took effect.
    top_up(client, admin, user_id, "1")
    written = client.get(f"{BASE}/grants/{body['id']}", headers=admin).json
    entry = client.get(f"{BASE}/transactions/{written['transaction_id']}", headers=admin).json
    assert (entry["type"], entry["amount_usdc"], entry["created_at"]) == (
        "grant", "4.0000000", iso(later),
    )  # fmt: skip
    assert entry["reference"] == "next-month"
    reconciled(app, user_id)


def test_an_expired_grant_leaves_the_balance(app, client, admin, clock, user_id):
    top_up(client, admin, user_id, "2")
    body = granted(client, admin, user_id, "3", expires_at=iso(START + timedelta(hours=1)))
    clock.advance(hours=1)
    gone = client.get(f"{BASE}/grants/{body['id']}", headers=admin).json
    assert (gone["status"], gone["remaining_usdc"]) == ("expired", "0.0000000")
    shown = balance(client, admin, user_id)
    assert (shown["balance_usdc"], shown["promotional_usdc"], shown["next_expiry"]) == (
        "2.0000000", "0.0000000", None,
    )  # fmt: skip
    assert body["id"] not in {g["id"] for g in listed(client, admin, user_id)}
    assert [g["id"] for g in listed(client, admin, user_id, "&status=expired")] == [body["id"]]
    assert len(listed(client, admin, user_id, "&status=all")) == 2
    reconciled(app, user_id)


# --- auth ---------------------------------------------------------------------------------------


def test_who_may_call_what(client, admin, auth, service, user_id):
    body = granted(client, admin, user_id, "1")
    grant_id = body["id"]
    routes = [
        ("POST", f"{BASE}/grants", {"user_id": user_id, "amount_usdc": "1"}),
        ("GET", f"{BASE}/grants", None),
        ("GET", f"{BASE}/grants/{grant_id}", None),
        ("POST", f"{BASE}/grants/{grant_id}/void", {}),
    ]
    for method, path, sent in routes:
        response = client.open(path, method=method, json=sent, headers=key())
        assert_error(response, 401, "UNAUTHORIZED")
    # Admin routes: a user's own token, or the service scope, is not enough.
    for headers in (auth(user_id), service):
        for method, path, sent in (routes[0], routes[3]):
            response = client.open(path, method=method, json=sent, headers={**headers, **key()})
            assert_error(response, 403, "FORBIDDEN")
    # Another user's grant by id is the 404 of a missing id; their list a 403.
    other = auth(f"{user_id}_other")
    foreign = client.get(f"{BASE}/grants/{grant_id}", headers=other)
    missing = client.get(f"{BASE}/grants/grant_{'0' * 24}", headers=other)
    assert_error(foreign, 404, "NOT_FOUND")
    assert_error(missing, 404, "NOT_FOUND")
    assert foreign.json["message"] == missing.json["message"]
    assert_error(client.get(f"{BASE}/grants?user_id={user_id}", headers=other), 403, "FORBIDDEN")
    assert client.get(f"{BASE}/grants", headers=other).json["data"] == []
    # The admin reads anyone's.
    assert client.get(f"{BASE}/grants/{grant_id}", headers=admin).json == body
    assert [g["id"] for g in listed(client, admin, user_id)] == [grant_id]
    # Nothing was voided by the refused requests.
    assert client.get(f"{BASE}/grants/{grant_id}", headers=admin).json["status"] == "active"


# --- idempotency and references --------------------------------------------------------------


def test_a_grant_is_idempotent(app, client, admin, user_id):
    sent = {"user_id": user_id, "amount_usdc": "2", "priority": 7}
    headers = {**admin, "Idempotency-Key": "grant-once"}
    first = client.post(f"{BASE}/grants", json=sent, headers=headers)
    again = client.post(f"{BASE}/grants", json=sent, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.get_data() == first.get_data()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    other = client.post(f"{BASE}/grants", json={**sent, "priority": 8}, headers=headers)
    assert_error(other, 422, "IDEMPOTENCY_CONFLICT")
    no_key = client.post(f"{BASE}/grants", json=sent, headers=admin)
    assert_error(no_key, 400, "IDEMPOTENCY_KEY_REQUIRED")
    assert balance(client, admin, user_id)["balance_usdc"] == "2.0000000"
    assert len(listed(client, admin, user_id, "&status=all")) == 1


def test_a_duplicate_reference_names_the_grant(app, client, admin, clock, user_id):
    first = granted(client, admin, user_id, "1", reference="promo-7")
    headers = {**admin, "Idempotency-Key": "dup-promo-7"}
    sent = {"user_id": user_id, "amount_usdc": "2", "reference": "promo-7"}
    dup = client.post(f"{BASE}/grants", json=sent, headers=headers)
    body = assert_error(dup, 409, "DUPLICATE_REFERENCE")
    assert body["details"][0]["grant_id"] == first["id"]
    assert body["details"][0]["transaction_id"] == first["transaction_id"]
    replay = client.post(f"{BASE}/grants", json=sent, headers=headers)
    assert (replay.status_code, replay.get_data()) == (409, dup.get_data())
    assert replay.headers["Idempotent-Replayed"] == "true"
    # A scheduled grant's reference is taken too; it has no entry yet.
    later = granted(
        client, admin, user_id, "1", reference="promo-8",
        effective_at=iso(START + timedelta(days=1)),
    )  # fmt: skip
    dup = grant(client, admin, user_id, "1", reference="promo-8")
    body = assert_error(dup, 409, "DUPLICATE_REFERENCE")
    assert (body["details"][0]["grant_id"], body["details"][0]["transaction_id"]) == (
        later["id"], None,
    )  # fmt: skip
    # A top-up's reference is another namespace; another user has their own.
    top_up(client, admin, user_id, "1", reference="promo-7")
    granted(client, admin, f"{user_id}_b", "1", reference="promo-7")
    assert balance(client, admin, user_id)["balance_usdc"] == "2.0000000"


def test_the_balance_limit_counts_scheduled_grants(host, auth):
    app = host(CREDITS_MAX_BALANCE_USDC="10")
    client = app.test_client()
    admin = auth(ADMIN, scopes=ADMIN_SCOPE)
    user_id = f"user_{uuid.uuid4().hex[:12]}"
    too_much = grant(client, admin, user_id, "10.0000001")
    assert_error(too_much, 422, "BALANCE_LIMIT_EXCEEDED")
    tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
    granted(client, admin, user_id, "6", effective_at=iso(tomorrow))
    top_up(client, admin, user_id, "4")
    over = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": "0.0000001"},
        headers={**admin, **key()},
    )
    assert_error(over, 422, "BALANCE_LIMIT_EXCEEDED")
    assert_error(grant(client, admin, user_id, "0.0000001"), 422, "BALANCE_LIMIT_EXCEEDED")
    assert balance(client, admin, user_id)["balance_usdc"] == "4.0000000"


# --- void ---------------------------------------------------------------------------------------


def test_void_takes_what_is_left(app, client, admin, service, clock, user_id):
    top_up(client, admin, user_id, "1")
    body = granted(client, admin, user_id, "10")
    client.post(
        f"{BASE}/charge",
        json={"user_id": user_id, "amount_usdc": "3"},
        headers={**service, **key()},
    )
    clock.advance(minutes=5)
    headers = {**admin, "Idempotency-Key": "void-1"}
    path = f"{BASE}/grants/{body['id']}/void"
    voided = client.post(path, json={"reason": "campaign withdrawn"}, headers=headers)
    assert voided.status_code == 200, voided.json
    assert set(voided.json) == GRANT_KEYS
    assert (voided.json["status"], voided.json["remaining_usdc"], voided.json["voided_at"]) == (
        "voided", "0.0000000", iso(START + timedelta(minutes=5)),
    )  # fmt: skip
    replay = client.post(path, json={"reason": "campaign withdrawn"}, headers=headers)
    assert (replay.status_code, replay.get_data()) == (200, voided.get_data())
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert_error(client.post(path, json={}, headers=headers), 422, "IDEMPOTENCY_CONFLICT")
    entries = history(client, admin, user_id)
    assert [e["type"] for e in entries] == ["void", "charge", "grant", "topup"]
    assert (entries[0]["amount_usdc"], entries[0]["grant_id"], entries[0]["description"]) == (
        "-7.0000000", body["id"], "campaign withdrawn",
    )  # fmt: skip
    shown = balance(client, admin, user_id)
    assert (shown["balance_usdc"], shown["promotional_usdc"]) == ("1.0000000", "0.0000000")

    # Voiding it again is a stored 409; an unknown id a stored 404.
    again = {**admin, "Idempotency-Key": "void-2"}
    refused = client.post(path, headers=again)
    assert_error(refused, 409, "GRANT_NOT_ACTIVE")
    replayed = client.post(path, headers=again)
    assert (replayed.status_code, replayed.get_data()) == (409, refused.get_data())
    assert replayed.headers["Idempotent-Replayed"] == "true"
    unknown = f"{BASE}/grants/grant_{'0' * 24}/void"
    lost = client.post(unknown, headers={**admin, "Idempotency-Key": "void-3"})
    assert_error(lost, 404, "NOT_FOUND")
    lost_again = client.post(unknown, headers={**admin, "Idempotency-Key": "void-3"})
    assert (lost_again.status_code, lost_again.get_data()) == (404, lost.get_data())
    assert_error(
        client.post(path, json={"reason": "x" * 501}, headers={**admin, **key()}),
        400,
        "VALIDATION_ERROR",
    )
    assert len(history(client, admin, user_id)) == 4
    reconciled(app, user_id)


def test_void_of_a_depleted_or_expired_grant_is_409(client, admin, service, clock, user_id):
    spent = granted(client, admin, user_id, "1")
    client.post(
        f"{BASE}/charge",
        json={"user_id": user_id, "amount_usdc": "1"},
        headers={**service, **key()},
    )
    lapsed = granted(client, admin, user_id, "1", expires_at=iso(START + timedelta(hours=1)))
    clock.advance(hours=2)
    for body in (spent, lapsed):
        refused = client.post(f"{BASE}/grants/{body['id']}/void", headers={**admin, **key()})
        assert_error(refused, 409, "GRANT_NOT_ACTIVE")


def test_void_of_a_scheduled_grant_writes_nothing(app, client, admin, clock, user_id):
    top_up(client, admin, user_id, "1")
    body = granted(client, admin, user_id, "5", effective_at=iso(START + timedelta(days=1)))
    voided = client.post(f"{BASE}/grants/{body['id']}/void", headers={**admin, **key()})
    assert voided.status_code == 200, voided.json
    assert voided.json["status"] == "voided"
    clock.advance(days=2)
    assert balance(client, admin, user_id)["balance_usdc"] == "1.0000000"
    assert [e["type"] for e in history(client, admin, user_id)] == ["topup"]
    reconciled(app, user_id)


def test_void_leaves_the_held_part_until_its_hold_resolves(
    app, client, admin, service, clock, user_id
):
    body = granted(client, admin, user_id, "10")
    hold = client.post(
        f"{BASE}/holds",
        json={"user_id": user_id, "amount_usdc": "4"},
        headers={**service, **key()},
    ).json
    voided = client.post(f"{BASE}/grants/{body['id']}/void", headers={**admin, **key()}).json
    assert (voided["remaining_usdc"], voided["held_usdc"]) == ("0.0000000", "4.0000000")
    assert balance(client, admin, user_id)["balance_usdc"] == "4.0000000"
    released = client.post(f"{BASE}/holds/{hold['id']}/release", headers={**service, **key()})
    assert released.status_code == 200
    assert balance(client, admin, user_id)["balance_usdc"] == "0.0000000"
    entries = history(client, admin, user_id)
    assert [(e["type"], e["amount_usdc"]) for e in entries[:2]] == [
        ("void", "-4.0000000"), ("void", "-6.0000000"),
    ]  # fmt: skip
    reconciled(app, user_id)


# --- lists and hostile input -------------------------------------------------------------------


def test_grants_page_newest_first(client, admin, auth, user_id):
    made = [granted(client, admin, user_id, amount)["id"] for amount in ("1", "2", "3")]
    first = client.get(f"{BASE}/grants?limit=2", headers=auth(user_id))
    assert first.status_code == 200
    assert set(first.json) == {"data", "next_cursor", "has_more"}
    assert [g["id"] for g in first.json["data"]] == made[:0:-1]
    assert first.json["has_more"] is True
    cursor = first.json["next_cursor"]
    assert cursor.replace("-", "").replace("_", "").isalnum()
    granted(client, admin, user_id, "4")  # written while paging: shifts nothing
    second = client.get(f"{BASE}/grants?limit=2&cursor={cursor}", headers=auth(user_id))
    assert [g["id"] for g in second.json["data"]] == [made[0]]
    assert (second.json["next_cursor"], second.json["has_more"]) == (None, False)


@pytest.mark.parametrize(
    "query",
    [
        "status=pending",
        "status=",
        "status=active&status=all",
        "limit=0",
        "limit=101",
        "limit=ten",
        "cursor=czo0",  # an entries cursor
        "cursor=not-a-cursor",
        "bogus=1",
        "user_id=",
    ],
)
def test_bad_list_queries_are_400(client, admin, user_id, query):
    assert_error(client.get(f"{BASE}/grants?{query}", headers=admin), 400, "VALIDATION_ERROR")


def test_odd_grant_ids_are_404(client, admin):
    for grant_id in ("grant_%00", "x" * 100, "grant_%E2%80%8B", "%20"):
        assert_error(client.get(f"{BASE}/grants/{grant_id}", headers=admin), 404, "NOT_FOUND")
        voided = client.post(f"{BASE}/grants/{grant_id}/void", headers={**admin, **key()})
        assert_error(voided, 404, "NOT_FOUND")
    assert_error(client.get(f"{BASE}/grants/x?bogus=1", headers=admin), 400, "VALIDATION_ERROR")


# --- the command line -------------------------------------------------------------------------


@pytest.fixture
def fresh(engine_name, tmp_path):
    """An app on a migrated database of its own (so settle-grants counts only
    this test's entries), with a controllable clock."""
    dbs = Databases(tmp_path / "fresh")
    app = make_app(dbs.url(engine_name))
    clock = Clock()
    app.extensions["callora_credits"].clock = clock
    yield app, clock
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()
    dbs.drop_all()


def test_cli_grants_and_settle_grants(fresh, admin, user_id):
    app, clock = fresh
    client = app.test_client()
    runner = app.test_cli_runner()

    def said(*args: str) -> str:
        result = runner.invoke(args=["credits", *args])
        assert result.exit_code == 0, result.output
        return result.output

    assert said("grants", user_id).strip() == f"{user_id}: no active or scheduled grants"
    assert said("grants", user_id, "--status", "all").strip() == f"{user_id}: no grants"
    promo = granted(client, admin, user_id, "3", expires_at=iso(START + timedelta(hours=1)))
    soon = granted(client, admin, user_id, "2", effective_at=iso(START + timedelta(hours=1)))
    lines = said("grants", user_id).splitlines()
    assert lines[0].split()[:4] == ["id", "status", "category", "prio"]
    rows = [line.split() for line in lines[1:]]
    assert [row[:4] for row in rows] == [
        [soon["id"], "scheduled", "promotional", "50"],
        [promo["id"], "active", "promotional", "50"],
    ]
    assert rows[1][4:7] == ["3.0000000", "3.0000000", "0.0000000"]
    assert rows[1][-2:] == ["2026-06-01", "13:00:00"]  # expires
    assert rows[0][-1] == "never"
    assert said("grants", user_id, "--status", "voided").strip() == f"{user_id}: no voided grants"
    assert "more: raise --limit" in said("grants", user_id, "--limit", "1")
    bad = runner.invoke(args=["credits", "grants", user_id, "--status", "pending"])
    assert bad.exit_code == 2

    clock.advance(hours=2)
    # One activation and one expiry: two entries; then nothing is left to write.
    assert said("settle-grants").strip() == "settled what was due: 2 events written"
    assert said("settle-grants").strip() == "settled what was due: 0 events written"
    expired = said("grants", user_id, "--status", "expired").splitlines()
    assert expired[1].split()[:2] == [promo["id"], "expired"]
    assert [e["type"] for e in history(client, admin, user_id)] == [
        "expiration", "grant", "grant",
    ]  # fmt: skip
    reconciled(app, user_id)


def test_cli_expire_holds_settles_what_is_due(fresh, admin, service, user_id):
    app, clock = fresh
    client = app.test_client()
    runner = app.test_cli_runner()
    body = granted(client, admin, user_id, "5")
    client.post(
        f"{BASE}/holds",
        json={"user_id": user_id, "amount_usdc": "2", "expires_in_seconds": 60},
        headers={**service, **key()},
    )
    voided = client.post(f"{BASE}/grants/{body['id']}/void", headers={**admin, **key()})
    assert voided.json["held_usdc"] == "2.0000000"
    clock.advance(minutes=2)
    # The hold expired: what it pinned goes back to a voided grant and leaves.
    result = runner.invoke(args=["credits", "expire-holds"])
    assert (result.exit_code, result.output.strip()) == (
        0, "settled what was due: 1 event written",
    )  # fmt: skip
    with app.app_context():
        shown = current_ledger().find_by_user_id(user_id)
    assert (shown.balance_units, shown.held_units) == (0, 0)
    reconciled(app, user_id)
