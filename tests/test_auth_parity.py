"""GET /credits accepts a token exactly when the host's own ``@jwt_required()`` does.

Each group below is one host configuration; each case a request sent both to a
host route decorated with ``@jwt_required()`` and to ``GET /credits``. Both
must accept or both refuse, and the credits route must answer with the code
of its refusal table. The host registers its own error callbacks (answering
418), so a refusal that leaked to Flask-JWT-Extended would show.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import flask_jwt_extended.exceptions as fje
import jwt
import pytest
import sqlalchemy as sa
from conftest import SECRET, assert_error
from flask import Flask
from flask_jwt_extended import JWTManager, get_jwt_identity, jwt_required

from callora_credits.db.models import Account
from callora_credits.http.auth import REFUSALS

BASE = "/api/billing/credits"
HOST_ROUTE = "/host/protected"
OTHER_SECRET = "another-secret-key-that-is-long-enough-for-hs256"
AUDIENCE = "credits-api"
ISSUER = "https://auth.example.com"
TENANT_KEYS = {"tenant-a": "tenant-a-secret-key-long-enough-for-hs256"}
REVOKED_JTI = "revoked-jti"

Headers = list[tuple[str, str]]


# --- tokens ----------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT PyJWT would refuse to sign: ``alg: none``, HMAC over a public key."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    signature = (
        b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{_b64(signature)}"


def claims(user: Any, *, identity_claim: str = "sub", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        identity_claim: user,
        "iat": now,
        "nbf": now,
        "exp": now + 900,
        "jti": uuid.uuid4().hex,
        "type": "access",
        "fresh": False,
        **extra,
    }


def hs256(user: Any, secret: str = SECRET, **extra: Any) -> str:
    return jwt.encode(claims(user, **extra), secret, algorithm="HS256")


# --- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request: ``headers(user)`` builds it; ``code`` is None when accepted."""

    name: str
    headers: Callable[[str], Headers]
    code: str | None


@dataclass
class Group:
    """One host configuration and the requests tried against it."""

    settings: dict[str, Any]
    cases: list[Case]
    setup: Callable[[JWTManager], None] = field(default=lambda manager: None)


def auth(value: str) -> Headers:
    return [("Authorization", value)]


def header_forms() -> list[Case]:
    """The same valid token sent in a dozen shapes of the default header."""

    def form(name: str, template: str, code: str | None) -> Case:
        return Case(name, lambda user: auth(template.format(t=hs256(user))), code)

    def two_headers(user: str) -> Headers:
        return [("Authorization", f"Bearer {hs256(user)}")] * 2

    return [
        form("Bearer", "Bearer {t}", None),
        form("scheme lower case", "bearer {t}", "INVALID_AUTH_HEADER"),
        form("scheme upper case", "BEARER {t}", "INVALID_AUTH_HEADER"),
        form("extra spaces", "Bearer     {t}", None),
        form("surrounding spaces", "   Bearer {t}   ", None),
        form("tab", "Bearer\t{t}", None),
        form("another scheme first", "Basic dXNlcjpwYXNz, Bearer {t}", None),
        form("another scheme after", "Bearer {t}, Basic dXNlcjpwYXNz", None),
        form("trailing comma", "Bearer {t},", None),
        form("token then a bare value", "Bearer {t},{t}", None),
        form("two tokens", "Bearer {t} {t}", "INVALID_AUTH_HEADER"),
        form("two Bearer fields", "Bearer {t}, Bearer {t}", "INVALID_AUTH_HEADER"),
        Case("two headers", two_headers, "INVALID_AUTH_HEADER"),
        form("other scheme", "Token {t}", "INVALID_AUTH_HEADER"),
        form("Basic only", "Basic dXNlcjpwYXNz", "INVALID_AUTH_HEADER"),
        form("no space after scheme", "Bearer{t}", "INVALID_AUTH_HEADER"),
        form("token without scheme", "{t}", "INVALID_AUTH_HEADER"),
        form("scheme alone", "Bearer", "MISSING_TOKEN"),
        form("scheme and spaces", "Bearer   ", "MISSING_TOKEN"),
        form("scheme alone after another", "Basic dXNlcjpwYXNz, Bearer", "MISSING_TOKEN"),
        form("empty value", "", "MISSING_TOKEN"),
        form("blank value", "   ", "MISSING_TOKEN"),
        form("trailing garbage", "Bearer {t}x", "INVALID_TOKEN"),
        form("trailing semicolon", "Bearer {t};", "INVALID_TOKEN"),
        form("scheme twice", "Bearer Bearer", "INVALID_TOKEN"),
        Case("no header", lambda user: [], "UNAUTHORIZED"),
    ]


