"""Hostile input: what a careless or malicious client can send, on every engine.

Bodies that are not JSON, absurdly deep or too large (and never read whole);
Idempotency-Key and X-Request-Id headers with control characters or 10 KB of
text; user ids made of quotes, SQL, LIKE wildcards, unicode, NUL or 10 KB;
metadata at and past its limits; duplicate JSON keys; unknown query keys.
Whatever arrives, the answer is a 2xx or a 4xx in the library's error shape,
never a 500, and a refused request changes nothing.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ADMIN_SCOPE, SERVICE_SCOPE, assert_error, make_token
from flask import Flask, request
from werkzeug.serving import DechunkedInput

from callora_credits.db.models import Account, IdempotencyRecord, LedgerEntry

BASE = "/api/billing/credits"
TEN_KB = 10 * 1024
TEN_MB = 10 * 1024 * 1024


# --- helpers -------------------------------------------------------------------


def key() -> dict[str, str]:
    return {"Idempotency-Key": uuid.uuid4().hex}


def suffix() -> str:
    return uuid.uuid4().hex[:10]


def count(app: Flask, table: sa.Table, **where: str) -> int:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        stmt = sa.select(sa.func.count()).select_from(table)
        for column, value in where.items():
            stmt = stmt.where(table.c[column] == value)
        with engine.connect() as conn:
            return int(conn.execute(stmt).scalar_one())


def untouched(app: Flask, user_id: str, actor: str) -> bool:
    """No account, no entry for ``user_id`` and no idempotency record by ``actor``."""
    return (
        count(app, Account.__table__, user_id=user_id) == 0
        and count(app, LedgerEntry.__table__, user_id=user_id) == 0
        and count(app, IdempotencyRecord.__table__, actor_id=actor) == 0
    )


class CountingStream(io.BytesIO):
    """A request body that records how many bytes the application read."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.consumed = 0

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        self.consumed += len(chunk)
        return chunk

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        self.consumed += n
        return n

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        self.consumed += len(line)
        return line


def chunked(body: bytes, size: int) -> bytes:
    """``body`` in HTTP/1.1 chunked framing."""
    out = bytearray()
    for start in range(0, len(body), size):
        piece = body[start : start + size]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


@pytest.fixture
def admin_id() -> str:
    return f"ops_{suffix()}"


@pytest.fixture
def admin(auth, admin_id) -> dict[str, str]:
    return auth(admin_id, scopes=f"{ADMIN_SCOPE} {SERVICE_SCOPE}")


def top_up(client, admin, user_id, amount="1", **extra):
    body = {"user_id": user_id, "amount_usdc": amount, **extra}
    return client.post(f"{BASE}/topup", json=body, headers={**admin, **key()})


# --- bodies that are not JSON objects ---------------------------------------------


NOT_JSON_OBJECTS = [
    (b"not json", "application/json"),
    (b"<topup><user_id>USER</user_id></topup>", "application/xml"),
    (b"user_id=USER&amount_usdc=1", "application/x-www-form-urlencoded"),
    (b'{"user_id": "USER", "amount_usdc": "1"', "application/json"),
    (b'{"user_id": "USER", "amount_usdc": "1"} {"x": 1}', "application/json"),
    (b'{"user_id": "USER", "amount_usdc": "1"}garbage', "application/json"),
    (b'{"user_id": "\xff\xfe", "amount_usdc": "1"}', "application/json"),
    (b"\x00\x01\x02\x03", "application/octet-stream"),
    (b"[]", "application/json"),
    (b'["USER", "1"]', "application/json"),
    (b'"USER"', "application/json"),
    (b"42", "application/json"),
    (b"null", "application/json"),
    (b"true", "application/json"),
    (b'{"user_id": "USER", "amount_usdc": NaN}', "application/json"),
    (b'{"user_id": "USER", "amount_usdc": Infinity}', "application/json"),
    (b'{"user_id": "USER", "amount_usdc": -Infinity}', "application/json"),
    (b'{"user_id": "USER", "amount_usdc": "1", "x": ' + b"9" * 5000 + b"}", "application/json"),
    (b"{'user_id': 'USER', 'amount_usdc': '1'}", "application/json"),
]


