"""SQL statements per operation (SPEC §13): a round trip added fails here.

Counted with SQLAlchemy's cursor events; transaction control (BEGIN,
COMMIT, ROLLBACK) is not counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from callora_credits import current_ledger

CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")


@contextmanager
def counting(engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        if not statement.lstrip().upper().startswith(CONTROL):
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", before)


@pytest.fixture
def ledger(app):
    with app.app_context():
        ledger = current_ledger()
        ledger.get_or_create_by_user_id("warm-up")  # first connection's own queries
        yield ledger


def write_budget(engine_name: str) -> int:
    return 4 if engine_name == "mysql" else 3


def test_balance_read_is_one_statement(ledger, user_id):
    ledger.top_up(user_id, 10)
    with counting(ledger.engine) as statements:
        ledger.get_or_create_by_user_id(user_id)
    assert len(statements) == 1, statements


def test_top_up_budget(ledger, engine_name, user_id):
    ledger.top_up(user_id, 10)
    with counting(ledger.engine) as statements:
        ledger.top_up(user_id, 10)
    assert len(statements) <= write_budget(engine_name), statements


def test_charge_budget(ledger, engine_name, user_id):
    ledger.top_up(user_id, 10)
    with counting(ledger.engine) as statements:
        ledger.charge(user_id, 3)
    assert len(statements) <= write_budget(engine_name), statements


def test_history_page_is_one_statement(ledger, user_id):
    for _ in range(3):
        ledger.top_up(user_id, 10)
    first = ledger.history(user_id, limit=2)
    with counting(ledger.engine) as statements:
        ledger.history(user_id, limit=2, cursor=first.next_cursor)
    assert len(statements) == 1, statements


def test_http_balance_read_is_one_statement(app, client, auth, user_id):
    client.get("/api/billing/credits", headers=auth(user_id))
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
    with counting(engine) as statements:
        assert client.get("/api/billing/credits", headers=auth(user_id)).status_code == 200
    assert len(statements) == 1, statements