def token_cases() -> list[Case]:
    """What the token itself says, under the default settings."""

    def bearer(build: Callable[[str], str], name: str, code: str | None) -> Case:
        return Case(name, lambda user: auth(f"Bearer {build(user)}"), code)

    def tampered(user: str) -> str:
        head, payload, signature = hs256(user).split(".")
        return f"{head}.{payload}.{signature[:-4]}AAAA"

    now = int(time.time())
    return [
        bearer(lambda user: hs256(user), "valid", None),
        bearer(lambda user: hs256(user, OTHER_SECRET), "forged", "INVALID_TOKEN"),
        bearer(tampered, "tampered signature", "INVALID_TOKEN"),
        bearer(
            lambda user: hand_built({"alg": "none", "typ": "JWT"}, claims(user), None),
            "alg none",
            "INVALID_TOKEN",
        ),
        bearer(lambda user: hs256(user, exp=now - 30), "expired", "TOKEN_EXPIRED"),
        bearer(lambda user: hs256(user, nbf=now + 3600), "nbf in the future", "TOKEN_NOT_ACTIVE"),
        bearer(lambda user: hs256(user, type="refresh"), "refresh token", "INVALID_TOKEN"),
        bearer(
            lambda user: jwt.encode(
                {k: v for k, v in claims(user).items() if k != "sub"}, SECRET, algorithm="HS256"
            ),
            "no identity claim",
            "MISSING_CLAIMS",
        ),
        bearer(lambda user: hs256(42), "identity not a string", "MISSING_CLAIMS"),
        bearer(
            lambda user: jwt.encode(
                {k: v for k, v in claims(user).items() if k not in ("jti", "type", "fresh")},
                SECRET,
                algorithm="HS256",
            ),
            "no jti, type or fresh",
            None,
        ),
        bearer(lambda user: "a.b.c", "malformed", "INVALID_TOKEN"),
        bearer(
            lambda user: ".".join((_b64(b'{"alg":"HS256"}'), _b64(b"[1]"), _b64(b"x"))),
            "payload not an object",
            "INVALID_TOKEN",
        ),
        # Without JWT_DECODE_AUDIENCE, Flask-JWT-Extended does not check `aud`.
        bearer(lambda user: hs256(user, aud="someone"), "audience not asked for", None),
    ]