def test_bodies_that_are_not_json_objects_are_400(app, client, admin, admin_id, user_id):
    for raw, content_type in NOT_JSON_OBJECTS:
        response = client.post(
            f"{BASE}/topup",
            data=raw.replace(b"USER", user_id.encode()),
            headers={**admin, **key(), "Content-Type": content_type},
        )
        body = assert_error(response, 400, "VALIDATION_ERROR")
        assert body["details"], raw
    assert untouched(app, user_id, admin_id)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"user_id": "USER", "amount_usdc": "1", "metadata": {"k": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}}",
    ],
    ids=["arrays", "objects", "inside-metadata"],
)
def test_json_nested_100k_levels_deep_is_400(host, admin, admin_id, user_id, raw):
    # The limit is raised so the parser, not the size check, meets the nesting.
    app = host(CREDITS_MAX_BODY_BYTES=2_000_000)
    client = app.test_client()
    data = raw.replace(b"USER", user_id.encode())
    assert len(data) < 2_000_000
    response = client.post(
        f"{BASE}/topup", data=data, headers={**admin, **key(), "Content-Type": "application/json"}
    )
    assert_error(response, 400, "VALIDATION_ERROR")
    # With the default limit (64 KiB) the same body is simply too large.
    default = (
        host()
        .test_client()
        .post(
            f"{BASE}/topup",
            data=data,
            headers={**admin, **key(), "Content-Type": "application/json"},
        )
    )
    assert_error(default, 413, "PAYLOAD_TOO_LARGE")
    assert untouched(app, user_id, admin_id)


def test_moderately_deep_json_within_the_limit_is_400(app, client, admin, admin_id, user_id):
    for depth in (50, 500, 990, 5_000):
        nested = "[" * depth + "]" * depth
        raw = json.dumps({"user_id": user_id, "amount_usdc": "1"})[:-1]
        raw += f', "metadata": {{"k": {nested}}}}}'
        response = client.post(
            f"{BASE}/topup",
            data=raw,
            headers={**admin, **key(), "Content-Type": "application/json"},
        )
        assert_error(response, 400, "VALIDATION_ERROR")
    assert untouched(app, user_id, admin_id)


# --- body size ----------------------------------------------------------------------


