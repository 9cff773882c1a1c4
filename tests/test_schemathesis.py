"""Property-based conformance: schemathesis against the served OpenAPI document.

Every operation of ``GET /api/billing/openapi.json`` is driven with generated
requests (schema-valid and schema-violating), once as a plain user and once as
an admin holding both scopes, on every engine. Each response must not be a
5xx, must use a status code the document lists for the operation, must have a
documented content type and must match the schema the document gives for
that status.

Generated path parameters are unknown ids (404s), so every operation also gets
ids seeded for the test (the user's own charge and holds), and one explicit
request whose outcome is known: the success status for the admin, 200 for a
user's own reads and 403 for a user's writes. That way the success schemas
are checked on every operation, not only when generation happens to hit them.
The run is deterministic (``derandomize``) and bounded (``MAX_EXAMPLES`` per
operation and role).
"""

from __future__ import annotations

import uuid
from typing import Any

import hypothesis.strategies as st
import pytest
import schemathesis
from conftest import ADMIN_SCOPE, SERVICE_SCOPE, make_token
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

import callora_credits.http.views  # noqa: F401  (registers the routes the document lists)
from callora_credits.http.openapi import build_document

PREFIX = "/api/billing"
DOCUMENT = f"{PREFIX}/openapi.json"
BASE = f"{PREFIX}/credits"
MAX_EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
ROLES = {"user": None, "admin": f"{ADMIN_SCOPE} {SERVICE_SCOPE}"}
OPERATIONS = sorted(
    (method.upper(), path)
    for path, methods in build_document(PREFIX)["paths"].items()
    for method in methods
)


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def valid_body(path: str, user_id: str) -> Any:
    """A body the admin's explicit request succeeds with (or no body at all)."""
    if path.endswith(("/topup", "/charge", "/credits/holds")):
        return {"user_id": user_id, "amount_usdc": "1.5", "metadata": {"order": "42"}}
    if path.endswith("/adjustments"):
        return {"user_id": user_id, "amount_usdc": "-0.5", "reason": "correction"}
    if path.endswith("/refund"):
        return {"amount_usdc": "1", "reason": "goodwill"}
    if path.endswith("/capture"):
        return {"amount_usdc": "0.5"}
    if path.endswith("/credits/grants"):
        return {
            "user_id": user_id,
            "amount_usdc": "2",
            "priority": 10,
            "expires_at": "2099-01-01T00:00:00Z",
        }
    if path.endswith("/void"):
        return {"reason": "withdrawn"}
    return None


def expected_status(role: str, method: str, path: str) -> int:
    if role == "user" and method == "POST":
        return 403
    if method == "GET" or path.endswith(("/capture", "/release", "/void")):
        return 200
    return 201


@pytest.fixture
def seeded(client, auth, user_id) -> dict[str, list[str]]:
    """A funded user with a charge, three pending holds and three grants; their
    ids by path parameter."""
    admin = auth("st_seed_admin", scopes=ROLES["admin"])
    topup = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": "50", "metadata": {"seed": "yes"}},
        headers={**admin, **key()},
    )
    assert topup.status_code == 201, topup.json
    charge = client.post(
        f"{BASE}/charge",
        json={"user_id": user_id, "amount_usdc": "5", "reference": f"ref_{uuid.uuid4().hex}"},
        headers={**admin, **key()},
    )
    assert charge.status_code == 201, charge.json
    holds = []
    for amount in ("1", "2", "3"):
        hold = client.post(
            f"{BASE}/holds",
            json={"user_id": user_id, "amount_usdc": amount},
            headers={**admin, **key()},
        )
        assert hold.status_code == 201, hold.json
        holds.append(hold.json["id"])
    grants = []
    for amount in ("1", "2", "3"):
        made = client.post(
            f"{BASE}/grants",
            json={"user_id": user_id, "amount_usdc": amount},
            headers={**admin, **key()},
        )
        assert made.status_code == 201, made.json
        grants.append(made.json["id"])
    # The charge first: the explicit refund request refunds it.
    return {
        "transaction_id": [charge.json["id"], topup.json["id"]],
        "hold_id": holds,
        "grant_id": grants,
    }


def test_every_served_operation_is_exercised(client):
    """The module's operation list is the served document's, so none is skipped."""
    served = client.get(DOCUMENT)
    assert served.status_code == 200
    paths = served.json["paths"]
    assert sorted((m.upper(), p) for p, ms in paths.items() for m in ms) == OPERATIONS
    assert len(OPERATIONS) == 18


def _strategy(operation: Any, seeded: dict[str, list[str]]) -> st.SearchStrategy[Any]:
    strategies = [
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    ]
    names = [p.name for p in operation.path_parameters]
    for values in zip(*(seeded[name] for name in names), strict=True) if names else ():
        strategies.append(
            operation.as_strategy(
                generation_mode=GenerationMode.POSITIVE,
                path_parameters=dict(zip(names, values, strict=True)),
            )
        )
    return st.one_of(strategies)


@pytest.mark.parametrize("role", sorted(ROLES))
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_operation_conforms(app, client, seeded, user_id, role, method, path):
    schema = schemathesis.openapi.from_dict(client.get(DOCUMENT).json)
    operation = schema[path][method]
    subject = user_id if role == "user" else f"st_admin_{uuid.uuid4().hex[:8]}"
    token = make_token(subject, scopes=ROLES[role])

    def headers() -> dict[str, str]:
        sent = {"Authorization": f"Bearer {token}"}
        return {**sent, **key()} if method == "POST" else sent

    # One request with a known outcome, so the success schema is always checked.
    names = [p.name for p in operation.path_parameters]
    body = valid_body(path, user_id)
    explicit = operation.Case(
        path_parameters={name: seeded[name][0] for name in names},
        **({"body": body, "media_type": "application/json"} if body is not None else {}),
    )
    response = explicit.call_and_validate(app=app, headers=headers(), checks=CHECKS)
    assert response.status_code == expected_status(role, method, path), response.text

    statuses: list[int] = []

    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=_strategy(operation, seeded))
    def generated(case: Any) -> None:
        sent = case.call_and_validate(app=app, headers=headers(), checks=CHECKS)
        statuses.append(sent.status_code)

    generated()
    assert statuses
    assert max(statuses) < 500