def groups(rsa_keys: tuple[str, str]) -> dict[str, Group]:
    private_pem, public_pem = rsa_keys
    now = int(time.time())

    def with_header(name: str, value: Callable[[str], str], code: str | None) -> Case:
        return Case(name, lambda user: [("X-Api-Token", value(user))], code)

    def bare(name: str, template: str, code: str | None) -> Case:
        return Case(name, lambda user: auth(template.format(t=hs256(user))), code)

    def token(name: str, build: Callable[[str], str], code: str | None) -> Case:
        return Case(name, lambda user: auth(f"Bearer {build(user)}"), code)

    def blocklist(manager: JWTManager) -> None:
        manager.token_in_blocklist_loader(lambda header, payload: payload["jti"] == REVOKED_JTI)

    def key_per_tenant(manager: JWTManager) -> None:
        manager.decode_key_loader(
            lambda header, payload: TENANT_KEYS.get(payload.get("iss", ""), OTHER_SECRET)
        )

    def paid_plans_only(manager: JWTManager) -> None:
        manager.token_verification_loader(lambda header, payload: payload.get("plan") == "paid")

    def known_users_only(manager: JWTManager) -> None:
        manager.user_lookup_loader(
            lambda header, payload: None if payload["sub"].startswith("ghost") else {"id": 1}
        )

    return {
        "header forms": Group({}, header_forms()),
        "tokens": Group({}, token_cases()),
        "custom header name and type": Group(
            {"JWT_HEADER_NAME": "X-Api-Token", "JWT_HEADER_TYPE": "JWT"},
            [
                with_header("JWT scheme", lambda user: f"JWT {hs256(user)}", None),
                with_header(
                    "Bearer scheme", lambda user: f"Bearer {hs256(user)}", "INVALID_AUTH_HEADER"
                ),
                with_header(
                    "scheme lower case", lambda user: f"jwt {hs256(user)}", "INVALID_AUTH_HEADER"
                ),
                with_header("scheme alone", lambda user: "JWT", "MISSING_TOKEN"),
                with_header(
                    "two tokens", lambda user: f"JWT {hs256(user)} x", "INVALID_AUTH_HEADER"
                ),
                Case("default header", lambda user: auth(f"Bearer {hs256(user)}"), "UNAUTHORIZED"),
            ],
        ),
        "empty header type": Group(
            {"JWT_HEADER_TYPE": ""},
            [
                bare("bare token", "{t}", None),
                bare("surrounding spaces", "  {t}  ", None),
                bare("trailing comma", "{t},", None),
                bare("with a scheme", "Bearer {t}", "INVALID_AUTH_HEADER"),
                bare("two tokens", "{t} {t}", "INVALID_AUTH_HEADER"),
                bare("empty value", "", "MISSING_TOKEN"),
            ],
        ),
        "RS256 keys": Group(
            {
                "JWT_ALGORITHM": "RS256",
                "JWT_PRIVATE_KEY": private_pem,
                "JWT_PUBLIC_KEY": public_pem,
            },
            [
                token(
                    "RS256",
                    lambda user: jwt.encode(claims(user), private_pem, algorithm="RS256"),
                    None,
                ),
                token(
                    "HS256 over the public key",
                    lambda user: hand_built({"alg": "HS256"}, claims(user), public_pem.encode()),
                    "INVALID_TOKEN",
                ),
                token("HS256 with the app secret", lambda user: hs256(user), "INVALID_TOKEN"),
                token(
                    "alg none",
                    lambda user: hand_built({"alg": "none"}, claims(user), None),
                    "INVALID_TOKEN",
                ),
            ],
        ),
        "audience": Group(
            {"JWT_DECODE_AUDIENCE": AUDIENCE},
            [
                token("expected", lambda user: hs256(user, aud=AUDIENCE), None),
                token("in a list", lambda user: hs256(user, aud=["other", AUDIENCE]), None),
                token("wrong", lambda user: hs256(user, aud="other-api"), "INVALID_TOKEN"),
                token("missing", lambda user: hs256(user), "INVALID_TOKEN"),
            ],
        ),
        "issuer": Group(
            {"JWT_DECODE_ISSUER": ISSUER},
            [
                token("expected", lambda user: hs256(user, iss=ISSUER), None),
                token(
                    "wrong", lambda user: hs256(user, iss="https://evil.example"), "INVALID_TOKEN"
                ),
                token("missing", lambda user: hs256(user), "INVALID_TOKEN"),
            ],
        ),
        "identity claim": Group(
            {"JWT_IDENTITY_CLAIM": "uid"},
            [
                token("in uid", lambda user: hs256(user, identity_claim="uid"), None),
                token("in sub only", lambda user: hs256(user), "MISSING_CLAIMS"),
            ],
        ),
        "leeway": Group(
            {"JWT_DECODE_LEEWAY": 120},
            [
                token("expired within leeway", lambda user: hs256(user, exp=now - 30), None),
                token("expired beyond", lambda user: hs256(user, exp=now - 600), "TOKEN_EXPIRED"),
                token("nbf within leeway", lambda user: hs256(user, nbf=now + 60), None),
                token("nbf beyond", lambda user: hs256(user, nbf=now + 600), "TOKEN_NOT_ACTIVE"),
            ],
        ),
        "blocklist loader": Group(
            {},
            [
                token("not revoked", lambda user: hs256(user), None),
                token("revoked", lambda user: hs256(user, jti=REVOKED_JTI), "INVALID_TOKEN"),
            ],
            blocklist,
        ),
        "decode key loader": Group(
            {},
            [
                token(
                    "tenant key",
                    lambda user: hs256(user, TENANT_KEYS["tenant-a"], iss="tenant-a"),
                    None,
                ),
                token(
                    "app secret, unknown tenant",
                    lambda user: hs256(user, iss="tenant-b"),
                    "INVALID_TOKEN",
                ),
                token(
                    "app secret, no tenant",
                    lambda user: hs256(user),
                    "INVALID_TOKEN",
                ),
            ],
            key_per_tenant,
        ),
        "token verification loader": Group(
            {},
            [
                token("passes", lambda user: hs256(user, plan="paid"), None),
                token("fails", lambda user: hs256(user, plan="free"), "INVALID_TOKEN"),
            ],
            paid_plans_only,
        ),
        "user lookup loader": Group(
            {},
            [
                token("known user", lambda user: hs256(user), None),
                token("unknown user", lambda user: hs256(f"ghost_{user}"), "INVALID_TOKEN"),
            ],
            known_users_only,
        ),
    }