def test_ten_megabyte_body_is_413_and_not_read(app, client, admin, admin_id, user_id):
    payload = json.dumps({"user_id": user_id, "amount_usdc": "1"}).encode()
    stream = CountingStream(payload + b" " * (TEN_MB - len(payload)))
    response = client.post(
        f"{BASE}/topup",
        input_stream=stream,
        headers={**admin, **key(), "Content-Type": "application/json"},
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    # Content-Length says 10 MB: refused before a single byte is read.
    assert stream.consumed <= 65_536 + 1
    assert untouched(app, user_id, admin_id)


def test_custom_body_limit_applies(host, admin, admin_id, user_id):
    app = host(CREDITS_MAX_BODY_BYTES=1000)
    client = app.test_client()
    payload = json.dumps({"user_id": user_id, "amount_usdc": "1"}).encode()
    headers = {"Content-Type": "application/json"}

    over = CountingStream(payload + b" " * (1001 - len(payload)))
    response = client.post(
        f"{BASE}/topup", input_stream=over, headers={**admin, **key(), **headers}
    )
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert "1000" in response.json["message"]
    assert over.consumed == 0
    assert untouched(app, user_id, admin_id)

    exact = payload + b" " * (1000 - len(payload))
    ok = client.post(f"{BASE}/topup", data=exact, headers={**admin, **key(), **headers})
    assert ok.status_code == 201, ok.json


def _chunked_post(client, admin, stream):
    """POST a body with no Content-Length, the way a server hands over a chunked one."""
    return client.post(
        f"{BASE}/topup",
        headers={**admin, **key(), "Content-Type": "application/json"},
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )


def _record_content_length(app: Flask) -> list[int | None]:
    seen: list[int | None] = []
    app.before_request(lambda: seen.append(request.content_length))
    return seen


def test_chunked_body_without_content_length_over_the_limit_is_413(host, admin, admin_id, user_id):
    app = host()
    seen = _record_content_length(app)
    client = app.test_client()
    payload = json.dumps({"user_id": user_id, "amount_usdc": "1"}).encode()
    body = payload + b" " * (TEN_MB - len(payload))

    # The raw stream a server sets ``wsgi.input_terminated`` for.
    stream = CountingStream(body)
    assert_error(_chunked_post(client, admin, stream), 413, "PAYLOAD_TOO_LARGE")
    assert stream.consumed <= 65_536 + 1

    # Werkzeug's own de-chunking reader over real chunked framing (8 KiB chunks).
    wire = CountingStream(chunked(body, 8192))
    response = _chunked_post(client, admin, DechunkedInput(wire))
    assert_error(response, 413, "PAYLOAD_TOO_LARGE")
    assert wire.consumed < 2 * 65_536

    assert seen == [None, None]  # no Content-Length reached the app
    assert untouched(app, user_id, admin_id)


def test_chunked_body_with_a_custom_limit(host, admin, admin_id, user_id):
    app = host(CREDITS_MAX_BODY_BYTES=1000)
    seen = _record_content_length(app)
    client = app.test_client()
    payload = json.dumps({"user_id": user_id, "amount_usdc": "1"}).encode()

    over = DechunkedInput(io.BytesIO(chunked(payload + b" " * (1001 - len(payload)), 100)))
    assert_error(_chunked_post(client, admin, over), 413, "PAYLOAD_TOO_LARGE")
    assert untouched(app, user_id, admin_id)

    # A body within the limit, in many small chunks, is read whole.
    within = DechunkedInput(io.BytesIO(chunked(payload + b" " * (1000 - len(payload)), 7)))
    ok = _chunked_post(client, admin, within)
    assert ok.status_code == 201, ok.json
    assert seen == [None, None]


# --- Idempotency-Key ----------------------------------------------------------------


BAD_KEYS = {
    "nul": "key\x00x",
    "control": "key\x01x",
    "del": "key\x7fx",
    "tab": "key\tx",
    "newline": "key\nx",
    "carriage-return": "key\rx",
    "escape": "key\x1b[31mx",
    # WSGI header values are latin-1 strings: non-ASCII arrives like this.
    "non-ascii": "ключ".encode().decode("latin-1"),
    "256-chars": "k" * 256,
    "10KB": "k" * TEN_KB,
}


@pytest.mark.parametrize("value", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_bad_idempotency_key_is_400_and_changes_nothing(
    app, client, admin, admin_id, user_id, value
):
    response = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": "1"},
        headers=admin,
        environ_overrides={"HTTP_IDEMPOTENCY_KEY": value},
    )
    body = assert_error(response, 400, "VALIDATION_ERROR")
    assert body["details"][0]["field"] == "Idempotency-Key"
    assert value not in response.get_data(as_text=True)
    assert untouched(app, user_id, admin_id)


def test_idempotency_key_limits(app, client, admin, user_id):
    for value in ("k" * 255, " ~!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}"):
        response = client.post(
            f"{BASE}/topup",
            json={"user_id": user_id, "amount_usdc": "1"},
            headers={**admin, "Idempotency-Key": value},
        )
        assert response.status_code == 201, response.json
    empty = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": "1"},
        headers={**admin, "Idempotency-Key": ""},
    )
    assert_error(empty, 400, "IDEMPOTENCY_KEY_REQUIRED")
    assert count(app, LedgerEntry.__table__, user_id=user_id) == 2


# --- X-Request-Id -------------------------------------------------------------------


