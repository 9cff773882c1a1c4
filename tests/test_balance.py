"""GET /credits: the balance, its auto-creation, and concurrent first reads."""

from __future__ import annotations

import multiprocessing
import re
import sys
import threading
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_app, make_token
from flask import Flask

from callora_credits.db.models import Account, GrantRow

BASE = "/api/billing/credits"
BALANCE_KEYS = {
    "user_id",
    "balance_usdc",
    "held_usdc",
    "available_usdc",
    "paid_usdc",
    "promotional_usdc",
    "next_expiry",
    "created_at",
    "updated_at",
}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
TESTS_DIR = str(Path(__file__).resolve().parent)


def accounts(app: Flask, *user_ids: str) -> list[Any]:
    """The ``credits`` rows of these users, read with SQLAlchemy Core."""
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        t = Account.__table__
        with engine.connect() as conn:
            return list(
                conn.execute(sa.select(t).where(t.c.user_id.in_(user_ids)).order_by(t.c.user_id))
            )


def insert_account(app: Flask, user_id: str, units: int, at: datetime) -> None:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.begin() as conn:
            conn.execute(
                sa.insert(Account.__table__).values(
                    user_id=user_id,
                    balance_units=units,
                    last_seq=0,
                    created_at=at,
                    updated_at=at,
                    last_grant_number=1,
                )
            )
            # As the grants migration leaves a balance from before grants.
            conn.execute(
                sa.insert(GrantRow.__table__).values(
                    id="grant_" + user_id[-12:].rjust(24, "0"),
                    user_id=user_id,
                    number=1,
                    category="paid",
                    origin="migration",
                    amount_units=units,
                    remaining_units=units,
                    held_units=0,
                    priority=50,
                    effective_at=at,
                    status="active",
                    metadata_json="{}",
                    created_at=at,
                )
            )


def test_new_user_gets_a_zero_balance_and_one_row(client, app, auth, user_id):
    assert accounts(app, user_id) == []
    response = client.get(BASE, headers=auth(user_id))
    assert response.status_code == 200, response.json
    body = response.json
    assert body["user_id"] == user_id
    assert (body["balance_usdc"], body["held_usdc"], body["available_usdc"]) == (
        "0.0000000",
        "0.0000000",
        "0.0000000",
    )
    rows = accounts(app, user_id)
    assert len(rows) == 1
    assert (rows[0].user_id, rows[0].balance_units, rows[0].last_seq) == (user_id, 0, 0)


def test_second_read_returns_the_same_account(client, app, auth, user_id):
    first = client.get(BASE, headers=auth(user_id)).json
    second = client.get(BASE, headers=auth(user_id)).json
    assert first == second
    assert len(accounts(app, user_id)) == 1


def test_existing_balance(client, app, auth, user_id):
    created = datetime(2026, 1, 15, 10, 30, 0, 123456)
    insert_account(app, user_id, 1005000000, created)
    response = client.get(BASE, headers=auth(user_id))
    assert response.status_code == 200, response.json
    assert response.json == {
        "user_id": user_id,
        "balance_usdc": "100.5000000",
        "held_usdc": "0.0000000",
        "available_usdc": "100.5000000",
        "paid_usdc": "100.5000000",
        "promotional_usdc": "0.0000000",
        "next_expiry": None,
        "created_at": "2026-01-15T10:30:00.123456Z",
        "updated_at": "2026-01-15T10:30:00.123456Z",
    }
    assert len(accounts(app, user_id)) == 1


def test_smallest_unit_is_shown(client, app, auth, user_id):
    insert_account(app, user_id, 1, datetime(2026, 1, 1))
    body = client.get(BASE, headers=auth(user_id)).json
    assert (body["balance_usdc"], body["available_usdc"]) == ("0.0000001", "0.0000001")


def test_timestamps_are_utc_with_microseconds(client, auth, user_id):
    body = client.get(BASE, headers=auth(user_id)).json
    for key in ("created_at", "updated_at"):
        assert TIMESTAMP.match(body[key]), body[key]
    assert body["created_at"] <= body["updated_at"]


def test_exact_keys(client, auth, user_id):
    response = client.get(BASE, headers=auth(user_id))
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert set(response.json) == BALANCE_KEYS


def test_user_ids_are_case_sensitive(client, app, auth):
    suffix = uuid.uuid4().hex[:12]
    upper, lower = f"Alice_{suffix}", f"alice_{suffix}"
    insert_account(app, upper, 1005000000, datetime(2026, 1, 15, 10, 30))
    first = client.get(BASE, headers=auth(lower))
    assert first.status_code == 200, first.json
    assert (first.json["user_id"], first.json["balance_usdc"]) == (lower, "0.0000000")
    second = client.get(BASE, headers=auth(upper))
    assert (second.json["user_id"], second.json["balance_usdc"]) == (upper, "100.5000000")
    rows = accounts(app, upper, lower)
    assert sorted((row.user_id, row.balance_units) for row in rows) == [
        (upper, 1005000000),
        (lower, 0),
    ]


# --- concurrent first reads --------------------------------------------------------


def test_concurrent_first_reads_in_threads(app, user_id):
    threads_count = 32
    barrier = threading.Barrier(threads_count)
    headers = {"Authorization": f"Bearer {make_token(user_id)}"}
    results: list[tuple[int, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def read() -> None:
        try:
            client = app.test_client()
            barrier.wait(timeout=30)
            response = client.get(BASE, headers=headers)
            with lock:
                results.append((response.status_code, response.get_json()))
        except BaseException as exc:  # reported below, not lost in the thread
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(results) == threads_count
    assert all(status == 200 for status, _ in results), results
    assert {body["balance_usdc"] for _, body in results} == {"0.0000000"}
    assert {body["created_at"] for _, body in results} == {results[0][1]["created_at"]}
    assert len(accounts(app, user_id)) == 1


def _first_read_in_a_process(
    tests_dir: str, url: str, user: str, barrier: Any, results: Any
) -> None:
    """Runs in a spawned process: its own app, engine and pool."""
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    from conftest import make_app as make_child_app
    from conftest import make_token as make_child_token

    app = make_child_app(url)
    try:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.connect().close()  # connect before the race
        client = app.test_client()
        headers = {"Authorization": f"Bearer {make_child_token(user)}"}
        barrier.wait(timeout=60)
        response = client.get(BASE, headers=headers)
        results.put((response.status_code, response.get_data(as_text=True)))
    finally:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()


def test_concurrent_first_reads_in_processes(databases, engine_name, user_id):
    if engine_name == "sqlite":
        pytest.skip("SQLite is one file on one host; the cross-process race is a server's")
    url = databases.url(engine_name)
    processes_count = 3
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes_count)
    results = ctx.Queue()
    processes = [
        ctx.Process(
            target=_first_read_in_a_process, args=(TESTS_DIR, url, user_id, barrier, results)
        )
        for _ in range(processes_count)
    ]
    for process in processes:
        process.start()
    try:
        outcomes = [results.get(timeout=120) for _ in processes]
    finally:
        for process in processes:
            process.join(30)
        results.close()
        results.join_thread()
    assert [process.exitcode for process in processes] == [0] * processes_count
    assert [status for status, _ in outcomes] == [200] * processes_count, outcomes
    app = make_app(url)
    try:
        rows = accounts(app, user_id)
    finally:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()
    assert len(rows) == 1
    assert rows[0].balance_units == 0