GROUP_NAMES = list(groups(("", "")))


# --- the host ----------------------------------------------------------------------------


def host_with_route(build: Callable[..., Flask], group: Group) -> Flask:
    app = build(**group.settings)
    manager: JWTManager = app.extensions["flask-jwt-extended"]
    group.setup(manager)

    def answer(*_: Any) -> tuple[dict[str, str], int]:
        return {"answered_by": "host"}, 418

    for loader in (
        manager.expired_token_loader,
        manager.invalid_token_loader,
        manager.unauthorized_loader,
        manager.revoked_token_loader,
        manager.token_verification_failed_loader,
        manager.user_lookup_error_loader,
    ):
        loader(answer)

    @app.get(HOST_ROUTE)
    @jwt_required()
    def protected() -> dict[str, Any]:
        return {"identity": get_jwt_identity()}

    return app


def account_count(app: Flask, user_ids: list[str]) -> int:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        table = Account.__table__
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.user_id.in_(user_ids))
                ).scalar_one()
            )


@pytest.mark.parametrize("group_name", GROUP_NAMES)
def test_credits_and_host_routes_agree(host, rsa_keys, group_name):
    group = groups(rsa_keys)[group_name]
    app = host_with_route(host, group)
    client = app.test_client()
    disagreements: list[str] = []
    refused_users: list[str] = []
    for case in group.cases:
        user = f"user_{uuid.uuid4().hex[:12]}"
        headers = case.headers(user)
        theirs = client.get(HOST_ROUTE, headers=headers)
        ours = client.get(BASE, headers=headers)
        host_accepts = theirs.status_code == 200
        if host_accepts != (case.code is None):
            disagreements.append(f"{case.name}: the host route answered {theirs.status_code}")
        if case.code is None:
            if ours.status_code != 200 or ours.json["user_id"] != user:
                disagreements.append(f"{case.name}: credits answered {ours.json}")
            elif theirs.json["identity"] != user:
                disagreements.append(f"{case.name}: the host saw {theirs.json}")
            continue
        refused_users.append(user)
        if (ours.status_code, (ours.json or {}).get("code")) != (401, case.code):
            disagreements.append(f"{case.name}: credits answered {ours.status_code} {ours.json}")
            continue
        assert_error(ours, 401, case.code)
    assert disagreements == []
    # A refused request creates no account.
    assert account_count(app, refused_users) == 0


# --- where the credits routes are deliberately stricter -----------------------------------