def _request_ids(client, admin, user_id, value):
    """The echoed id on a success and on an error response."""
    environ = {"HTTP_X_REQUEST_ID": value}
    ok = client.get(BASE, headers=admin, environ_overrides=environ)
    assert ok.status_code == 200
    error = client.post(
        f"{BASE}/topup",
        json={"user_id": user_id, "amount_usdc": "-1"},
        headers={**admin, **key()},
        environ_overrides=environ,
    )
    assert_error(error, 400, "VALIDATION_ERROR")
    assert error.json["requestId"] == error.headers["X-Request-Id"]
    return ok.headers["X-Request-Id"], error.headers["X-Request-Id"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc\x00def", "abcdef"),
        ("\x01a\x02b\x7fc\x1b", "abc"),
        ("id-1\r\nSet-Cookie: session=stolen", "id-1Set-Cookie: session=stolen"),
        ("  padded\t ", "padded"),
        ("r" * TEN_KB, "r" * 128),
        ("\x00" * 10 + "x" * 200, "x" * 128),
        ("ok-id_123.456:789", "ok-id_123.456:789"),
    ],
    ids=["nul", "controls", "crlf", "trimmed", "10KB", "controls-then-long", "plain"],
)
def test_request_id_is_sanitized_and_echoed(client, admin, user_id, value, expected):
    for echoed in _request_ids(client, admin, user_id, value):
        assert echoed == expected
        assert len(echoed) <= 128
        assert all(ch.isprintable() for ch in echoed)


@pytest.mark.parametrize("value", ["", "\x00\x01\x02", "\r\n", " " * 50], ids=repr)
def test_unusable_request_id_gets_a_fresh_one(client, admin, user_id, value):
    first = _request_ids(client, admin, user_id, value)
    second = _request_ids(client, admin, user_id, value)
    for echoed in (*first, *second):
        assert echoed.startswith("req_")
        assert len(echoed) == 28
    assert len(set(first + second)) == 4


# --- user ids -----------------------------------------------------------------------


ODD_IDS = {
    "double-quote": 'say "hi"',
    "single-quote": "o'brien",
    "backslash": "back\\slash\\",
    "sql-or": "' OR 1=1 --",
    "sql-drop": "x'); DROP TABLE credits; --",
    "sql-comment": "a/**/b#c-- ",
    "percent": "100%",
    "underscore": "a_b",
    "like-all": "%_%",
    "unicode": "ünïcödé-ñ-用户-مستخدم",
    "emoji": "😀🔥💸",
    "html": "<script>alert(1)</script>",
    "template": "${jndi:ldap://x}{{7*7}}",
    "path": "../../etc/passwd",
    "inner-space": "first last",
    "leading-space": " leading",
    "json": '{"user_id": "admin"}',
}


@pytest.mark.parametrize("base", list(ODD_IDS.values()), ids=list(ODD_IDS))
def test_odd_user_ids_are_stored_literally(client, admin, auth, base):
    user = f"{base}~{suffix()}"
    assert len(user) <= 128
    entry = top_up(client, admin, user, "1.5")
    assert entry.status_code == 201, entry.json
    assert entry.json["user_id"] == user

    read = client.get(BASE, query_string={"user_id": user}, headers=admin)
    assert read.status_code == 200, read.json
    assert (read.json["user_id"], read.json["balance_usdc"]) == (user, "1.5000000")

    history = client.get(f"{BASE}/transactions", query_string={"user_id": user}, headers=admin)
    assert history.status_code == 200, history.json
    assert [e["id"] for e in history.json["data"]] == [entry.json["id"]]
    assert history.json["data"][0]["user_id"] == user

    # The same string as a token's subject is the same account.
    own = client.get(BASE, headers=auth(user))
    assert own.status_code == 200, own.json
    assert (own.json["user_id"], own.json["balance_usdc"]) == (user, "1.5000000")
    by_id = client.get(f"{BASE}/transactions/{entry.json['id']}", headers=auth(user))
    assert by_id.status_code == 200, by_id.json


