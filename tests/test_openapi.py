"""The OpenAPI document tells the truth: errors, scopes, prose, validity.

Each operation's error responses are derived from the codes it declares.
``EXPECTED`` below is the same list reasoned out per operation; the document
must match it exactly. Then real requests, on every engine, produce each code
an operation declares (``NOT_DRIVEN`` gives the reason for the few that only a
race can produce), and every error a request produced must be listed by the
document for that operation and status. ``docs/errors.md`` and the
"Errors:" line of each endpoint in ``docs/api.md`` are checked against the
same codes.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_SCOPE, SECRET, SERVICE_SCOPE, make_token
from flask import Flask
from openapi_spec_validator import validate

import callora_credits.http.views  # noqa: F401  (registers the routes)
from callora_credits.http.blueprint import OPERATIONS, UNAUTHORIZED_CODES, error_statuses
from callora_credits.http.openapi import ERROR_MEANINGS, build_document, prose

PREFIX = "/api/billing"
BASE = f"{PREFIX}/credits"
DOCS = Path(__file__).resolve().parent.parent / "docs"

AUTH = set(UNAUTHORIZED_CODES)
# Every read validates its query string (an unknown or repeated key is a 400)
# and authenticates. Every route may fail unexpectedly (500); every route that
# reaches the database may find it unavailable (503).
READ = {"VALIDATION_ERROR", *AUTH, "INTERNAL_SERVER_ERROR", "SERVICE_UNAVAILABLE"}
# Every write also checks the scope (403), requires the key (400), bounds the
# body (413) and may meet a concurrent duplicate of its key that outlasts
# CREDITS_IDEMPOTENCY_WAIT_SECONDS (409).
WRITE = READ | {
    "IDEMPOTENCY_KEY_REQUIRED",
    "FORBIDDEN",
    "PAYLOAD_TOO_LARGE",
    "IDEMPOTENCY_IN_PROGRESS",
}

EXPECTED: dict[tuple[str, str], set[str]] = {
    # ?user_id= of another user without the admin scope is a 403; the balance
    # is created on read, so no 404.
    ("GET", "/credits"): READ | {"FORBIDDEN"},
    ("GET", "/credits/transactions"): READ | {"FORBIDDEN"},
    ("GET", "/credits/holds"): READ | {"FORBIDDEN"},
    ("GET", "/credits/usage"): READ | {"FORBIDDEN"},
    # By id: another user's object is a 404, never a 403.
    ("GET", "/credits/transactions/<transaction_id>"): READ | {"NOT_FOUND"},
    ("GET", "/credits/holds/<hold_id>"): READ | {"NOT_FOUND"},
    ("GET", "/credits/grants"): READ | {"FORBIDDEN"},
    ("GET", "/credits/grants/<grant_id>"): READ | {"NOT_FOUND"},
    # A grant credits: its reference is unique, the limit applies (scheduled
    # grants included).
    ("POST", "/credits/grants"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "DUPLICATE_REFERENCE", "BALANCE_LIMIT_EXCEEDED"},
    # A void only takes away what the grant has left: never a 402 or the limit.
    ("POST", "/credits/grants/<grant_id>/void"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "NOT_FOUND", "GRANT_NOT_ACTIVE"},
    # Credits: a reference credits once; the balance limit. No debit, no 402.
    ("POST", "/credits/topup"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "DUPLICATE_REFERENCE", "BALANCE_LIMIT_EXCEEDED"},
    # Signed: a negative one may find too little (402), a positive one the
    # limit. No reference, so no DUPLICATE_REFERENCE.
    ("POST", "/credits/adjustments"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "INSUFFICIENT_CREDITS", "BALANCE_LIMIT_EXCEEDED"},
    ("POST", "/credits/charge"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "INSUFFICIENT_CREDITS", "DUPLICATE_REFERENCE"},
    ("POST", "/credits/holds"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "INSUFFICIENT_CREDITS", "DUPLICATE_REFERENCE"},
    # A refund credits: the limit applies. It never debits, so no 402.
    ("POST", "/credits/transactions/<transaction_id>/refund"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "NOT_FOUND", "REFUND_EXCEEDS_CHARGE", "BALANCE_LIMIT_EXCEEDED"},
    # A capture spends money the hold reserved, which no other debit may
    # touch, so it never finds too little (no 402).
    ("POST", "/credits/holds/<hold_id>/capture"): WRITE
    | {"IDEMPOTENCY_CONFLICT", "NOT_FOUND", "HOLD_NOT_PENDING", "HOLD_AMOUNT_EXCEEDED"},
    # Its only valid body is empty: the same key can never carry a different
    # request, so no IDEMPOTENCY_CONFLICT.
    ("POST", "/credits/holds/<hold_id>/release"): WRITE | {"NOT_FOUND", "HOLD_NOT_PENDING"},
    # No identity, no database: only its query string can be wrong.
    ("GET", "/openapi.json"): {"VALIDATION_ERROR", "INTERNAL_SERVER_ERROR"},
}

# Declared codes the requests below do not produce, and why they can happen.
_RACE = (
    "a duplicate of a finished request replays it; only a duplicate whose claim "
    "keeps losing to concurrent ones past CREDITS_IDEMPOTENCY_WAIT_SECONDS answers 409"
)
NOT_DRIVEN: dict[tuple[str, str], dict[str, str]] = {
    **{
        ("POST", rule): {"IDEMPOTENCY_IN_PROGRESS": _RACE}
        for rule in (
            "/credits/topup",
            "/credits/adjustments",
            "/credits/charge",
            "/credits/holds",
            "/credits/transactions/<transaction_id>/refund",
            "/credits/holds/<hold_id>/capture",
            "/credits/holds/<hold_id>/release",
            "/credits/grants",
            "/credits/grants/<grant_id>/void",
        )
    },
    ("GET", "/openapi.json"): {
        "INTERNAL_SERVER_ERROR": "built from code alone, it reaches no database: "
        "only a bug in the library could fail it"
    },
}


def operation_key(op: Any) -> tuple[str, str]:
    return (op.method, op.rule)


def document_codes(document: dict[str, Any]) -> dict[tuple[str, str], dict[int, list[str]]]:
    """(method, rule) → status → the codes the document lists."""
    found: dict[tuple[str, str], dict[int, list[str]]] = {}
    for op in OPERATIONS:
        path = PREFIX + re.sub(r"<(?:[a-z]+:)?(\w+)>", r"{\1}", op.rule)
        responses = document["paths"][path][op.method.lower()]["responses"]
        by_status: dict[int, list[str]] = {}
        for status, response in responses.items():
            if int(status) < 400:
                continue
            schema = response["content"]["application/json"]["schema"]
            by_status[int(status)] = schema["allOf"][1]["properties"]["code"]["enum"]
        found[operation_key(op)] = by_status
    return found


DOCUMENT = build_document(PREFIX)


def test_the_table_names_every_operation():
    assert set(EXPECTED) == {operation_key(op) for op in OPERATIONS}


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=[f"{m} {r}" for m, r in sorted(EXPECTED)])
def test_each_operation_lists_exactly_its_codes(key):
    statuses = error_statuses()
    listed = document_codes(DOCUMENT)[key]
    codes = {code for codes in listed.values() for code in codes}
    assert codes == EXPECTED[key]
    for status, status_codes in listed.items():
        assert all(statuses[code] == status for code in status_codes), (status, status_codes)
    op = next(op for op in OPERATIONS if operation_key(op) == key)
    path = PREFIX + re.sub(r"<(\w+)>", r"{\1}", op.rule)
    responses = DOCUMENT["paths"][path][op.method.lower()]["responses"]
    # A GET may also answer 304 Not Modified to If-None-Match.
    conditional = {"304"} if op.method == "GET" else set()
    assert set(responses) == {str(op.success)} | conditional | {str(status) for status in listed}
    for status, status_codes in listed.items():
        description = responses[str(status)]["description"]
        assert all(f"`{code}`" in description for code in status_codes), description


def test_reads_declare_their_tag_and_the_304_and_writes_do_not():
    for op in OPERATIONS:
        path = PREFIX + re.sub(r"<(\w+)>", r"{\1}", op.rule)
        doc = DOCUMENT["paths"][path][op.method.lower()]
        headers = {p["name"] for p in doc.get("parameters", []) if p["in"] == "header"}
        success = doc["responses"][str(op.success)]
        if op.method == "GET":
            assert "If-None-Match" in headers, path
            assert set(success["headers"]) == {"ETag"}, path
            not_modified = doc["responses"]["304"]
            assert set(not_modified["headers"]) == {"ETag"}, path
            assert "content" not in not_modified, path
        else:
            assert "If-None-Match" not in headers, path
            assert "headers" not in success, path
            assert "304" not in doc["responses"], path


def test_every_code_has_a_meaning_and_a_status():
    assert set(ERROR_MEANINGS) == set(error_statuses())


# --- the codes, produced by real requests -----------------------------------------


class Recorder:
    """Sends requests to an app and records (status, code) per operation."""

    def __init__(self, app: Flask, seen: dict[tuple[str, str], set[tuple[int, str]]]) -> None:
        self.client = app.test_client()
        self.adapter = app.url_map.bind("localhost")
        self.seen = seen
        self.by_endpoint = {f"credits.{op.endpoint}": op for op in OPERATIONS}

    def send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        key: str | None = "new",
        **kwargs: Any,
    ) -> Any:
        sent = dict(headers or {})
        if method == "POST" and key is not None:
            sent["Idempotency-Key"] = uuid.uuid4().hex if key == "new" else key
        response = self.client.open(path, method=method, headers=sent, **kwargs)
        endpoint, _ = self.adapter.match(path.split("?")[0], method=method)
        op = self.by_endpoint[endpoint]
        if response.status_code >= 400:
            outcome = (response.status_code, response.get_json()["code"])
        else:
            outcome = (response.status_code, "")
            assert response.status_code == op.success, (path, response.get_json())
        self.seen[operation_key(op)].add(outcome)
        return response


def bearer(user: str, scopes: str | None = None, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user, scopes=scopes, **claims)}"}


def drive(
    app: Flask, limited: Flask, broken: Flask, unreachable: Flask
) -> dict[tuple[str, str], set[tuple[int, str]]]:
    """Produce every code that ordinary requests can produce: on ``app``, on
    ``limited`` (a balance limit of 10 USDC and no idempotency wait), on
    ``broken`` (a database without the credits tables) and on ``unreachable``
    (a database that cannot be opened)."""
    seen: dict[tuple[str, str], set[tuple[int, str]]] = defaultdict(set)
    r = Recorder(app, seen)
    tag = uuid.uuid4().hex[:10]
    user, other = f"oa_user_{tag}", f"oa_other_{tag}"
    admin = bearer(f"oa_admin_{tag}", ADMIN_SCOPE)
    service = bearer(f"oa_service_{tag}", SERVICE_SCOPE)
    mine = bearer(user)

    def topup(amount: str, **extra: Any) -> Any:
        body = {"user_id": user, "amount_usdc": amount, **extra}
        return r.send("POST", f"{BASE}/topup", headers=admin, json=body)

    def hold(amount: str, **extra: Any) -> Any:
        body = {"user_id": user, "amount_usdc": amount, **extra}
        return r.send("POST", f"{BASE}/holds", headers=service, json=body)

    # Successes, and the objects the rest needs.
    topup_entry = topup("100", reference=f"ref_{tag}").get_json()
    charge = r.send(
        "POST",
        f"{BASE}/charge",
        headers=service,
        json={"user_id": user, "amount_usdc": "5", "reference": f"ref_{tag}"},
    ).get_json()
    r.send(
        "POST",
        f"{BASE}/adjustments",
        headers=admin,
        json={"user_id": user, "amount_usdc": "-1", "reason": "fix"},
    )
    held = hold("2", reference=f"hold_{tag}").get_json()
    released = hold("1").get_json()
    r.send("POST", f"{BASE}/holds/{released['id']}/release", headers=service)
    r.send("POST", f"{BASE}/holds/{held['id']}/capture", headers=service, json={})
    pending = hold("3").get_json()
    conflicted = hold("0.5").get_json()
    r.send("POST", f"{BASE}/transactions/{charge['id']}/refund", headers=admin, json={})
    refundable = r.send(
        "POST", f"{BASE}/charge", headers=service, json={"user_id": user, "amount_usdc": "2"}
    ).get_json()
    granted = r.send(
        "POST",
        f"{BASE}/grants",
        headers=admin,
        json={"user_id": user, "amount_usdc": "1", "reference": f"grant_{tag}"},
    ).get_json()
    voided = r.send(
        "POST", f"{BASE}/grants", headers=admin, json={"user_id": user, "amount_usdc": "1"}
    ).get_json()
    r.send("POST", f"{BASE}/grants/{voided['id']}/void", headers=admin, json={"reason": "r"})
    voidable = r.send(
        "POST", f"{BASE}/grants", headers=admin, json={"user_id": user, "amount_usdc": "1"}
    ).get_json()
    for path in ("", "/transactions", "/holds", "/grants", "/usage"):
        r.send("GET", f"{BASE}{path}", headers=mine)
    r.send("GET", f"{BASE}/transactions/{charge['id']}", headers=mine)
    r.send("GET", f"{BASE}/holds/{held['id']}", headers=mine)
    r.send("GET", f"{BASE}/grants/{granted['id']}", headers=mine)
    r.send("GET", f"{PREFIX}/openapi.json")

    posts = {
        f"{BASE}/topup": (admin, {"user_id": user, "amount_usdc": "1"}),
        f"{BASE}/adjustments": (admin, {"user_id": user, "amount_usdc": "1", "reason": "r"}),
        f"{BASE}/charge": (service, {"user_id": user, "amount_usdc": "0.1"}),
        f"{BASE}/holds": (service, {"user_id": user, "amount_usdc": "0.1"}),
        f"{BASE}/transactions/{refundable['id']}/refund": (admin, {"amount_usdc": "0.1"}),
        f"{BASE}/holds/{conflicted['id']}/capture": (service, {"amount_usdc": "0.1"}),
        f"{BASE}/holds/{conflicted['id']}/release": (service, {}),
        f"{BASE}/grants": (admin, {"user_id": user, "amount_usdc": "1"}),
        f"{BASE}/grants/{voidable['id']}/void": (admin, {"reason": "r"}),
    }
    gets = [
        f"{BASE}",
        f"{BASE}/transactions",
        f"{BASE}/holds",
        f"{BASE}/grants",
        f"{BASE}/usage",
        f"{BASE}/transactions/{charge['id']}",
        f"{BASE}/holds/{held['id']}",
        f"{BASE}/grants/{granted['id']}",
    ]

    # 401: every code on every authenticated route.
    unauthenticated = {
        "UNAUTHORIZED": {},
        "INVALID_AUTH_HEADER": {"Authorization": "Basic eHl6"},
        "MISSING_TOKEN": {"Authorization": "Bearer "},
        "TOKEN_EXPIRED": bearer(user, expires_in=timedelta(seconds=-30)),
        "TOKEN_NOT_ACTIVE": bearer(user, nbf=int(time.time()) + 3600),
        "INVALID_TOKEN": {"Authorization": "Bearer " + make_token(user, secret=SECRET + "x")},
        "MISSING_CLAIMS": {"Authorization": "Bearer " + make_token(user, omit_identity=True)},
    }
    for headers in unauthenticated.values():
        for path in gets:
            r.send("GET", path, headers=headers)
        for path, (_, body) in posts.items():
            r.send("POST", path, headers=headers, json=body)

    # 400: a bad query string, a bad body, no key.
    for path in gets:
        r.send("GET", f"{path}?bogus=1", headers=admin)
    r.send("GET", f"{PREFIX}/openapi.json?bogus=1")
    for path, (headers, _) in posts.items():
        r.send("POST", path, headers=headers, json={"bogus": "1"})
        r.send("POST", path, headers=headers, key=None, json={})

    # 403: a scope missing, or another user named without the admin scope.
    for path, (_, body) in posts.items():
        r.send("POST", path, headers=mine, json=body)
    for path in ("", "/transactions", "/holds", "/grants", "/usage"):
        r.send("GET", f"{BASE}{path}?user_id={other}", headers=mine)

    # 413: a body over CREDITS_MAX_BODY_BYTES.
    for path, (headers, _) in posts.items():
        r.send("POST", path, headers=headers, data=b" " * 70_000)

    # 422: the same key with another body.
    for path, (headers, body) in posts.items():
        if path.endswith("/release"):
            continue
        reused = f"reused-{uuid.uuid4().hex}"
        changed = {"reason": "s"} if path.endswith("/void") else {"amount_usdc": "0.2"}
        r.send("POST", path, headers=headers, key=reused, json=body)
        r.send("POST", path, headers=headers, key=reused, json={**body, **changed})

    # 404: no such object, or another user's (by id).
    for path in ("/holds/hold_nope/capture", "/holds/hold_nope/release"):
        r.send("POST", f"{BASE}{path}", headers=service, json={})
    r.send("POST", f"{BASE}/transactions/ctx_nope/refund", headers=admin, json={})
    r.send("GET", f"{BASE}/transactions/{charge['id']}", headers=bearer(other))
    r.send("GET", f"{BASE}/holds/{held['id']}", headers=bearer(other))
    r.send("POST", f"{BASE}/grants/grant_nope/void", headers=admin, json={})
    r.send("GET", f"{BASE}/grants/{granted['id']}", headers=bearer(other))

    # 402: more than is available.
    for path in ("/charge", "/holds"):
        r.send(
            "POST", f"{BASE}{path}", headers=service, json={"user_id": other, "amount_usdc": "1"}
        )
    r.send(
        "POST",
        f"{BASE}/adjustments",
        headers=admin,
        json={"user_id": other, "amount_usdc": "-1", "reason": "r"},
    )

    # 409: a reference used twice; a resolved hold.
    topup("1", reference=f"ref_{tag}")
    r.send(
        "POST",
        f"{BASE}/charge",
        headers=service,
        json={"user_id": user, "amount_usdc": "1", "reference": f"ref_{tag}"},
    )
    hold("1", reference=f"hold_{tag}")
    for action in ("capture", "release"):
        r.send("POST", f"{BASE}/holds/{held['id']}/{action}", headers=service, json={})
    r.send(
        "POST",
        f"{BASE}/grants",
        headers=admin,
        json={"user_id": user, "amount_usdc": "1", "reference": f"grant_{tag}"},
    )
    r.send("POST", f"{BASE}/grants/{voided['id']}/void", headers=admin, json={})

    # 422: more than the hold, more than is left of the charge.
    r.send(
        "POST",
        f"{BASE}/holds/{pending['id']}/capture",
        headers=service,
        json={"amount_usdc": "4"},
    )
    r.send(
        "POST",
        f"{BASE}/transactions/{charge['id']}/refund",
        headers=admin,
        json={"amount_usdc": "1"},
    )
    assert topup_entry["type"] == "topup"

    # On the limited app: the balance limit, and duplicates of finished
    # requests, replayed even though the wait bound is zero.
    lim = Recorder(limited, seen)
    poor = f"oa_limited_{tag}"
    lim.send("POST", f"{BASE}/topup", headers=admin, json={"user_id": poor, "amount_usdc": "11"})
    lim.send(
        "POST",
        f"{BASE}/adjustments",
        headers=admin,
        json={"user_id": poor, "amount_usdc": "11", "reason": "r"},
    )
    lim.send("POST", f"{BASE}/grants", headers=admin, json={"user_id": poor, "amount_usdc": "11"})
    lim.send("POST", f"{BASE}/topup", headers=admin, json={"user_id": poor, "amount_usdc": "10"})
    spent = lim.send(
        "POST", f"{BASE}/charge", headers=service, json={"user_id": poor, "amount_usdc": "5"}
    ).get_json()
    lim.send("POST", f"{BASE}/topup", headers=admin, json={"user_id": poor, "amount_usdc": "5"})
    lim.send("POST", f"{BASE}/transactions/{spent['id']}/refund", headers=admin, json={})
    lim.send("POST", f"{BASE}/charge", headers=service, json={"user_id": poor, "amount_usdc": "1"})
    duplicates = {
        f"{BASE}/topup": (admin, {"user_id": poor, "amount_usdc": "0.1"}),
        f"{BASE}/adjustments": (admin, {"user_id": poor, "amount_usdc": "-0.1", "reason": "r"}),
        f"{BASE}/charge": (service, {"user_id": poor, "amount_usdc": "0.1"}),
        f"{BASE}/holds": (service, {"user_id": poor, "amount_usdc": "0.1"}),
        f"{BASE}/transactions/{spent['id']}/refund": (admin, {"amount_usdc": "0.1"}),
        f"{BASE}/grants": (admin, {"user_id": poor, "amount_usdc": "0.1"}),
        f"{BASE}/grants/grant_nope/void": (admin, {}),
    }
    for path, (headers, body) in duplicates.items():
        # A finished request is replayed, never "in progress", even with no wait.
        twice = f"twice-{uuid.uuid4().hex}"
        first = lim.send("POST", path, headers=headers, key=twice, json=body)
        again = lim.send("POST", path, headers=headers, key=twice, json=body)
        assert again.headers.get("Idempotent-Replayed") == "true", (path, again.get_json())
        assert (again.status_code, again.get_data()) == (first.status_code, first.get_data())

    # On the broken app: a 500 on every route that reads or writes the ledger.
    down = Recorder(broken, seen)
    both = bearer(f"oa_admin_{tag}", f"{ADMIN_SCOPE} {SERVICE_SCOPE}")
    every_field = {"user_id": user, "amount_usdc": "1", "reason": "r"}
    for op in OPERATIONS:
        if op.rule == "/openapi.json":
            continue
        path = PREFIX + re.sub(r"<\w+>", "x_1", op.rule)
        fields = op.body.model_fields if op.body is not None else {}
        body = {name: value for name, value in every_field.items() if name in fields}
        sent = down.send(op.method, path, headers=both, json=body if op.method == "POST" else None)
        assert sent.get_json()["message"] == "Internal server error", (path, sent.get_json())
        # The same request on a database that cannot be reached: a 503.
        gone = Recorder(unreachable, seen)
        sent = gone.send(op.method, path, headers=both, json=body if op.method == "POST" else None)
        assert sent.status_code == 503, (path, sent.get_json())
        assert sent.headers["Retry-After"] == "1"
    return seen


def check_against_document(
    seen: dict[tuple[str, str], set[tuple[int, str]]], document: dict[str, Any]
) -> None:
    listed = document_codes(document)
    statuses = error_statuses()
    for key, outcomes in seen.items():
        for status, code in outcomes:
            if status < 400:
                continue
            assert statuses[code] == status, (key, status, code)
            assert code in listed[key].get(status, []), f"{key} answered {status} {code}"


def test_every_code_a_request_produces_is_listed_for_its_operation(host, tmp_path):
    app = host()
    limited = host(CREDITS_MAX_BALANCE_USDC="10", CREDITS_IDEMPOTENCY_WAIT_SECONDS=0)
    broken = host(f"sqlite:///{tmp_path / 'no-tables.sqlite3'}")
    unreachable = host(
        f"sqlite:///{tmp_path / 'no-such-folder' / 'credits.sqlite3'}",
        CREDITS_DB_RETRIES=1,
        CREDITS_DB_RETRY_SECONDS=0.1,
    )
    seen = drive(app, limited, broken, unreachable)
    check_against_document(seen, app.test_client().get(f"{PREFIX}/openapi.json").get_json())
    for key, expected in EXPECTED.items():
        produced = {code for _, code in seen[key] if code}
        reasoned = set(NOT_DRIVEN.get(key, {}))
        missing = expected - produced - reasoned
        assert not missing, f"{key}: declared but never produced: {sorted(missing)}"
        assert not reasoned & produced, f"{key}: produced after all: {reasoned & produced}"


# --- scopes ------------------------------------------------------------------------


def test_scopes_outside_an_app_are_the_defaults():
    charge = DOCUMENT["paths"][f"{BASE}/charge"]["post"]
    assert charge["x-credits-scope"] == "credits:charge"
    assert charge["security"] == [
        {"bearerAuth": ["credits:charge"]},
        {"bearerAuth": ["credits:admin"]},
    ]
    assert "`credits:charge`" in charge["description"]
    topup = DOCUMENT["paths"][f"{BASE}/topup"]["post"]
    assert topup["x-credits-scope"] == "credits:admin"
    assert topup["security"] == [{"bearerAuth": ["credits:admin"]}]


def test_the_served_and_printed_documents_name_the_configured_scopes(host):
    app = host(CREDITS_ADMIN_SCOPE="billing:admin", CREDITS_SERVICE_SCOPE="billing:charge")
    served = app.test_client().get(f"{PREFIX}/openapi.json").get_json()
    printed = app.test_cli_runner().invoke(args=["credits", "openapi"])
    assert printed.exit_code == 0, printed.output
    for document in (served, json.loads(printed.output)):
        text = json.dumps(document)
        assert "credits:admin" not in text
        assert "credits:charge" not in text
        paths = document["paths"]
        assert paths[f"{BASE}/topup"]["post"]["x-credits-scope"] == "billing:admin"
        assert paths[f"{BASE}/charge"]["post"]["x-credits-scope"] == "billing:charge"
        assert paths[f"{BASE}/charge"]["post"]["security"] == [
            {"bearerAuth": ["billing:charge"]},
            {"bearerAuth": ["billing:admin"]},
        ]
        assert "`billing:admin`" in paths[f"{BASE}"]["get"]["description"]
        query = paths[f"{BASE}"]["get"]["parameters"][0]
        assert query["name"] == "user_id"
        assert "`billing:admin`" in query["description"]
        validate(document)


def test_scopes_are_checked_as_the_document_says(host):
    """Each write answers 403 without the scope the document names and gets
    past the scope check with it."""
    app = host(CREDITS_ADMIN_SCOPE="billing:admin", CREDITS_SERVICE_SCOPE="billing:charge")
    client = app.test_client()
    paths = client.get(f"{PREFIX}/openapi.json").get_json()["paths"]
    for path, item in paths.items():
        post = item.get("post")
        if post is None:
            continue
        concrete = re.sub(r"\{\w+\}", "x_1", path)
        for requirement in post["security"]:
            (scopes,) = requirement.values()
            allowed = client.post(
                concrete,
                headers={**bearer("oa_scoped", " ".join(scopes)), "Idempotency-Key": "k"},
                json={"bogus": "1"},
            )
            assert allowed.status_code == 400, (path, scopes, allowed.get_json())
        refused = client.post(
            concrete,
            headers={
                **bearer("oa_scoped", "credits:admin credits:charge"),
                "Idempotency-Key": "k",
            },
            json={"bogus": "1"},
        )
        assert refused.status_code == 403, (path, refused.get_json())


# --- clean prose and validity ------------------------------------------------------

MARKUP = re.compile(r"``|:[a-z]+:`|SPEC|§|\n {2,}")


def _texts(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [
            value
            for key, value in node.items()
            if key in ("description", "summary") and isinstance(value, str)
        ]
        for value in node.values():
            found.extend(_texts(value))
        return found
    if isinstance(node, list):
        return [text for item in node for text in _texts(item)]
    return []


def test_descriptions_are_clean_prose():
    texts = _texts(DOCUMENT)
    assert len(texts) > 50
    dirty = [text for text in texts if MARKUP.search(text)]
    assert not dirty, dirty


def test_docstring_markup_becomes_commonmark():
    from callora_credits.config import CreditsConfig

    docstring = """The caller's balance (or ``?user_id=``'s).

        Raises :class:`~callora_credits.errors.NotFound`; see
        :func:`callora_credits.current_ledger` and :ref:`the guide <guide>`.
        Needs the admin scope.
        """
    assert prose(docstring, CreditsConfig({"CREDITS_ADMIN_SCOPE": "ops"})) == (
        "The caller's balance (or `?user_id=`'s).\n\n"
        "Raises `NotFound`; see `callora_credits.current_ledger` and the guide. "
        "Needs the `ops` scope."
    )


def test_the_document_is_valid_openapi_3_1():
    validate(DOCUMENT)
    assert DOCUMENT["openapi"] == "3.1.0"


# --- the docs agree ---------------------------------------------------------------


def _errors_md_table() -> dict[str, int]:
    text = (DOCS / "errors.md").read_text()
    section = text.split("## All codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z_]+)` \| (\d{3}) \|", section, re.M)
    return {code: int(status) for code, status in rows}


def test_errors_md_lists_every_code_with_its_status():
    assert _errors_md_table() == error_statuses()


def test_every_code_is_answered_somewhere():
    """No code in the library (and so in docs/errors.md) that nothing answers with."""
    declared = {code for op in OPERATIONS for code in op.errors}
    # The catch-all under /credits answers these for paths and methods no
    # operation has; rate limits, when configured, answer before any route.
    routing = {"NOT_FOUND", "METHOD_NOT_ALLOWED"}
    rate_limits = {"RATE_LIMITED"}
    assert declared | routing | rate_limits == set(error_statuses())


def _api_md_errors() -> dict[tuple[str, str], str]:
    text = (DOCS / "api.md").read_text()
    found = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading = section.splitlines()[0].replace("&lt;", "<").replace("&gt;", ">")
        match = re.fullmatch(r"(GET|POST) (/\S+)", heading.strip())
        if not match:
            continue
        errors = re.search(r"^Errors: (.+?)(?:\n\n|\Z)", section, re.M | re.S)
        assert errors, f"no Errors: line under {heading}"
        found[(match.group(1), match.group(2))] = " ".join(errors.group(1).split())
    return found


def test_api_md_errors_lines_match_the_document():
    """Each endpoint's "Errors:" line names its statuses and codes (401s as a
    family, 500 once under Conventions)."""
    lines = _api_md_errors()
    statuses = error_statuses()
    assert set(lines) == set(EXPECTED)
    for key, line in lines.items():
        expected = EXPECTED[key] - AUTH - {"INTERNAL_SERVER_ERROR"}
        named = set(re.findall(r"`([A-Z_]+)`", line))
        assert named == expected, (key, line)
        listed = {int(status) for status in re.findall(r"\b([1-5]\d\d)\b", line)}
        wanted = {statuses[code] for code in EXPECTED[key] - {"INTERNAL_SERVER_ERROR"}}
        assert listed == wanted, (key, line)