@pytest.mark.parametrize(
    ("settings", "identity_claim", "identity"),
    [
        ({"JWT_IDENTITY_CLAIM": "uid"}, "uid", 42),
        ({}, "sub", ""),
        ({}, "sub", "   "),
        ({}, "sub", "u" * 129),
        ({}, "sub", "user\x00x"),
    ],
    ids=["uid-int", "empty", "blank", "129-chars", "nul"],
)
def test_identity_rule_is_stricter_than_the_host(host, settings, identity_claim, identity):
    """A token the host accepts, carrying an identity that is not 1-128
    printable characters, is MISSING_CLAIMS on the credits routes."""
    app = host_with_route(host, Group(settings, []))
    client = app.test_client()
    token = hs256(identity, identity_claim=identity_claim)
    headers = auth(f"Bearer {token}")
    assert client.get(HOST_ROUTE, headers=headers).status_code == 200
    assert_error(client.get(BASE, headers=headers), 401, "MISSING_CLAIMS")


def test_only_header_tokens_even_when_the_host_reads_cookies(host, user_id):
    app = host_with_route(
        host, Group({"JWT_TOKEN_LOCATION": ["headers", "cookies", "query_string"]}, [])
    )
    client = app.test_client()
    token = hs256(user_id)
    header_ok = client.get(BASE, headers=auth(f"Bearer {token}"))
    assert (header_ok.status_code, header_ok.json["user_id"]) == (200, user_id)
    client.set_cookie("access_token_cookie", token)
    assert client.get(HOST_ROUTE).status_code == 200
    assert_error(client.get(BASE), 401, "UNAUTHORIZED")
    # Beside a header the credits routes refuse, the cookie still does not count.
    other_scheme = auth("Basic dXNlcjpwYXNz")
    assert client.get(HOST_ROUTE, headers=other_scheme).status_code == 200
    assert_error(client.get(BASE, headers=other_scheme), 401, "INVALID_AUTH_HEADER")
    client.delete_cookie("access_token_cookie")
    assert client.get(f"{HOST_ROUTE}?jwt={token}").status_code == 200
    assert_error(client.get(f"{BASE}?jwt={token}"), 401, "UNAUTHORIZED")
    query_and_header = client.get(f"{BASE}?jwt={token}", headers=other_scheme)
    assert_error(query_and_header, 401, "INVALID_AUTH_HEADER")


# --- the refusal table itself ---------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (fje.NoAuthorizationError("Missing Authorization Header"), "INVALID_AUTH_HEADER"),
        (fje.InvalidHeaderError("Bad Authorization header"), "INVALID_AUTH_HEADER"),
        (jwt.ExpiredSignatureError(), "TOKEN_EXPIRED"),
        (jwt.ImmatureSignatureError(), "TOKEN_NOT_ACTIVE"),
        (jwt.exceptions.InvalidSubjectError(), "MISSING_CLAIMS"),
        (fje.JWTDecodeError("Missing claim: sub"), "MISSING_CLAIMS"),
        (fje.WrongTokenError("Only non-refresh tokens are allowed"), "INVALID_TOKEN"),
        (fje.RevokedTokenError({}, {}), "INVALID_TOKEN"),
        (
            fje.UserClaimsVerificationError("User claims verification failed", {}, {}),
            "INVALID_TOKEN",
        ),
        (fje.UserLookupError("user_lookup returned None", {}, {}), "INVALID_TOKEN"),
        (jwt.InvalidSignatureError(), "INVALID_TOKEN"),
        (jwt.InvalidAlgorithmError(), "INVALID_TOKEN"),
        (jwt.DecodeError(), "INVALID_TOKEN"),
        (jwt.InvalidAudienceError(), "INVALID_TOKEN"),
        (jwt.InvalidIssuerError(), "INVALID_TOKEN"),
        (jwt.InvalidIssuedAtError(), "INVALID_TOKEN"),
        (jwt.MissingRequiredClaimError("exp"), "INVALID_TOKEN"),
        (jwt.InvalidKeyError(), "INVALID_TOKEN"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value,
)
def test_refusal_table(error, code):
    """Each exception Flask-JWT-Extended or PyJWT raises while verifying has
    one code: the first row of the table whose class it is."""
    assert next(row[1] for row in REFUSALS if isinstance(error, row[0])) == code