def test_like_wildcards_and_case_match_nothing_else(client, admin):
    s = suffix()
    assert top_up(client, admin, f"_{s}", "1").status_code == 201
    assert top_up(client, admin, f"%{s}", "2").status_code == 201
    assert top_up(client, admin, f"Case{s}", "3").status_code == 201
    expected = {
        f"_{s}": "1.0000000",
        f"%{s}": "2.0000000",
        f"Case{s}": "3.0000000",
        f"a{s}": "0.0000000",
        f"x{s}": "0.0000000",
        f"case{s}": "0.0000000",
        f"CASE{s}": "0.0000000",
    }
    for user, balance in expected.items():
        read = client.get(BASE, query_string={"user_id": user}, headers=admin)
        assert (read.json["user_id"], read.json["balance_usdc"]) == (user, balance)


def test_trailing_space_is_another_user(request, engine_name, client, admin, auth):
    victim = f"victim_{suffix()}"
    assert top_up(client, admin, victim, "7").status_code == 201
    lookalike = victim + " "
    own = client.get(BASE, headers=auth(lookalike))
    assert own.status_code == 200, own.json
    assert (own.json["user_id"], own.json["balance_usdc"]) == (lookalike, "0.0000000")
    history = client.get(f"{BASE}/transactions", headers=auth(lookalike))
    assert history.json["data"] == []
    credited = top_up(client, admin, lookalike, "1")
    assert credited.status_code == 201
    assert credited.json["seq"] == 1
    victim_read = client.get(BASE, query_string={"user_id": victim}, headers=admin)
    assert victim_read.json["balance_usdc"] == "7.0000000"


REFUSED_IDS = {
    "nul": "user\x00x",
    "only-nul": "\x00",
    "control": "user\x01x",
    "newline": "user\nx",
    "bidi-override": "user\u202ex",
    "zero-width": "\u200b",
    "blank": "   ",
    "empty": "",
    "129-chars": "u" * 129,
    "10KB": "u" * TEN_KB,
}


@pytest.mark.parametrize("value", list(REFUSED_IDS.values()), ids=list(REFUSED_IDS))
def test_bad_user_id_in_a_body_or_token_is_refused(app, client, admin, admin_id, value):
    for path in ("topup", "charge", "holds"):
        response = client.post(
            f"{BASE}/{path}",
            json={"user_id": value, "amount_usdc": "1"},
            headers={**admin, **key()},
        )
        body = assert_error(response, 400, "VALIDATION_ERROR")
        assert body["details"][0]["field"] == "user_id"
    adjust = client.post(
        f"{BASE}/adjustments",
        json={"user_id": value, "amount_usdc": "1", "reason": "x"},
        headers={**admin, **key()},
    )
    assert_error(adjust, 400, "VALIDATION_ERROR")

    token = {"Authorization": f"Bearer {make_token(value)}"}
    for method, path in (("GET", BASE), ("GET", f"{BASE}/transactions"), ("GET", f"{BASE}/holds")):
        assert_error(client.open(path, method=method, headers=token), 401, "MISSING_CLAIMS")
    assert count(app, IdempotencyRecord.__table__, actor_id=admin_id) == 0


def test_lone_surrogate_user_id_is_400(app, client, admin, admin_id):
    raw = b'{"user_id": "user\\ud800x", "amount_usdc": "1"}'
    response = client.post(
        f"{BASE}/topup", data=raw, headers={**admin, **key(), "Content-Type": "application/json"}
    )
    assert_error(response, 400, "VALIDATION_ERROR")
    assert count(app, IdempotencyRecord.__table__, actor_id=admin_id) == 0


