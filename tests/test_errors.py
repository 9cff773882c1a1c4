"""Error bodies, request ids, routing errors, a lost database, the OpenAPI document."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from conftest import assert_error, make_app, make_token
from flask import Flask
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

BASE = "/api/billing/credits"
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}


def bearer(user: str, **kwargs: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user, **kwargs)}"}


# --- validation of the query string -----------------------------------------------


def test_unknown_query_key(client, user_id):
    response = client.get(f"{BASE}?bogus=1", headers=bearer(user_id))
    body = assert_error(response, 400, "VALIDATION_ERROR")
    assert body["details"][0]["field"] == "bogus"


def test_repeated_query_key(client, user_id):
    response = client.get(f"{BASE}?user_id={user_id}&user_id={user_id}", headers=bearer(user_id))
    body = assert_error(response, 400, "VALIDATION_ERROR")
    assert body["details"][0]["field"] == "user_id"


# --- one shape for every error -------------------------------------------------------

CASES = {
    "400": ("GET", f"{BASE}?bogus=1", "user", 400, "VALIDATION_ERROR"),
    "401": ("GET", BASE, None, 401, "UNAUTHORIZED"),
    "401-token": ("GET", BASE, "expired", 401, "TOKEN_EXPIRED"),
    "403": ("GET", f"{BASE}?user_id=someone_else", "user", 403, "FORBIDDEN"),
    "404": ("GET", f"{BASE}/no/such/thing", "user", 404, "NOT_FOUND"),
    "405": ("DELETE", BASE, "user", 405, "METHOD_NOT_ALLOWED"),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_every_error_has_the_same_shape(client, user_id, case):
    method, path, who, status, code = case
    headers: dict[str, str] = {}
    if who == "user":
        headers = bearer(user_id)
    elif who == "expired":
        headers = bearer(user_id, expires_in=timedelta(seconds=-30))
    response = client.open(path, method=method, headers=headers)
    assert_error(response, status, code)


# --- request ids ----------------------------------------------------------------------


def test_request_id_echoed_on_success_and_error(client, user_id):
    ok = client.get(BASE, headers={**bearer(user_id), "X-Request-Id": "trace-abc-123"})
    assert ok.status_code == 200
    assert ok.headers["X-Request-Id"] == "trace-abc-123"
    error = client.get(BASE, headers={"X-Request-Id": "trace-def-456"})
    body = assert_error(error, 401, "UNAUTHORIZED")
    assert body["requestId"] == "trace-def-456"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("abc\x01def\x7fghi", "abcdefghi"),
        ("\x1b[31mred\x1b[0m", "[31mred[0m"),
        ("  padded  ", "padded"),
        ("r" * 200, "r" * 128),
        ("x" * 128, "x" * 128),
    ],
    ids=["control", "escape", "padded", "too-long", "exactly-128"],
)
def test_request_id_is_sanitized(client, user_id, raw, expected):
    ok = client.get(BASE, headers={**bearer(user_id), "X-Request-Id": raw})
    assert ok.status_code == 200
    assert ok.headers["X-Request-Id"] == expected
    error = client.get(BASE, headers={"X-Request-Id": raw})
    assert assert_error(error, 401, "UNAUTHORIZED")["requestId"] == expected


@pytest.mark.parametrize("raw", [None, "", "\x01\x02\x03", "   "], ids=repr)
def test_request_id_is_generated(client, user_id, raw):
    headers = {} if raw is None else {"X-Request-Id": raw}
    first = client.get(BASE, headers={**bearer(user_id), **headers})
    second = client.get(BASE, headers=headers)
    generated = re.compile(r"^req_[0-9a-f]{24}$")
    assert generated.match(first.headers["X-Request-Id"])
    body = assert_error(second, 401, "UNAUTHORIZED")
    assert generated.match(body["requestId"])
    assert first.headers["X-Request-Id"] != body["requestId"]


# --- routing errors under /credits, and the host's own pages ---------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"{BASE}/nope",
        f"{BASE}/",
        f"{BASE}/holds/",
        f"{BASE}/holds/hold_1/nope",
        f"{BASE}/transactions/a/b/c",
        f"{BASE}/topup/extra",
    ],
)
def test_unknown_paths_are_json_404(client, user_id, path):
    response = client.get(path, headers={**bearer(user_id), "X-Request-Id": "rid-404"})
    body = assert_error(response, 404, "NOT_FOUND")
    assert body["requestId"] == "rid-404"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", BASE, {"GET", "HEAD"}),
        ("POST", BASE, {"GET", "HEAD"}),
        ("PUT", f"{BASE}/topup", {"POST"}),
        ("GET", f"{BASE}/charge", {"POST"}),
        ("PATCH", f"{BASE}/holds", {"GET", "HEAD", "POST"}),
        ("POST", f"{BASE}/holds/hold_1", {"GET", "HEAD"}),
        ("GET", f"{BASE}/transactions/ctx_1/refund", {"POST"}),
    ],
)
def test_wrong_method_is_json_405(client, user_id, method, path, allowed):
    response = client.open(path, method=method, headers=bearer(user_id))
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed


def test_host_pages_are_untouched(app, client):
    @app.get("/host/ping")
    def ping() -> str:
        return "pong"

    missing = client.get("/nope")
    assert missing.status_code == 404
    assert missing.mimetype == "text/html"
    assert "X-Request-Id" not in missing.headers
    outside = client.get("/api/billing/nope")
    assert outside.status_code == 404
    assert outside.mimetype == "text/html"
    ok = client.get("/host/ping")
    assert (ok.status_code, ok.get_data(as_text=True)) == (200, "pong")
    assert "X-Request-Id" not in ok.headers


# --- a lost database ---------------------------------------------------------------------


# A small retry budget, so an outage is answered in well under a second.
QUICK_RETRIES = {"CREDITS_DB_RETRIES": 3, "CREDITS_DB_RETRY_SECONDS": 0.3}


@contextmanager
def app_losing_its_database(databases: Any, engine_name: str) -> Iterator[tuple[Flask, Any]]:
    """An app whose database can be made unreachable; yields (app, proxy)."""
    if engine_name == "sqlite":
        folder = f"/nonexistent-{uuid.uuid4().hex}"
        assert not os.path.exists(folder)
        app = make_app(f"sqlite:///{folder}/credits.db", **QUICK_RETRIES)
        try:
            yield app, None
        finally:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()
        return
    url = make_url(databases.url(engine_name))
    with TcpProxy(url.host or "127.0.0.1", url.port or DEFAULT_PORTS[engine_name]) as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port)
        app = make_app(proxied.render_as_string(hide_password=False), **QUICK_RETRIES)
        try:
            yield app, proxy
        finally:
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()


FORBIDDEN_IN_ERRORS = [
    "select",
    "insert",
    "credits",
    "sqlalchemy",
    "operationalerror",
    "psycopg",
    "pymysql",
    "mysql",
    "mariadb",
    "postgres",
    "sqlite",
    "traceback",
    "127.0.0.1",
    "connection",
]


def test_database_down_is_a_clean_503(databases, engine_name, user_id, caplog):
    with app_losing_its_database(databases, engine_name) as (app, proxy):
        client = app.test_client()
        if proxy is not None:
            before = client.get(BASE, headers=bearer(user_id))
            assert before.status_code == 200, before.json
            assert proxy.connections >= 1
            proxy.cut()
        request_id = f"rid-{uuid.uuid4().hex}"
        with caplog.at_level(logging.WARNING, logger="callora_credits"):
            response = client.get(BASE, headers={**bearer(user_id), "X-Request-Id": request_id})
        body = assert_error(response, 503, "SERVICE_UNAVAILABLE")
        assert response.headers["Retry-After"] == "1"
        assert body["requestId"] == request_id
        assert body["details"] == []
        text = response.get_data(as_text=True).lower()
        leaked = [word for word in FORBIDDEN_IN_ERRORS if word in text]
        assert not leaked, text
        if proxy is not None:
            assert str(proxy.port) not in text
        # The detail goes to the log, with the request id.
        records = [
            r
            for r in caplog.records
            if r.name == "callora_credits" and getattr(r, "request_id", None) == request_id
        ]
        assert records, caplog.records
        assert any(r.levelno == logging.WARNING and r.exc_info for r in records)
        assert not any(r.levelno >= logging.ERROR for r in records)


def test_a_database_error_that_is_not_transient_is_a_clean_500(host, tmp_path, user_id, caplog):
    """A database without the credits tables: not an outage, so a 500."""
    app = host(f"sqlite:///{tmp_path / 'no-tables.sqlite3'}", **QUICK_RETRIES)
    request_id = f"rid-{uuid.uuid4().hex}"
    with caplog.at_level(logging.ERROR, logger="callora_credits"):
        response = app.test_client().get(
            BASE, headers={**bearer(user_id), "X-Request-Id": request_id}
        )
    body = assert_error(response, 500, "INTERNAL_SERVER_ERROR")
    assert body == {
        "code": "INTERNAL_SERVER_ERROR",
        "message": "Internal server error",
        "requestId": request_id,
        "details": [],
    }
    assert "Retry-After" not in response.headers
    text = response.get_data(as_text=True).lower()
    leaked = [word for word in FORBIDDEN_IN_ERRORS if word in text]
    assert not leaked, text
    assert any(
        r.levelno >= logging.ERROR and r.exc_info and getattr(r, "request_id", None) == request_id
        for r in caplog.records
    )


# --- the OpenAPI document -----------------------------------------------------------------


def _blueprint_routes(app: Flask) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("credits.") or rule.endpoint == "credits.routing_error":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in {"HEAD", "OPTIONS"}:
                routes.add((path, method.lower()))
    return routes


def test_openapi_document_lists_every_route(client, app):
    response = client.get("/api/billing/openapi.json")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    doc = response.json
    assert doc["openapi"] == "3.1.0"
    routes = _blueprint_routes(app)
    assert ("/api/billing/credits", "get") in routes
    assert ("/api/billing/credits/holds/{hold_id}/capture", "post") in routes
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert routes <= documented, routes - documented
    assert documented == routes
    for path, method in routes:
        responses = doc["paths"][path][method]["responses"]
        assert "500" in responses, (path, method)
        # Every route but the document itself reads or writes the database.
        if path.endswith("/openapi.json"):
            assert "503" not in responses
        else:
            assert responses["503"]["headers"]["Retry-After"]["schema"]["minimum"] == 1


def test_openapi_document_is_valid(client):
    validator = pytest.importorskip("openapi_spec_validator")
    doc = client.get("/api/billing/openapi.json").json
    validator.validate(doc)
