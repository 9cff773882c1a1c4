"""Conditional reads: ETag on every 200 to a GET, 304 on If-None-Match.

The GET routes are read from the blueprint as registered on an app, so a new
GET route fails ``test_every_get_route_has_a_case`` until it gets a case
here: how to reach it and what changes its body. The library's clock is
stopped, so a body changes only when the test changes the data.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import ADMIN, ADMIN_SCOPE, SECRET, SERVICE_SCOPE, assert_error, make_app, make_token

BASE = "/api/billing/credits"
TAG = re.compile(r'^"[0-9a-f]{32}"$')


def _blueprint_get_endpoints() -> list[str]:
    """Every endpoint of the blueprint that answers GET (the catch-all aside)."""
    app = make_app("sqlite://")
    return sorted(
        rule.endpoint
        for rule in app.url_map.iter_rules()
        if rule.endpoint.startswith("credits.")
        and rule.endpoint != "credits.routing_error"
        and "GET" in (rule.methods or ())
    )


GET_ENDPOINTS = _blueprint_get_endpoints()


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


class StoppedClock:
    """The library's clock, moved only by the test."""

    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class World:
    """A funded user with a charge and a pending hold, and the means to change them."""

    app: Any
    client: Any
    clock: StoppedClock
    user: str
    charge_id: str
    hold_id: str
    grant_id: str = ""

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(ADMIN, scopes=ADMIN_SCOPE)}"}

    @property
    def service(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token('gateway', scopes=SERVICE_SCOPE)}"}

    def mine(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(self.user)}"}

    def post(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
        response = self.client.post(f"{BASE}{path}", json=body, headers={**headers, **key()})
        assert response.status_code in (200, 201), response.get_json()
        # The entry is written at the stopped instant; reads from the next
        # instant on see it (a usage range ends, exclusively, at now).
        self.clock.advance(1)
        return response.get_json()

    def charge(self, amount: str = "1") -> Any:
        return self.post("/charge", {"user_id": self.user, "amount_usdc": amount}, self.service)


def build_world(app: Any, client: Any, user: str) -> World:
    clock = StoppedClock()
    app.extensions["callora_credits"].clock = clock
    world = World(app, client, clock, user, "", "")
    admin = world.admin
    world.post("/topup", {"user_id": user, "amount_usdc": "50"}, admin)
    world.charge_id = world.charge("5")["id"]
    world.hold_id = world.post("/holds", {"user_id": user, "amount_usdc": "2"}, world.service)[
        "id"
    ]
    world.grant_id = world.post("/grants", {"user_id": user, "amount_usdc": "3"}, admin)["id"]
    return world


def _change_the_document(world: World) -> None:
    world.app.config["CREDITS_ADMIN_SCOPE"] = "billing:admin"


@dataclass(frozen=True)
class Case:
    """How to reach a GET route for the world's user, and what changes its body."""

    path: Callable[[World], str]
    change: Callable[[World], object]
    #: Who may read it: the user (and an admin), or anyone at all.
    authenticated: bool = True
    #: Whether two users with no data get byte-identical bodies here.
    equal_when_empty: bool = False


CASES: dict[str, Case] = {
    "credits.get_balance": Case(lambda w: BASE, lambda w: w.charge()),
    "credits.list_transactions": Case(
        lambda w: f"{BASE}/transactions", lambda w: w.charge(), equal_when_empty=True
    ),
    "credits.get_transaction": Case(
        lambda w: f"{BASE}/transactions/{w.charge_id}",
        lambda w: w.post(f"/transactions/{w.charge_id}/refund", {"amount_usdc": "1"}, w.admin),
    ),
    "credits.list_holds": Case(
        lambda w: f"{BASE}/holds",
        lambda w: w.post("/holds", {"user_id": w.user, "amount_usdc": "1"}, w.service),
        equal_when_empty=True,
    ),
    "credits.get_hold": Case(
        lambda w: f"{BASE}/holds/{w.hold_id}",
        lambda w: w.post(f"/holds/{w.hold_id}/capture", {}, w.service),
    ),
    "credits.list_grants": Case(
        lambda w: f"{BASE}/grants",
        lambda w: w.post("/grants", {"user_id": w.user, "amount_usdc": "1"}, w.admin),
        equal_when_empty=True,
    ),
    "credits.get_grant": Case(
        lambda w: f"{BASE}/grants/{w.grant_id}",
        lambda w: w.charge("1"),  # drawn from the promotional grant first
    ),
    "credits.usage": Case(lambda w: f"{BASE}/usage", lambda w: w.charge(), equal_when_empty=True),
    "credits.openapi_document": Case(
        lambda w: "/api/billing/openapi.json", _change_the_document, authenticated=False
    ),
}


def case_of(endpoint: str) -> Case:
    if endpoint not in CASES:
        pytest.fail(f"{endpoint} answers GET: add a Case for it to CASES", pytrace=False)
    return CASES[endpoint]


@pytest.fixture
def world(app, client, user_id) -> World:
    return build_world(app, client, user_id)


def test_every_get_route_has_a_case():
    assert GET_ENDPOINTS, "no GET route found on the blueprint"
    assert set(GET_ENDPOINTS) == set(CASES)


def _get(world: World, endpoint: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
    case = case_of(endpoint)
    sent = dict(world.mine() if case.authenticated else {})
    sent.update(headers or {})
    return world.client.get(case.path(world), headers=sent, **kwargs)


def _tag_of(response: Any) -> str:
    assert response.status_code == 200, response.get_data(as_text=True)[:300]
    tag = response.headers["ETag"]
    assert TAG.match(tag), tag
    return str(tag)


def assert_not_modified(response: Any, tag: str) -> None:
    assert response.status_code == 304, response.get_data(as_text=True)[:300]
    assert response.get_data() == b""
    assert response.headers["ETag"] == tag
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Request-Id"]
    assert "Content-Type" not in response.headers


@pytest.mark.parametrize("endpoint", GET_ENDPOINTS)
def test_a_matching_tag_is_a_304_that_keeps_the_headers(world, endpoint):
    first = _get(world, endpoint)
    tag = _tag_of(first)
    assert first.headers["Cache-Control"] == "no-store"
    assert _tag_of(_get(world, endpoint)) == tag  # the same body, the same tag

    again = _get(world, endpoint, {"If-None-Match": tag, "X-Request-Id": "req-poll-1"})

    assert_not_modified(again, tag)
    assert again.headers["X-Request-Id"] == "req-poll-1"


@pytest.mark.parametrize("endpoint", GET_ENDPOINTS)
def test_if_none_match_compares_weakly_and_takes_lists_and_star(world, endpoint):
    tag = _tag_of(_get(world, endpoint))
    other = '"' + "0" * 32 + '"'

    for header in ("*", f"W/{tag}", f"{other}, W/{tag}", f"{other},{tag}"):
        assert_not_modified(_get(world, endpoint, {"If-None-Match": header}), tag)
    for header in (other, f"{other}, W/{other}", "", '"', "W/"):
        response = _get(world, endpoint, {"If-None-Match": header})
        assert _tag_of(response) == tag, header
        assert response.get_data(), header


@pytest.mark.parametrize("endpoint", GET_ENDPOINTS)
def test_a_change_of_the_body_is_a_200_with_a_new_tag(world, endpoint):
    before = _get(world, endpoint)
    old = _tag_of(before)

    case_of(endpoint).change(world)

    after = _get(world, endpoint, {"If-None-Match": old})
    new = _tag_of(after)
    assert after.get_data() != before.get_data()
    assert new != old
    assert_not_modified(_get(world, endpoint, {"If-None-Match": new}), new)


@pytest.mark.parametrize("endpoint", GET_ENDPOINTS)
def test_head_is_tagged_and_conditional_like_get(world, endpoint):
    tag = _tag_of(_get(world, endpoint))
    case = case_of(endpoint)
    sent = world.mine() if case.authenticated else {}

    head = world.client.head(case.path(world), headers=sent)
    assert (head.status_code, head.headers["ETag"]) == (200, tag)
    assert_not_modified(
        world.client.head(case.path(world), headers={**sent, "If-None-Match": tag}), tag
    )


AUTHENTICATED = [e for e in GET_ENDPOINTS if e not in CASES or CASES[e].authenticated]


@pytest.mark.parametrize("endpoint", AUTHENTICATED)
def test_the_auth_checks_run_before_any_304(world, endpoint):
    tag = _tag_of(_get(world, endpoint))
    path = case_of(endpoint).path(world)
    forged = make_token(world.user, secret=SECRET + "x")
    expired = make_token(world.user, expires_in=timedelta(seconds=-30))

    for match in (tag, "*"):
        sent = {"If-None-Match": match}
        assert_error(world.client.get(path, headers=sent), 401, "UNAUTHORIZED")
        bad = {**sent, "Authorization": f"Bearer {forged}"}
        assert_error(world.client.get(path, headers=bad), 401, "INVALID_TOKEN")
        late = {**sent, "Authorization": f"Bearer {expired}"}
        assert_error(world.client.get(path, headers=late), 401, "TOKEN_EXPIRED")
        # Another user: a 404 for an object by id, a 403 for a list of someone else's.
        stranger = {**sent, "Authorization": f"Bearer {make_token(world.user + '_x')}"}
        if "/transactions/" in path or "/holds/" in path or "/grants/" in path:
            assert_error(world.client.get(path, headers=stranger), 404, "NOT_FOUND")
        else:
            named = f"{path}?user_id={world.user}"
            assert_error(world.client.get(named, headers=stranger), 403, "FORBIDDEN")
        # And the query is checked before the tag is compared.
        bogus = {**sent, **world.mine()}
        assert_error(world.client.get(f"{path}?bogus=1", headers=bogus), 400, "VALIDATION_ERROR")


@pytest.mark.parametrize("endpoint", AUTHENTICATED)
def test_the_tag_is_the_data_owners_whoever_reads_it(world, endpoint):
    """An admin reading the user's data gets the user's tag (the tag is of
    the data, not of the reader), and may use it."""
    tag = _tag_of(_get(world, endpoint))
    path = case_of(endpoint).path(world)
    if "/transactions/" not in path and "/holds/" not in path and "/grants/" not in path:
        path = f"{path}?user_id={world.user}"

    by_admin = world.client.get(path, headers=world.admin)
    assert _tag_of(by_admin) == tag
    assert_not_modified(world.client.get(path, headers={**world.admin, "If-None-Match": tag}), tag)


EQUAL_WHEN_EMPTY = [e for e in GET_ENDPOINTS if e in CASES and CASES[e].equal_when_empty]


@pytest.mark.parametrize("endpoint", EQUAL_WHEN_EMPTY)
def test_two_users_with_equal_bodies_have_two_tags(app, client, endpoint):
    clock = StoppedClock()
    app.extensions["callora_credits"].clock = clock
    path = CASES[endpoint].path(World(app, client, clock, "", "", ""))
    first, second = (f"user_{uuid.uuid4().hex[:12]}" for _ in range(2))
    a = client.get(path, headers={"Authorization": f"Bearer {make_token(first)}"})
    b_headers = {"Authorization": f"Bearer {make_token(second)}"}
    b = client.get(path, headers=b_headers)

    assert a.get_data() == b.get_data()
    assert _tag_of(a) != _tag_of(b)
    # One user's tag is no "unchanged" for another's equal body.
    crossed = client.get(path, headers={**b_headers, "If-None-Match": a.headers["ETag"]})
    assert crossed.status_code == 200
    assert crossed.headers["ETag"] == b.headers["ETag"]


def test_the_lists_and_the_usage_are_the_routes_with_equal_empty_bodies():
    # So the test above is not vacuous.
    assert set(EQUAL_WHEN_EMPTY) >= {
        "credits.list_transactions",
        "credits.list_holds",
        "credits.usage",
    }


def test_the_document_has_one_tag_for_everyone(world):
    path = "/api/billing/openapi.json"
    anonymous = world.client.get(path)
    signed_in = world.client.get(path, headers=world.mine())
    assert anonymous.get_data() == signed_in.get_data()
    assert _tag_of(anonymous) == _tag_of(signed_in)


def test_only_200s_to_reads_are_tagged(world):
    created = world.client.post(
        f"{BASE}/charge",
        json={"user_id": world.user, "amount_usdc": "1"},
        headers={**world.service, **key()},
    )
    assert created.status_code == 201
    assert "ETag" not in created.headers
    refused = world.client.get(BASE, headers={"If-None-Match": "*"})
    assert_error(refused, 401, "UNAUTHORIZED")
    assert "ETag" not in refused.headers
    missing = world.client.get(
        f"{BASE}/holds/hold_nope", headers={**world.mine(), "If-None-Match": "*"}
    )
    assert_error(missing, 404, "NOT_FOUND")
    assert "ETag" not in missing.headers
    # A POST answering 200 is no read: If-None-Match changes nothing.
    captured = world.client.post(
        f"{BASE}/holds/{world.hold_id}/capture",
        json={},
        headers={**world.service, **key(), "If-None-Match": "*"},
    )
    assert captured.status_code == 200
    assert captured.get_json()["status"] == "captured"
    assert "ETag" not in captured.headers


def test_a_304_spends_the_rate_limit_budget_and_keeps_its_headers(host, user_id):
    app = host(CREDITS_RATE_LIMIT="3/minute", CREDITS_RATE_LIMIT_STORAGE_URI="memory://")
    client = app.test_client()
    mine = {"Authorization": f"Bearer {make_token(user_id)}"}
    tag = _tag_of(client.get(BASE, headers=mine))
    polled = {**mine, "If-None-Match": tag}

    for remaining in ("1", "0"):
        unchanged = client.get(BASE, headers=polled)
        assert_not_modified(unchanged, tag)
        assert unchanged.headers["X-RateLimit-Limit"] == "3"
        assert unchanged.headers["X-RateLimit-Remaining"] == remaining
    # Over the limit, the 429 comes first: no 304 skips the limiter either.
    over = client.get(BASE, headers=polled)
    assert_error(over, 429, "RATE_LIMITED")
    assert "ETag" not in over.headers