@pytest.mark.parametrize("path", ["", "/transactions", "/holds"])
@pytest.mark.parametrize("value", list(REFUSED_IDS.values()), ids=list(REFUSED_IDS))
def test_bad_user_id_in_a_query_is_400(app, client, admin, value, path):
    response = client.get(f"{BASE}{path}", query_string={"user_id": value}, headers=admin)
    assert_error(response, 400, "VALIDATION_ERROR")
    if "\x00" not in value:  # PostgreSQL cannot even be asked about a NUL
        assert count(app, Account.__table__, user_id=value) == 0


# --- other strings that reach the database ---------------------------------------------


def test_nul_in_free_text_is_a_400_that_writes_nothing(app, client, admin, admin_id, user_id):
    requests = [
        (
            "topup",
            {"user_id": user_id, "amount_usdc": "1", "description": "a\x00b"},
            "description",
        ),
        (
            "charge",
            {"user_id": user_id, "amount_usdc": "1", "description": "a\x00b"},
            "description",
        ),
        ("adjustments", {"user_id": user_id, "amount_usdc": "1", "reason": "a\x00b"}, "reason"),
        (
            "topup",
            {"user_id": user_id, "amount_usdc": "1", "metadata": {"k\x00": "v"}},
            "metadata",
        ),
        (
            "topup",
            {"user_id": user_id, "amount_usdc": "1", "metadata": {"k": "v\x00"}},
            "metadata",
        ),
    ]
    for path, body, field in requests:
        response = client.post(f"{BASE}/{path}", json=body, headers={**admin, **key()})
        error = assert_error(response, 400, "VALIDATION_ERROR")
        assert error["details"][0]["field"].split(".")[0] == field, (path, error)
    assert untouched(app, user_id, admin_id)


def test_nul_in_path_ids_is_not_a_500(request, engine_name, client, admin):
    for method, path in (
        ("GET", f"{BASE}/transactions/ctx_%00"),
        ("GET", f"{BASE}/holds/hold_%00"),
        ("POST", f"{BASE}/transactions/ctx_%00/refund"),
        ("POST", f"{BASE}/holds/hold_%00/capture"),
        ("POST", f"{BASE}/holds/hold_%00/release"),
    ):
        response = client.open(path, method=method, headers={**admin, **key()})
        assert_error(response, 404, "NOT_FOUND")


def test_long_and_odd_path_ids_are_404(client, admin):
    for value in ("x" * TEN_KB, "😀", "' OR 1=1 --", "%25", "ctx_%0d%0a"):
        for method, path in (
            ("GET", f"{BASE}/transactions/{value}"),
            ("GET", f"{BASE}/holds/{value}"),
            ("POST", f"{BASE}/transactions/{value}/refund"),
            ("POST", f"{BASE}/holds/{value}/capture"),
            ("POST", f"{BASE}/holds/{value}/release"),
        ):
            response = client.open(path, method=method, headers={**admin, **key()})
            assert_error(response, 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("name", "value"),
    [("since", "0001-01-01T00:00:00+01:00"), ("until", "9999-12-31T23:59:59-01:00")],
)
def test_out_of_range_time_filters_are_400(client, admin, name, value):
    response = client.get(f"{BASE}/transactions", query_string={name: value}, headers=admin)
    assert_error(response, 400, "VALIDATION_ERROR")


def test_odd_time_filters_are_400(client, admin):
    for value in ("yesterday", "2026-13-01T00:00:00Z", "9" * 400, "2026-01-01T00:00:00+25:00"):
        for name in ("since", "until"):
            response = client.get(
                f"{BASE}/transactions", query_string={name: value}, headers=admin
            )
            assert_error(response, 400, "VALIDATION_ERROR")


# --- metadata -----------------------------------------------------------------------


BAD_METADATA = {
    "51-keys": {f"k{i}": "v" for i in range(51)},
    "41-char-key": {"k" * 41: "v"},
    "empty-key": {"": "v"},
    "501-char-value": {"k": "v" * 501},
    "nested-object": {"k": {"nested": "v"}},
    "list-value": {"k": ["v"]},
    "int-value": {"k": 1},
    "float-value": {"k": 1.5},
    "bool-value": {"k": True},
    "null-value": {"k": None},
    "not-an-object": ["k", "v"],
    "string": "k=v",
}


