"""Authorization boundaries and hygiene, on every engine.

Scopes that merely look like the admin scope grant nothing; the service scope
moves money but never mints it or reads other users; ids of other users'
entries and holds are 404s; idempotency keys belong to their caller; the
X-User-Id header is an identity only when the host opts in, and then carries
no scope; tokens are read from the header only; and neither error bodies nor
log records carry the token, the JWT secret, SQL or a traceback.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from conftest import ADMIN_SCOPE, SECRET, SERVICE_SCOPE, assert_error, make_token
from flask import Flask

from callora_credits.db.models import Account, HoldRow, LedgerEntry

BASE = "/api/billing/credits"
BOTH = f"{ADMIN_SCOPE} {SERVICE_SCOPE}"


# --- helpers -------------------------------------------------------------------------


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def bearer(user: Any, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user, **kwargs)}"}


def bearer_with_claims(user: str, claims: dict[str, Any]) -> dict[str, str]:
    """A valid token with arbitrary extra claims (``make_token`` reserves ``scopes``)."""
    payload = jwt.decode(make_token(user), options={"verify_signature": False})
    return {"Authorization": f"Bearer {jwt.encode({**payload, **claims}, SECRET)}"}


def snapshot(app: Flask, user_id: str) -> tuple[Any, ...]:
    """Everything the library stores about ``user_id``: balance, entries, holds."""
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        a, e, h = Account.__table__, LedgerEntry.__table__, HoldRow.__table__
        with engine.connect() as conn:
            balance = conn.execute(
                sa.select(a.c.balance_units, a.c.last_seq).where(a.c.user_id == user_id)
            ).all()
            entries = conn.execute(
                sa.select(e.c.id, e.c.refunded_units).where(e.c.user_id == user_id)
            ).all()
            holds = conn.execute(sa.select(h.c.id, h.c.status).where(h.c.user_id == user_id)).all()
    return (sorted(balance), sorted(entries), sorted(holds))


@pytest.fixture
def admin(auth) -> dict[str, str]:
    return auth(uid("ops"), scopes=BOTH)


@pytest.fixture
def victim(client, admin) -> dict[str, str]:
    """A funded user with a charge (refundable) and a pending hold."""
    user = uid("victim")
    topup = client.post(
        f"{BASE}/topup",
        json={"user_id": user, "amount_usdc": "20", "description": "victim's money"},
        headers={**admin, **key()},
    )
    assert topup.status_code == 201, topup.json
    charge = client.post(
        f"{BASE}/charge",
        json={"user_id": user, "amount_usdc": "2"},
        headers={**admin, **key()},
    )
    assert charge.status_code == 201, charge.json
    hold = client.post(
        f"{BASE}/holds",
        json={"user_id": user, "amount_usdc": "3"},
        headers={**admin, **key()},
    )
    assert hold.status_code == 201, hold.json
    return {
        "user_id": user,
        "topup": topup.json["id"],
        "charge": charge.json["id"],
        "hold": hold.json["id"],
    }


def admin_requests(victim: dict[str, str]) -> list[tuple[str, str, Any]]:
    """What only the admin scope may do, aimed at ``victim``."""
    user = victim["user_id"]
    return [
        ("POST", f"{BASE}/topup", {"user_id": user, "amount_usdc": "1000"}),
        ("POST", f"{BASE}/topup", {"user_id": uid("attacker"), "amount_usdc": "1000"}),
        ("POST", f"{BASE}/adjustments", {"user_id": user, "amount_usdc": "5", "reason": "x"}),
        ("POST", f"{BASE}/adjustments", {"user_id": user, "amount_usdc": "-5", "reason": "x"}),
        ("POST", f"{BASE}/transactions/{victim['charge']}/refund", {}),
        ("GET", f"{BASE}?user_id={user}", None),
        ("GET", f"{BASE}/transactions?user_id={user}", None),
        ("GET", f"{BASE}/holds?user_id={user}", None),
    ]


def service_requests(victim: dict[str, str]) -> list[tuple[str, str, Any]]:
    """What the service scope may do, aimed at ``victim``."""
    user = victim["user_id"]
    return [
        ("POST", f"{BASE}/charge", {"user_id": user, "amount_usdc": "1"}),
        ("POST", f"{BASE}/holds", {"user_id": user, "amount_usdc": "1"}),
        ("POST", f"{BASE}/holds/{victim['hold']}/capture", {}),
        ("POST", f"{BASE}/holds/{victim['hold']}/release", {}),
    ]


def send(client, method: str, path: str, body: Any, headers: dict[str, str]):
    if method == "POST":
        return client.post(path, json=body, headers={**headers, **key()})
    return client.get(path, headers=headers)


def assert_cannot_see_foreign_ids(client, victim, headers) -> None:
    unknown = client.get(f"{BASE}/transactions/ctx_{uuid.uuid4().hex[:24]}", headers=headers)
    unknown_body = assert_error(unknown, 404, "NOT_FOUND")
    for path in (
        f"{BASE}/transactions/{victim['topup']}",
        f"{BASE}/transactions/{victim['charge']}",
        f"{BASE}/holds/{victim['hold']}",
    ):
        body = assert_error(client.get(path, headers=headers), 404, "NOT_FOUND")
        assert victim["user_id"] not in str(body)
        if "/transactions/" in path:
            # Indistinguishable from an id that does not exist.
            assert {**body, "requestId": ""} == {**unknown_body, "requestId": ""}


# --- scopes ------------------------------------------------------------------------------


LOOKALIKE_SCOPES = {
    "suffix": "credits:adminx",
    "prefix": "xcredits:admin",
    "narrower": "credits:admin:read",
    "charge-and-narrower": "credits:charge credits:admin:read",
    "upper-case": "CREDITS:ADMIN CREDITS:CHARGE",
    "comma-separated": "credits:admin,credits:charge",
    "cyrillic-i": "credits:adm\u0456n",
    "zero-width-space": "credits:admin\u200b",
    "spaced-colon": "credits : admin",
    "list-of-one-joined-string": ["credits:admin credits:charge"],
    "nested-list": [["credits:admin"], ["credits:charge"]],
    "list-of-dicts": [{"credits:admin": True}],
    "dict": {"credits:admin": True, "credits:charge": True},
    "dict-scope": {"scope": "credits:admin"},
    "int": 1,
    "bool": True,
    "float": 1.0,
    "empty": "",
}


@pytest.mark.parametrize("scope", list(LOOKALIKE_SCOPES.values()), ids=list(LOOKALIKE_SCOPES))
def test_lookalike_scopes_grant_nothing(app, client, victim, scope):
    before = snapshot(app, victim["user_id"])
    attacker = bearer(uid("attacker"), scopes=scope)
    for method, path, body in admin_requests(victim):
        assert_error(send(client, method, path, body, attacker), 403, "FORBIDDEN")
    has_service = isinstance(scope, str) and SERVICE_SCOPE in scope.split(" ")
    for method, path, body in service_requests(victim):
        response = send(client, method, path, body, attacker)
        if not has_service:
            assert_error(response, 403, "FORBIDDEN")
    assert_cannot_see_foreign_ids(client, victim, attacker)
    if not has_service:
        assert snapshot(app, victim["user_id"]) == before


@pytest.mark.parametrize(
    "separator",
    ["\t", "\n", "\u00a0", "\u2003", "\u3000", "\x1f"],
    ids=["tab", "newline", "nbsp", "em-space", "ideographic-space", "unit-separator"],
)
def test_scope_tokens_are_separated_by_spaces_only(client, victim, separator):
    token = bearer(uid("attacker"), scopes=f"read{separator}{ADMIN_SCOPE}")
    response = client.get(f"{BASE}?user_id={victim['user_id']}", headers=token)
    assert_error(response, 403, "FORBIDDEN")


def test_real_scopes_do_grant(client, victim):
    """The control for the tests above: the exact scopes, as a string or a list."""
    for scopes in (ADMIN_SCOPE, [ADMIN_SCOPE], f"openid {ADMIN_SCOPE}"):
        response = client.get(
            f"{BASE}?user_id={victim['user_id']}", headers=bearer("ops", scopes=scopes)
        )
        assert response.status_code == 200, response.json
    service = bearer(uid("gw"), scopes=[SERVICE_SCOPE])
    charge = send(client, *service_requests(victim)[0], service)
    assert charge.status_code == 201, charge.json


def test_scopes_in_other_claims_are_ignored(host, client, victim):
    user = victim["user_id"]
    for claim in ("scopes", "scp", "permissions", "roles", "credits:admin", "Scope"):
        token = bearer_with_claims(uid("attacker"), {claim: [ADMIN_SCOPE, SERVICE_SCOPE]})
        assert_error(client.get(f"{BASE}?user_id={user}", headers=token), 403, "FORBIDDEN")
        topup = send(client, "POST", f"{BASE}/topup", {"user_id": user, "amount_usdc": "1"}, token)
        assert_error(topup, 403, "FORBIDDEN")
    # A host that names another claim: only that claim counts.
    custom = host(CREDITS_SCOPE_CLAIM="permissions").test_client()
    ignored = bearer(uid("attacker"), scopes=ADMIN_SCOPE)
    assert_error(custom.get(f"{BASE}?user_id={user}", headers=ignored), 403, "FORBIDDEN")
    granted = bearer("ops", permissions=[ADMIN_SCOPE])
    assert custom.get(f"{BASE}?user_id={user}", headers=granted).status_code == 200


def test_service_scope_never_mints_and_learns_only_the_charged_balance(app, client, victim):
    service = bearer(uid("gateway"), scopes=SERVICE_SCOPE)
    before = snapshot(app, victim["user_id"])
    for method, path, body in admin_requests(victim):
        assert_error(send(client, method, path, body, service), 403, "FORBIDDEN")
    assert_cannot_see_foreign_ids(client, victim, service)
    assert snapshot(app, victim["user_id"]) == before
    # What it is for still works, and a charge tells it the user's balance
    # after the debit (20 topped up, 2 charged, 1 now; the 3 held still count).
    charge = send(client, *service_requests(victim)[0], service)
    assert charge.status_code == 201, charge.json
    assert charge.json["balance_after_usdc"] == "17.0000000"
    # A hold carries no balance; a refusal names no amount.
    hold = send(client, *service_requests(victim)[1], service)
    assert hold.status_code == 201, hold.json
    assert not [name for name in hold.json if "balance" in name]
    too_much = {"user_id": victim["user_id"], "amount_usdc": "1000"}
    body = assert_error(
        send(client, "POST", f"{BASE}/charge", too_much, service), 402, "INSUFFICIENT_CREDITS"
    )
    assert body["details"] == []
    assert not any(character.isdigit() for character in body["message"])


# --- ids of other users --------------------------------------------------------------------


def test_foreign_ids_are_404_for_users_and_200_for_admins(client, admin, auth, victim):
    stranger = auth(uid("stranger"))
    assert_cannot_see_foreign_ids(client, victim, stranger)
    for path in (f"{BASE}/transactions/{victim['charge']}", f"{BASE}/holds/{victim['hold']}"):
        # The owner and an admin see the same record.
        own = client.get(path, headers=auth(victim["user_id"]))
        as_admin = client.get(path, headers=admin)
        assert own.status_code == as_admin.status_code == 200
        assert own.json == as_admin.json
        assert own.json["user_id"] == victim["user_id"]


# --- idempotency keys belong to their caller ------------------------------------------------


def test_another_admins_key_is_a_new_request(app, client, auth, user_id):
    first_admin, second_admin = auth(uid("ops"), scopes=BOTH), auth(uid("ops"), scopes=BOTH)
    shared = {"Idempotency-Key": f"shared-{uuid.uuid4().hex}"}
    body = {"user_id": user_id, "amount_usdc": "3", "reference": None}
    first = client.post(f"{BASE}/topup", json=body, headers={**first_admin, **shared})
    assert first.status_code == 201, first.json
    second = client.post(f"{BASE}/topup", json=body, headers={**second_admin, **shared})
    assert second.status_code == 201, second.json
    assert "Idempotent-Replayed" not in second.headers
    assert second.json["id"] != first.json["id"]
    assert first.json["id"] not in second.get_data(as_text=True)
    assert (second.json["seq"], second.json["balance_after_usdc"]) == (2, "6.0000000")
    assert second.json["actor_id"] != first.json["actor_id"]
    # The key is still live for its owner: a replay of the first response.
    replay = client.post(f"{BASE}/topup", json=body, headers={**first_admin, **shared})
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_data() == first.get_data()
    assert snapshot(app, user_id)[0] == [(60_000_000, 2)]


def test_another_services_key_gets_its_own_outcome(client, admin, auth, user_id):
    first_gw, second_gw = (
        auth(uid("gw"), scopes=SERVICE_SCOPE),
        auth(uid("gw"), scopes=SERVICE_SCOPE),
    )
    shared = {"Idempotency-Key": f"shared-{uuid.uuid4().hex}"}
    body = {"user_id": user_id, "amount_usdc": "1"}
    broke = client.post(f"{BASE}/charge", json=body, headers={**first_gw, **shared})
    assert_error(broke, 402, "INSUFFICIENT_CREDITS")
    topped = client.post(
        f"{BASE}/topup", json={"user_id": user_id, "amount_usdc": "5"}, headers={**admin, **key()}
    )
    assert topped.status_code == 201
    # The second gateway's request is its own: charged now, not the stored 402.
    paid = client.post(f"{BASE}/charge", json=body, headers={**second_gw, **shared})
    assert paid.status_code == 201, paid.json
    assert "Idempotent-Replayed" not in paid.headers
    assert broke.json["requestId"] not in paid.get_data(as_text=True)
    # ... while the first one's outcome stays a 402.
    again = client.post(f"{BASE}/charge", json=body, headers={**first_gw, **shared})
    assert again.status_code == 402
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == broke.get_data()
    # Same for holds: two holds, two ids.
    hold_key = {"Idempotency-Key": f"hold-{uuid.uuid4().hex}"}
    holds = [
        client.post(f"{BASE}/holds", json=body, headers={**gw, **hold_key})
        for gw in (first_gw, second_gw)
    ]
    assert [h.status_code for h in holds] == [201, 201]
    assert holds[0].json["id"] != holds[1].json["id"]


def test_a_users_replay_of_an_admin_key_is_their_own_403(client, admin, auth, user_id):
    shared = {"Idempotency-Key": f"shared-{uuid.uuid4().hex}"}
    body = {"user_id": user_id, "amount_usdc": "9"}
    first = client.post(f"{BASE}/topup", json=body, headers={**admin, **shared})
    assert first.status_code == 201
    for caller in (auth(user_id), auth(uid("stranger"))):
        response = client.post(f"{BASE}/topup", json=body, headers={**caller, **shared})
        assert_error(response, 403, "FORBIDDEN")
        assert "Idempotent-Replayed" not in response.headers
        assert first.json["id"] not in response.get_data(as_text=True)


# --- the X-User-Id header ---------------------------------------------------------------------


def every_route(victim: dict[str, str]) -> list[tuple[str, str, Any]]:
    user = victim["user_id"]
    return [
        ("GET", BASE, None),
        ("GET", f"{BASE}/transactions", None),
        ("GET", f"{BASE}/transactions/{victim['charge']}", None),
        ("GET", f"{BASE}/holds", None),
        ("GET", f"{BASE}/holds/{victim['hold']}", None),
        *admin_requests(victim),
        *service_requests(victim),
        ("POST", f"{BASE}/transactions/{victim['charge']}/refund", {"amount_usdc": "1"}),
        ("POST", f"{BASE}/charge", {"user_id": user, "amount_usdc": "1"}),
    ]


def test_user_id_header_is_ignored_on_every_route_by_default(app, client, victim):
    before = snapshot(app, victim["user_id"])
    for header in (victim["user_id"], uid("ops"), "ops_admin"):
        for method, path, body in every_route(victim):
            response = send(client, method, path, body, {"X-User-Id": header})
            assert_error(response, 401, "UNAUTHORIZED")
    assert snapshot(app, victim["user_id"]) == before
    # Beside a token, the header changes nothing either.
    me = uid("me")
    mixed = client.get(
        f"{BASE}/transactions", headers={**bearer(me), "X-User-Id": victim["user_id"]}
    )
    assert mixed.status_code == 200
    assert mixed.json["data"] == []


def test_header_identified_caller_has_no_scope(host, client, victim):
    app = host(CREDITS_TRUST_USER_ID_HEADER=True)
    trusted = app.test_client()
    before = snapshot(app, victim["user_id"])
    for name in (uid("caller"), "ops_admin", ADMIN_SCOPE):
        caller = {"X-User-Id": name}
        for method, path, body in admin_requests(victim) + service_requests(victim):
            assert_error(send(trusted, method, path, body, caller), 403, "FORBIDDEN")
        assert_cannot_see_foreign_ids(trusted, victim, caller)
        own = trusted.get(BASE, headers=caller)
        assert (own.status_code, own.json["user_id"]) == (200, name)
    # Not even with an admin token beside it when the host has no JWTManager.
    no_jwt = host(with_jwt=False, CREDITS_TRUST_USER_ID_HEADER=True).test_client()
    forged = {**bearer("ops", scopes=BOTH), "X-User-Id": uid("caller")}
    for method, path, body in admin_requests(victim) + service_requests(victim):
        assert_error(send(no_jwt, method, path, body, forged), 403, "FORBIDDEN")
    assert snapshot(app, victim["user_id"]) == before


# --- where tokens are read from ---------------------------------------------------------------


@pytest.mark.parametrize(
    "sub",
    [123, 0, 1.5, True, ["ops"], {"id": "ops"}],
    ids=["int", "zero", "float", "bool", "list", "dict"],
)
def test_non_string_subject_is_missing_claims_everywhere(app, client, victim, sub):
    before = snapshot(app, victim["user_id"])
    token = {"Authorization": f"Bearer {make_token(sub, scopes=BOTH)}"}
    for method, path, body in every_route(victim):
        assert_error(send(client, method, path, body, token), 401, "MISSING_CLAIMS")
    assert snapshot(app, victim["user_id"]) == before


def test_tokens_outside_the_header_are_ignored(host, victim):
    # Even a host that lets Flask-JWT-Extended read cookies, query strings and
    # JSON bodies: the library reads the header only.
    app = host(JWT_TOKEN_LOCATION=["headers", "cookies", "query_string", "json"])
    client = app.test_client()
    token = make_token("ops", scopes=BOTH)
    before = snapshot(app, victim["user_id"])
    client.set_cookie("access_token_cookie", token)
    for method, path, body in every_route(victim):
        assert_error(send(client, method, path, body, {}), 401, "UNAUTHORIZED")
        joiner = "&" if "?" in path else "?"
        for name in ("jwt", "access_token", "token"):
            query = f"{path}{joiner}{name}={token}"
            assert_error(send(client, method, query, body, {}), 401, "UNAUTHORIZED")
        if method == "POST":
            with_token = {**(body or {}), "access_token": token}
            assert_error(send(client, method, path, with_token, {}), 401, "UNAUTHORIZED")
    assert snapshot(app, victim["user_id"]) == before


# --- error bodies and logs --------------------------------------------------------------------


SQL_AND_TRACES = ("SELECT", "INSERT", "UPDATE ", "credits_transactions", "Traceback")


def _log_text(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) + " " + repr(vars(r)) for r in records)


def test_failures_leak_no_token_secret_or_sql(app, client, admin, auth, victim, caplog):
    caplog.set_level(logging.DEBUG, logger="callora_credits")
    user = victim["user_id"]
    admin_token = admin["Authorization"].split(" ", 1)[1]
    user_token = make_token(user)
    wrong_key = make_token(user, secret="an-attackers-secret-that-is-long-enough-xx")
    expired = make_token(user, expires_in=timedelta(minutes=-1))
    shared = {"Idempotency-Key": uuid.uuid4().hex}
    tokens = [admin_token, user_token, wrong_key, expired]
    refund = f"{BASE}/transactions/{victim['charge']}/refund"
    failures = [
        ("GET", BASE, None, {"Authorization": f"Bearer {wrong_key}"}, 401),
        ("GET", BASE, None, {"Authorization": f"Bearer {expired}"}, 401),
        ("GET", BASE, None, {"Authorization": f"Bearer {user_token[:-4]}"}, 401),
        ("GET", BASE, None, {"Authorization": f"Basic {user_token}"}, 401),
        ("GET", BASE, None, {"Authorization": f"Bearer {user_token} {user_token}"}, 401),
        ("GET", f"{BASE}?user_id=other", None, bearer(user), 403),
        ("POST", f"{BASE}/topup", {"user_id": user, "amount_usdc": "1"}, bearer(user), 403),
        ("GET", f"{BASE}?bogus=1", None, bearer(user), 400),
        ("POST", f"{BASE}/topup", {"user_id": user, "amount_usdc": "1e3"}, admin, 400),
        ("POST", f"{BASE}/charge", {"user_id": user, "amount_usdc": "999"}, admin, 402),
        ("GET", f"{BASE}/transactions/ctx_nope", None, admin, 404),
        ("DELETE", f"{BASE}/topup", None, admin, 405),
        ("POST", f"{BASE}/topup", {"user_id": user, "description": "x" * 70_000}, admin, 413),
        ("POST", f"{BASE}/holds/{victim['hold']}/release", {}, admin, 200),
        ("POST", f"{BASE}/holds/{victim['hold']}/release", {}, admin, 409),
        ("POST", refund, {"amount_usdc": "9"}, admin, 422),
    ]  # fmt: skip
    for method, path, body, headers, status in failures:
        sent = {**headers, **key()} if method in ("POST", "DELETE") else headers
        response = client.open(path, method=method, json=body, headers=sent)
        assert response.status_code == status, (path, response.get_data(as_text=True)[:300])
        text = response.get_data(as_text=True)
        for secret in (*tokens, SECRET, *SQL_AND_TRACES):
            assert secret not in text, (path, secret)
    # An idempotency conflict, too.
    first = {"user_id": user, "amount_usdc": "1"}
    client.post(f"{BASE}/topup", json=first, headers={**admin, **shared})
    conflict = client.post(
        f"{BASE}/topup", json={**first, "amount_usdc": "2"}, headers={**admin, **shared}
    )
    assert_error(conflict, 422, "IDEMPOTENCY_CONFLICT")

    logged = _log_text(caplog.records)
    assert caplog.records  # the access log saw every request
    for secret in (*tokens, SECRET, *SQL_AND_TRACES):
        assert secret not in logged, secret


def _unreachable_url(engine_name: str, databases: Any) -> tuple[str, str | None]:
    """A URL for this engine that cannot be reached, and a password it carries."""
    if engine_name == "sqlite":
        return f"sqlite:////nonexistent-{uuid.uuid4().hex}/credits.db", None
    password = f"db-pass-{uuid.uuid4().hex}"
    url = sa.engine.make_url(databases.url(engine_name))
    closed = url.set(host="127.0.0.1", port=1, password=password)
    return closed.render_as_string(hide_password=False), password


@pytest.mark.parametrize("failure", ["unreachable", "no_tables"])
def test_a_5xx_body_says_nothing_and_the_log_keeps_the_detail(
    host, databases, engine_name, caplog, tmp_path, failure
):
    """An unreachable database is a 503 (logged as a warning), a database
    without the credits tables a 500 (an error): neither body says more."""
    if failure == "unreachable":
        url, db_password = _unreachable_url(engine_name, databases)
        status, code, level = 503, "SERVICE_UNAVAILABLE", logging.WARNING
    else:
        if engine_name != "sqlite":
            pytest.skip("one engine is enough for a missing table")
        url, db_password = f"sqlite:///{tmp_path / 'no-tables.sqlite3'}", None
        status, code, level = 500, "INTERNAL_SERVER_ERROR", logging.ERROR
    app = host(url, CREDITS_DB_RETRIES=2, CREDITS_DB_RETRY_SECONDS=0.2)
    client = app.test_client()
    caplog.set_level(logging.DEBUG, logger="callora_credits")
    user_token = make_token(uid("user"))
    admin_token = make_token(uid("ops"), scopes=BOTH)
    secrets = [user_token, admin_token, SECRET] + ([db_password] if db_password else [])
    calls = [
        ("GET", BASE, None, user_token),
        ("GET", f"{BASE}/transactions", None, user_token),
        ("POST", f"{BASE}/topup", {"user_id": "u", "amount_usdc": "1"}, admin_token),
        ("POST", f"{BASE}/holds/hold_x/capture", {}, admin_token),
    ]
    for method, path, body, token in calls:
        request_id = f"rid-{uuid.uuid4().hex}"
        caplog.clear()
        headers = {"Authorization": f"Bearer {token}", "X-Request-Id": request_id, **key()}
        response = client.open(path, method=method, json=body, headers=headers)
        answered = assert_error(response, status, code)
        assert answered["requestId"] == request_id
        assert answered["details"] == []
        if status == 500:
            assert answered["message"] == "Internal server error"
        text = response.get_data(as_text=True)
        for secret in (*secrets, *SQL_AND_TRACES, "OperationalError", "127.0.0.1"):
            assert secret not in text, secret
        # The detail is in the log, with the request id; secrets are not.
        logged_here = [
            r
            for r in caplog.records
            if r.levelno >= logging.WARNING and getattr(r, "request_id", None) == request_id
        ]
        assert logged_here, [r.getMessage() for r in caplog.records]
        assert any(r.exc_info and r.levelno == level for r in logged_here)
        logged = _log_text(caplog.records)
        assert "Traceback" in logged
        for secret in secrets:
            assert secret not in logged, secret


def test_log_lines_have_no_control_characters(client, admin, caplog):
    caplog.set_level(logging.DEBUG, logger="callora_credits")
    forged = "x%0d%0a2026-01-01 INFO callora_credits POST topup 201 (forged)"
    for path in (f"{BASE}/transactions/{forged}", f"{BASE}/holds/{forged}"):
        assert_error(client.get(path, headers=admin), 404, "NOT_FOUND")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    for message in messages:
        assert "\n" not in message, message
        assert "\r" not in message, message
