"""Who may call GET /credits: JWT verification, the trusted header, scopes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import jwt
import pytest
import sqlalchemy as sa
from conftest import ADMIN_SCOPE, SECRET, SERVICE_SCOPE, assert_error, make_app, make_token
from flask import Flask
from flask_jwt_extended import JWTManager

from callora_credits import credits_bp
from callora_credits.db.models import Account

BASE = "/api/billing/credits"
OTHER_SECRET = "another-secret-key-that-is-long-enough-for-hs256"


# --- helpers -------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built by hand, so the test controls what PyJWT would refuse to sign."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{_b64(signature)}"


def claims(user: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": user,
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "type": "access",
        "fresh": False,
        **extra,
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def account_count(app: Flask, *user_ids: str) -> int:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        t = Account.__table__
        with engine.connect() as conn:
            return conn.execute(
                sa.select(sa.func.count()).select_from(t).where(t.c.user_id.in_(user_ids))
            ).scalar_one()


# --- token verification ----------------------------------------------------------


def test_hand_built_token_is_accepted(client, user_id):
    # The control for the forged tokens below: the same builder, the right key.
    token = raw_token({"alg": "HS256", "typ": "JWT"}, claims(user_id), SECRET.encode())
    response = client.get(BASE, headers=bearer(token))
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id


def test_alg_none_is_refused(client, app, user_id):
    token = raw_token({"alg": "none", "typ": "JWT"}, claims(user_id), None)
    assert_error(client.get(BASE, headers=bearer(token)), 401, "INVALID_TOKEN")
    # and without the trailing dot-less signature part, too
    assert_error(client.get(BASE, headers=bearer(token.rstrip("."))), 401, "INVALID_TOKEN")
    assert account_count(app, user_id) == 0


def test_bad_signature(client, app, user_id):
    token = make_token(user_id, secret=OTHER_SECRET)
    assert_error(client.get(BASE, headers=bearer(token)), 401, "INVALID_TOKEN")
    head, payload, signature = make_token(user_id).split(".")
    tampered = f"{head}.{payload}.{signature[:-4]}AAAA"
    assert_error(client.get(BASE, headers=bearer(tampered)), 401, "INVALID_TOKEN")
    assert account_count(app, user_id) == 0


@pytest.mark.parametrize("token", ["not-a-jwt", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..."])
def test_malformed_token(client, token):
    assert_error(client.get(BASE, headers=bearer(token)), 401, "INVALID_TOKEN")


def test_expired_token(client, user_id):
    token = make_token(user_id, expires_in=timedelta(seconds=-30))
    assert_error(client.get(BASE, headers=bearer(token)), 401, "TOKEN_EXPIRED")


def test_host_leeway_applies(host, user_id):
    app = host(JWT_DECODE_LEEWAY=120)
    token = make_token(user_id, expires_in=timedelta(seconds=-30))
    assert app.test_client().get(BASE, headers=bearer(token)).status_code == 200


def test_token_not_active_yet(client, user_id):
    token = make_token(user_id, nbf=int(time.time()) + 3600)
    assert_error(client.get(BASE, headers=bearer(token)), 401, "TOKEN_NOT_ACTIVE")


def test_missing_identity_claim(client):
    token = make_token(omit_identity=True)
    assert_error(client.get(BASE, headers=bearer(token)), 401, "MISSING_CLAIMS")


@pytest.mark.parametrize(
    "identity",
    [123, None, ["user_1"], "", "   ", "u" * 129, "user\x00x", "user\nx", "user\x7fx"],
    ids=["int", "null", "list", "empty", "blank", "129-chars", "nul", "newline", "del"],
)
def test_bad_identity_is_missing_claims(client, app, identity):
    token = raw_token({"alg": "HS256", "typ": "JWT"}, claims(identity), SECRET.encode())
    assert_error(client.get(BASE, headers=bearer(token)), 401, "MISSING_CLAIMS")
    if isinstance(identity, str) and "\x00" not in identity:  # PostgreSQL refuses NUL
        assert account_count(app, identity) == 0


def test_identity_of_128_printable_characters_is_accepted(client, app):
    identity = ("ü" + uuid.uuid4().hex) * 4
    identity = identity[:128]
    response = client.get(BASE, headers=bearer(make_token(identity)))
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == identity
    assert account_count(app, identity) == 1


def test_host_identity_claim_applies(host, user_id):
    app = host(JWT_IDENTITY_CLAIM="uid")
    client = app.test_client()
    ok = client.get(BASE, headers=bearer(make_token("ignored", uid=user_id)))
    assert ok.status_code == 200, ok.json
    assert ok.json["user_id"] == user_id
    # PyJWT only checks `sub`; the library checks whichever claim is the identity.
    not_a_string = client.get(BASE, headers=bearer(make_token("ignored", uid=42)))
    assert_error(not_a_string, 401, "MISSING_CLAIMS")
    missing = client.get(BASE, headers=bearer(make_token(user_id)))
    assert_error(missing, 401, "MISSING_CLAIMS")


# --- the header itself -----------------------------------------------------------


# Every shape is decided by Flask-JWT-Extended, as for the host's own routes;
# tests/test_auth_parity.py sends each one to both.


@pytest.mark.parametrize(
    "value", ["Basic xyz", "Token abc", "Bearerabc", "JWT a.b.c", "bearer a.b.c", "BEARER a.b.c"]
)
def test_other_scheme_is_invalid_auth_header(client, value):
    body = assert_error(
        client.get(BASE, headers={"Authorization": value}), 401, "INVALID_AUTH_HEADER"
    )
    assert body["message"] == "Send one token, as 'Authorization: Bearer <token>'"


@pytest.mark.parametrize(
    "value", ["Bearer", "Bearer ", "Bearer    ", "  Bearer  ", "", "Basic x, Bearer"]
)
def test_bearer_without_token_is_missing_token(client, value):
    assert_error(client.get(BASE, headers={"Authorization": value}), 401, "MISSING_TOKEN")


@pytest.mark.parametrize("separator", ["   ", "\t"], ids=["spaces", "tab"])
def test_whitespace_after_the_scheme(client, user_id, separator):
    response = client.get(
        BASE, headers={"Authorization": f"Bearer{separator}{make_token(user_id)}"}
    )
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id


def test_token_beside_another_scheme(client, user_id):
    value = f"Basic dXNlcjpwYXNz, Bearer {make_token(user_id)}"
    response = client.get(BASE, headers={"Authorization": value})
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id


def test_two_tokens_are_refused(client, app, user_id):
    one, two = make_token(user_id), make_token(user_id)
    for value in (f"Bearer {one} {two}", f"Bearer {one}, Bearer {two}"):
        assert_error(
            client.get(BASE, headers={"Authorization": value}), 401, "INVALID_AUTH_HEADER"
        )
    # Two headers reach the app joined with ", ".
    both = [("Authorization", f"Bearer {one}"), ("Authorization", f"Bearer {two}")]
    assert_error(client.get(BASE, headers=both), 401, "INVALID_AUTH_HEADER")
    assert account_count(app, user_id) == 0


def test_refresh_token_is_refused(client, user_id):
    token = make_token(user_id, type="refresh")
    body = assert_error(client.get(BASE, headers=bearer(token)), 401, "INVALID_TOKEN")
    assert body["message"] == "A refresh token cannot be used here"


def test_host_header_name_and_type_apply(host, user_id):
    app = host(JWT_HEADER_NAME="X-Api-Token", JWT_HEADER_TYPE="JWT")
    client = app.test_client()
    token = make_token(user_id)
    ok = client.get(BASE, headers={"X-Api-Token": f"JWT {token}"})
    assert ok.status_code == 200, ok.json
    wrong = client.get(BASE, headers={"X-Api-Token": f"Bearer {token}"})
    body = assert_error(wrong, 401, "INVALID_AUTH_HEADER")
    assert body["message"] == "Send one token, as 'X-Api-Token: JWT <token>'"
    missing = client.get(BASE, headers={"X-Api-Token": "JWT"})
    body = assert_error(missing, 401, "MISSING_TOKEN")
    assert body["message"] == "The X-Api-Token header holds no token"
    # The default header is not read when the host names another one.
    assert_error(client.get(BASE, headers=bearer(token)), 401, "UNAUTHORIZED")


def test_no_cookie_or_query_string_token(client, user_id):
    token = make_token(user_id)
    client.set_cookie("access_token_cookie", token)
    assert_error(client.get(BASE), 401, "UNAUTHORIZED")
    assert_error(client.get(f"{BASE}?jwt={token}"), 401, "UNAUTHORIZED")


# --- host settings: audience, issuer, algorithms, blocklist ----------------------


def test_wrong_audience(host, user_id):
    client = host(JWT_DECODE_AUDIENCE="credits-api").test_client()
    ok = client.get(BASE, headers=bearer(make_token(user_id, aud="credits-api")))
    assert ok.status_code == 200, ok.json
    wrong = client.get(BASE, headers=bearer(make_token(user_id, aud="other-api")))
    assert_error(wrong, 401, "INVALID_TOKEN")
    missing = client.get(BASE, headers=bearer(make_token(user_id)))
    assert_error(missing, 401, "INVALID_TOKEN")


def test_wrong_issuer(host, user_id):
    client = host(JWT_DECODE_ISSUER="https://auth.example.com").test_client()
    ok = client.get(BASE, headers=bearer(make_token(user_id, iss="https://auth.example.com")))
    assert ok.status_code == 200, ok.json
    wrong = client.get(BASE, headers=bearer(make_token(user_id, iss="https://evil.example")))
    assert_error(wrong, 401, "INVALID_TOKEN")
    missing = client.get(BASE, headers=bearer(make_token(user_id)))
    assert_error(missing, 401, "INVALID_TOKEN")


def test_hs256_signed_with_the_rs256_public_key_is_refused(host, rsa_keys, user_id):
    private_pem, public_pem = rsa_keys
    app = host(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY=public_pem, JWT_PRIVATE_KEY=private_pem)
    client = app.test_client()
    genuine = jwt.encode(claims(user_id), private_pem, algorithm="RS256")
    ok = client.get(BASE, headers=bearer(genuine))
    assert ok.status_code == 200, ok.json
    # The attacker knows the public key and signs with it as an HMAC secret.
    forged = raw_token({"alg": "HS256", "typ": "JWT"}, claims("victim"), public_pem.encode())
    assert_error(client.get(BASE, headers=bearer(forged)), 401, "INVALID_TOKEN")
    # The app still has a JWT_SECRET_KEY, but HS256 is not an accepted algorithm.
    assert_error(client.get(BASE, headers=bearer(make_token(user_id))), 401, "INVALID_TOKEN")
    assert account_count(app, "victim") == 0


def test_revoked_token_via_host_blocklist(client, app, user_id):
    revoked: set[str] = set()
    manager: JWTManager = app.extensions["flask-jwt-extended"]

    headers: list[dict[str, Any]] = []

    @manager.token_in_blocklist_loader
    def is_revoked(jwt_header: dict[str, Any], jwt_payload: dict[str, Any]) -> bool:
        headers.append(jwt_header)
        return jwt_payload["jti"] in revoked

    token = make_token(user_id)
    assert client.get(BASE, headers=bearer(token)).status_code == 200
    assert headers == [jwt.get_unverified_header(token)]  # the token's own header
    revoked.add(jwt.decode(token, options={"verify_signature": False})["jti"])
    body = assert_error(client.get(BASE, headers=bearer(token)), 401, "INVALID_TOKEN")
    assert body["message"] == "Token has been revoked"
    assert client.get(BASE, headers=bearer(make_token(user_id))).status_code == 200


def test_no_header_at_all(client):
    assert_error(client.get(BASE), 401, "UNAUTHORIZED")


# --- the trusted X-User-Id header ------------------------------------------------


def test_user_id_header_ignored_by_default(client, app, user_id):
    assert_error(client.get(BASE, headers={"X-User-Id": user_id}), 401, "UNAUTHORIZED")
    assert account_count(app, user_id) == 0


def test_user_id_header_accepted_when_trusted(host, user_id):
    app = host(CREDITS_TRUST_USER_ID_HEADER=True)
    response = app.test_client().get(BASE, headers={"X-User-Id": user_id})
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id
    assert account_count(app, user_id) == 1


def test_authorization_wins_over_user_id_header(host, user_id):
    app = host(CREDITS_TRUST_USER_ID_HEADER=True)
    client = app.test_client()
    other = f"other_{uuid.uuid4().hex[:12]}"
    response = client.get(BASE, headers={**bearer(make_token(user_id)), "X-User-Id": other})
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id
    # A bad token is a 401, never a fall-back to the header.
    bad = client.get(
        BASE, headers={**bearer(make_token(user_id, secret=OTHER_SECRET)), "X-User-Id": other}
    )
    assert_error(bad, 401, "INVALID_TOKEN")
    assert account_count(app, other) == 0


def test_without_jwt_manager_only_the_header_counts(host, user_id):
    app = host(with_jwt=False, CREDITS_TRUST_USER_ID_HEADER=True)
    client = app.test_client()
    token_user = f"token_{uuid.uuid4().hex[:12]}"
    response = client.get(BASE, headers={**bearer(make_token(token_user)), "X-User-Id": user_id})
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id
    assert_error(client.get(BASE, headers=bearer(make_token(token_user))), 401, "UNAUTHORIZED")
    assert account_count(app, token_user) == 0


@pytest.mark.parametrize(
    "value",
    ["user\x01x", "user\tx", "u" * 129, "", "   "],
    ids=["control", "tab", "129-chars", "empty", "blank"],
)
def test_bad_user_id_header(host, value):
    app = host(CREDITS_TRUST_USER_ID_HEADER=True)
    assert_error(app.test_client().get(BASE, headers={"X-User-Id": value}), 401, "UNAUTHORIZED")


def test_header_caller_has_no_scope(host, user_id):
    app = host(CREDITS_TRUST_USER_ID_HEADER=True)
    response = app.test_client().get(
        BASE, query_string={"user_id": "someone_else"}, headers={"X-User-Id": user_id}
    )
    assert_error(response, 403, "FORBIDDEN")


# --- registration ----------------------------------------------------------------


def test_registration_without_jwt_manager_or_trust_fails(databases, engine_name):
    with pytest.raises(RuntimeError) as info:
        make_app(databases.url(engine_name), with_jwt=False)
    message = str(info.value)
    assert "JWTManager(app)" in message
    assert "CREDITS_TRUST_USER_ID_HEADER" in message


def test_registration_without_flask_sqlalchemy_fails(databases, engine_name):
    app = Flask("no_sqlalchemy_host")
    app.config.update(SQLALCHEMY_DATABASE_URI=databases.url(engine_name), JWT_SECRET_KEY=SECRET)
    JWTManager(app)
    with pytest.raises(RuntimeError, match="Flask-SQLAlchemy"):
        app.register_blueprint(credits_bp, url_prefix="/api/billing")


# --- scopes and ?user_id= --------------------------------------------------------


def test_user_cannot_read_another_balance(client, app, auth, user_id):
    other = f"other_{uuid.uuid4().hex[:12]}"
    response = client.get(BASE, query_string={"user_id": other}, headers=auth(user_id))
    assert_error(response, 403, "FORBIDDEN")
    assert account_count(app, other, user_id) == 0


def test_user_may_name_themselves(client, auth, user_id):
    response = client.get(BASE, query_string={"user_id": user_id}, headers=auth(user_id))
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id


@pytest.mark.parametrize(
    "scopes",
    [ADMIN_SCOPE, f"openid {ADMIN_SCOPE} profile", [ADMIN_SCOPE], ["openid", ADMIN_SCOPE]],
    ids=["string", "spaced-string", "list", "list-of-two"],
)
def test_admin_reads_another_balance(client, app, auth, user_id, scopes):
    response = client.get(
        BASE, query_string={"user_id": user_id}, headers=auth("ops_admin", scopes=scopes)
    )
    assert response.status_code == 200, response.json
    assert response.json["user_id"] == user_id
    assert account_count(app, user_id) == 1


@pytest.mark.parametrize(
    "scopes",
    [SERVICE_SCOPE, [SERVICE_SCOPE], "credits:administrator", "credits", ""],
    ids=["service", "service-list", "longer-name", "prefix", "empty"],
)
def test_non_admin_scope_cannot_use_user_id(client, app, auth, user_id, scopes):
    response = client.get(
        BASE, query_string={"user_id": user_id}, headers=auth("gateway", scopes=scopes)
    )
    assert_error(response, 403, "FORBIDDEN")
    assert account_count(app, user_id) == 0


def test_403_names_the_configured_scope(host, user_id):
    app = host(CREDITS_ADMIN_SCOPE="billing:ops", CREDITS_SERVICE_SCOPE="billing:meter")
    client = app.test_client()
    user = bearer(make_token(user_id))
    expected = {
        ("GET", f"{BASE}?user_id=someone_else"): (
            "Reading another user's data requires the billing:ops scope"
        ),
        ("POST", f"{BASE}/topup"): "This operation requires the billing:ops scope",
        ("POST", f"{BASE}/charge"): "This operation requires the billing:meter scope",
    }
    for (method, path), message in expected.items():
        body = assert_error(client.open(path, method=method, headers=user), 403, "FORBIDDEN")
        assert body["message"] == message
    # The default names are not granted any more.
    admin = bearer(make_token(user_id, scopes=ADMIN_SCOPE))
    assert_error(client.post(f"{BASE}/topup", headers=admin), 403, "FORBIDDEN")
    assert account_count(app, user_id, "someone_else") == 0


def test_current_caller_for_host_routes(app, client, auth):
    from callora_credits import current_caller, error_response
    from callora_credits.errors import CreditsError

    @app.get("/whoami")
    def whoami():
        try:
            caller = current_caller()
        except CreditsError as error:
            return error_response(error)
        return {"user_id": caller.user_id, "scopes": sorted(caller.scopes)}

    ok = client.get("/whoami", headers=auth("carol", scopes="credits:admin"))
    assert ok.json == {"user_id": "carol", "scopes": ["credits:admin"]}
    denied = client.get("/whoami")
    assert (denied.status_code, denied.json["code"]) == (401, "UNAUTHORIZED")


def test_no_identity_where_flask_jwt_extended_verifies_nothing(app, auth):
    """Flask-JWT-Extended skips verification for OPTIONS; no identity follows."""
    from callora_credits import current_caller, error_response
    from callora_credits.errors import CreditsError

    @app.route("/whoami", methods=["GET", "OPTIONS"], provide_automatic_options=False)
    def whoami():
        try:
            return {"user_id": current_caller().user_id}
        except CreditsError as error:
            return error_response(error)

    client = app.test_client()
    headers = auth("carol")
    assert client.get("/whoami", headers=headers).json == {"user_id": "carol"}
    refused = client.options("/whoami", headers=headers)
    assert (refused.status_code, refused.json["code"]) == (401, "UNAUTHORIZED")


# --- the host's loaders ----------------------------------------------------------


def test_host_decode_key_loader_is_used(host, user_id):
    """Per-issuer keys: the loader sees the unverified header and claims."""
    app = host()
    manager: JWTManager = app.extensions["flask-jwt-extended"]
    keys = {"tenant-a": "tenant-a-secret-key-long-enough-for-hs256"}
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = []

    @manager.decode_key_loader
    def key_for(header: dict[str, Any], payload: dict[str, Any]) -> str:
        seen.append((header, payload))
        return keys.get(payload.get("iss", ""), "no-such-tenant-key-long-enough-for-hs256")

    client = app.test_client()
    token = raw_token(
        {"alg": "HS256", "kid": "k1"},
        claims(user_id, iss="tenant-a"),
        keys["tenant-a"].encode(),
    )
    response = client.get(BASE, headers=bearer(token))
    assert response.status_code == 200, response.json
    assert seen[-1][0]["kid"] == "k1"
    assert seen[-1][1]["iss"] == "tenant-a"
    # Signed with the app's own secret, but the loader names another key.
    other = raw_token({"alg": "HS256"}, claims(user_id, iss="tenant-b"), SECRET.encode())
    assert_error(client.get(BASE, headers=bearer(other)), 401, "INVALID_TOKEN")


def test_loaders_get_decode_tokens_defaults(host, user_id):
    """A token without jti/type/fresh reaches the host's loaders as decode_token
    would hand it over, so a blocklist reading payload["jti"] does not fail."""
    app = host()
    manager: JWTManager = app.extensions["flask-jwt-extended"]
    payloads: list[dict[str, Any]] = []

    @manager.token_in_blocklist_loader
    def is_revoked(jwt_header: dict[str, Any], jwt_payload: dict[str, Any]) -> bool:
        payloads.append(jwt_payload)
        return jwt_payload["jti"] is not None and jwt_payload["jti"] == "revoked"

    bare = {k: v for k, v in claims(user_id).items() if k not in ("jti", "type", "fresh")}
    token = raw_token({"alg": "HS256", "typ": "JWT"}, bare, SECRET.encode())
    response = app.test_client().get(BASE, headers=bearer(token))
    assert response.status_code == 200, response.json
    assert payloads[-1]["jti"] is None
    assert payloads[-1]["type"] == "access"
    assert payloads[-1]["fresh"] is False