@pytest.mark.parametrize("metadata", list(BAD_METADATA.values()), ids=list(BAD_METADATA))
def test_bad_metadata_is_400_and_changes_nothing(app, client, admin, admin_id, user_id, metadata):
    for path in ("topup", "charge", "holds"):
        response = client.post(
            f"{BASE}/{path}",
            json={"user_id": user_id, "amount_usdc": "1", "metadata": metadata},
            headers={**admin, **key()},
        )
        body = assert_error(response, 400, "VALIDATION_ERROR")
        assert body["details"][0]["field"].startswith("metadata")
    assert untouched(app, user_id, admin_id)


def test_metadata_at_its_limits_is_kept_exactly(client, admin, user_id):
    metadata = {f"{i:02d}" + "k" * 38: chr(ord("A") + i % 26) * 500 for i in range(50)}
    assert all(len(k) == 40 and len(v) == 500 for k, v in metadata.items())
    entry = top_up(client, admin, user_id, "1", metadata=metadata)
    assert entry.status_code == 201, entry.json
    assert entry.json["metadata"] == metadata
    read = client.get(f"{BASE}/transactions/{entry.json['id']}", headers=admin)
    assert read.json["metadata"] == metadata


# --- duplicate JSON keys ----------------------------------------------------------------


def _raw_top_up(client, admin, raw: str, idem: dict[str, str]):
    return client.post(
        f"{BASE}/topup", data=raw, headers={**admin, **idem, "Content-Type": "application/json"}
    )


def test_duplicate_json_keys_last_one_wins(app, client, admin, user_id):
    """Documented behaviour: Python's parser keeps the last occurrence of a key,
    and the idempotency fingerprint is taken over the parsed object."""
    other = f"other_{suffix()}"
    raw = (
        f'{{"user_id": "{other}", "amount_usdc": "1", "amount_usdc": "2", "user_id": "{user_id}"}}'
    )
    idem = key()
    first = _raw_top_up(client, admin, raw, idem)
    assert first.status_code == 201, first.json
    assert (first.json["user_id"], first.json["amount_usdc"]) == (user_id, "2.0000000")
    assert count(app, Account.__table__, user_id=other) == 0

    # The parsed object is what counts: the plain body is the same request ...
    plain = json.dumps({"amount_usdc": "2", "user_id": user_id})
    replay = _raw_top_up(client, admin, plain, idem)
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_data() == first.get_data()
    # ... and the same duplicates in the other order are another one.
    swapped = (
        f'{{"user_id": "{user_id}", "amount_usdc": "2", "amount_usdc": "1", "user_id": "{other}"}}'
    )
    assert_error(_raw_top_up(client, admin, swapped, idem), 422, "IDEMPOTENCY_CONFLICT")

    # Deterministic: the same duplicated body under a new key does the same thing.
    again = _raw_top_up(client, admin, raw, key())
    assert (again.json["user_id"], again.json["amount_usdc"]) == (user_id, "2.0000000")
    assert again.json["seq"] == 2
    assert count(app, Account.__table__, user_id=other) == 0


# --- unknown query keys -----------------------------------------------------------------


def test_unknown_query_keys_on_every_get_route_are_400(client, admin, user_id):
    entry = top_up(client, admin, user_id, "5").json
    hold = client.post(
        f"{BASE}/holds", json={"user_id": user_id, "amount_usdc": "1"}, headers={**admin, **key()}
    ).json
    routes = [
        BASE,
        f"{BASE}/transactions",
        f"{BASE}/transactions/{entry['id']}",
        f"{BASE}/holds",
        f"{BASE}/holds/{hold['id']}",
    ]
    for route in routes:
        assert client.get(route, headers=admin).status_code == 200, route
        for query in ({"foo": "1"}, {"user_id": user_id, "debug": "true"}, {"": "x"}):
            if route.rsplit("/", 1)[-1] in (entry["id"], hold["id"]):
                query = {k: v for k, v in query.items() if k != "user_id"}
            response = client.get(route, query_string=query, headers=admin)
            assert_error(response, 400, "VALIDATION_ERROR")
        repeated = client.get(f"{route}?limit=1&limit=2", headers=admin)
        assert_error(repeated, 400, "VALIDATION_ERROR")


