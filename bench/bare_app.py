"""The HTTP floor: a bare Flask app doing only the work the library must do.

For ``GET /api/billing/credits`` and ``POST /api/billing/credits/charge`` it
verifies the same HS256 JWT with PyJWT, checks the scope, runs the baseline
SQL of :mod:`baseline` through psycopg 3 with a small pool, and answers the
same JSON with an ``X-Request-Id``. No SQLAlchemy, no pydantic, no
``callora_credits``. Served by gunicorn with ``bare_app:create_app()``.

- ``BENCH_PG_DSN``: libpq connection string
- ``BENCH_JWT_SECRET``: the HS256 key tokens are signed with
- ``BENCH_POOL_SIZE``: connections per process (default 4)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from typing import Any

import baseline
import jwt
import psycopg
from flask import Flask, Response, request

SERVICE_SCOPES = {"credits:charge", "credits:admin"}
AMOUNT = re.compile(r"([0-9]+)(?:\.([0-9]{1,7}))?", re.ASCII)


def _error(status: int, code: str, message: str, rid: str) -> Response:
    body = {"code": code, "message": message, "requestId": rid, "details": []}
    return _json(baseline.dumps(body), status, rid)


def _json(body: bytes, status: int, rid: str) -> Response:
    response = Response(body, status=status, mimetype="application/json")
    response.headers["X-Request-Id"] = rid
    return response


def _claims(secret: str) -> dict[str, Any] | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError:
        return None
    if claims.get("type") == "refresh" or not isinstance(claims.get("sub"), str):
        return None
    return claims


def _units(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    match = AMOUNT.fullmatch(text)
    if match is None:
        return None
    whole, fraction = match.group(1), match.group(2) or ""
    units = int(whole) * baseline.UNITS_PER_USDC + int(fraction.ljust(7, "0"))
    return units if units > 0 else None


def create_app() -> Flask:
    secret = os.environ["BENCH_JWT_SECRET"]
    pool = baseline.SmallPool(
        os.environ["BENCH_PG_DSN"], int(os.environ.get("BENCH_POOL_SIZE", "4"))
    )
    app = Flask("callora_bench_bare")

    @app.get("/api/billing/credits")
    def balance() -> Response:
        rid = "req_" + secrets.token_hex(12)
        claims = _claims(secret)
        if claims is None:
            return _error(401, "UNAUTHORIZED", "Authentication required", rid)
        with pool.connection() as conn:
            payload = baseline.balance_json(baseline.read_balance_row(conn, claims["sub"]))
        return _json(baseline.dumps(payload), 200, rid)

    @app.post("/api/billing/credits/charge")
    def charge() -> Response:
        rid = "req_" + secrets.token_hex(12)
        claims = _claims(secret)
        if claims is None:
            return _error(401, "UNAUTHORIZED", "Authentication required", rid)
        if not SERVICE_SCOPES & set(str(claims.get("scope", "")).split()):
            return _error(403, "FORBIDDEN", "Missing scope", rid)
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            return _error(400, "IDEMPOTENCY_KEY_REQUIRED", "Idempotency-Key required", rid)
        try:
            data = json.loads(request.get_data())
        except ValueError:
            data = None
        units = _units(data.get("amount_usdc")) if isinstance(data, dict) else None
        if units is None or not isinstance(data.get("user_id"), str):
            return _error(400, "VALIDATION_ERROR", "Request validation failed", rid)
        with pool.connection() as conn:
            try:
                _, body = baseline.charge(
                    conn,
                    data["user_id"],
                    units,
                    actor_id=claims["sub"],
                    method="POST",
                    path=request.path,
                    key=key,
                    request_fingerprint=baseline.fingerprint(data),
                )
            except baseline.InsufficientCredits:
                return _error(402, "INSUFFICIENT_CREDITS", "Insufficient credits", rid)
            except psycopg.errors.UniqueViolation:
                # A replay: answer the stored response.
                scope = "\x00".join((claims["sub"], "POST", request.path, key))
                row = conn.execute(
                    "SELECT status_code, response_body FROM credits_idempotency "
                    "WHERE key_hash = %s",
                    (hashlib.sha256(scope.encode()).hexdigest(),),
                ).fetchone()
                conn.rollback()
                if row is None:
                    return _error(409, "IDEMPOTENCY_IN_PROGRESS", "Retry later", rid)
                return _json(row[1].encode(), row[0], rid)
        return _json(body, 201, rid)

    return app