def test_unknown_query_key_on_the_openapi_document_is_400(client):
    assert_error(client.get("/api/billing/openapi.json?foo=1"), 400, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    "path", [f"{BASE}/nope%0a", f"{BASE}/a/b%0ac", f"{BASE}/transactions/a%0a/b"]
)
def test_paths_with_newlines_are_json_404s(client, admin, path):
    for method in ("GET", "POST"):
        response = client.open(path, method=method, headers={**admin, **key()})
        assert response.mimetype == "application/json", response.get_data(as_text=True)[:200]
        assert_error(response, 404, "NOT_FOUND")


# --- cursors, identity before id shape, response headers ------------------------------


def _cursor(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        _cursor(f"s:{2**63}"),  # past BIGINT
        _cursor(f"s:{10**30}"),
        _cursor("s:0"),
        _cursor("s:-1"),
        _cursor("s:1:2"),
        _cursor("h:20260101000000000000:hold_00"),  # a holds cursor
        _cursor("s:1") + "A",  # not the canonical encoding
        "%00",
        "a" * 200,
    ],
)
def test_bad_transaction_cursors_are_400_before_any_sql(client, admin, user_id, cursor):
    response = client.get(f"{BASE}/transactions?user_id={user_id}&cursor={cursor}", headers=admin)
    assert_error(response, 400, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    "cursor",
    [
        _cursor("h:20260101000000000000:hold_\x00"),  # NUL in the id
        _cursor("h:20260101000000000000:' OR 1=1"),
        _cursor("h:20261399000000000000:hold_00"),  # not a date
        _cursor("h:2026010100000000000x:hold_00"),
        _cursor(f"s:{2**63}"),  # an entries cursor
        _cursor("h::hold_00"),
    ],
)
def test_bad_hold_cursors_are_400_before_any_sql(client, admin, user_id, cursor):
    response = client.get(f"{BASE}/holds?user_id={user_id}&cursor={cursor}", headers=admin)
    assert_error(response, 400, "VALIDATION_ERROR")


def test_identity_is_checked_before_the_shape_of_an_id(client):
    for method, path in (
        ("GET", f"{BASE}/transactions/{'x' * 100}"),
        ("GET", f"{BASE}/holds/hold_%00"),
        ("POST", f"{BASE}/transactions/{'x' * 100}/refund"),
        ("POST", f"{BASE}/holds/{'x' * 100}/capture"),
        ("POST", f"{BASE}/holds/hold_%00/release"),
    ):
        response = client.open(path, method=method, headers=key())
        assert_error(response, 401, "UNAUTHORIZED")


def test_every_credits_response_forbids_caching_and_sniffing(client, admin, user_id):
    topup = {"user_id": user_id, "amount_usdc": "1"}
    same_key = key()
    responses = [
        client.get(f"{BASE}?user_id={user_id}", headers=admin),
        client.get(f"{BASE}/transactions?user_id={user_id}", headers=admin),
        client.get(f"{BASE}/holds?user_id={user_id}", headers=admin),
        client.post(f"{BASE}/topup", json=topup, headers={**admin, **same_key}),
        client.post(f"{BASE}/topup", json=topup, headers={**admin, **same_key}),  # a replay
        client.get(f"{BASE}/transactions/ctx_missing", headers=admin),
        client.get(f"{BASE}/no/such/route", headers=admin),
        client.get(BASE),  # 401
        client.get("/api/billing/openapi.json"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 200, 201, 201, 404, 404, 401, 200]
    assert responses[4].headers["Idempotent-Replayed"] == "true"
    for response in responses:
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
