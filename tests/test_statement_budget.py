"""SQL statements per operation: a round trip added fails here.

Transaction control (BEGIN, COMMIT, ROLLBACK) is not counted. Each budget is
checked on both ways a hot statement can be sent (see
``callora_credits/db/prepared.py``): through ``Connection.execute``, counted
with SQLAlchemy's cursor events (a listener selects that path), and on the
transaction's DBAPI cursor, counted by a spy that calls through.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from callora_credits import current_ledger
from callora_credits.db.prepared import PreparedStatement

CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")

Counting = Callable[[Engine], AbstractContextManager[list[str]]]


def _keep(statements: list[str], statement: str) -> None:
    if not statement.lstrip().upper().startswith(CONTROL):
        statements.append(statement)


@contextmanager
def counting_events(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        _keep(statements, statement)

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", before)


@contextmanager
def counting_calls(engine: Engine) -> Iterator[list[str]]:
    """Every statement sent without listeners: prepared ones and the rest."""
    statements: list[str] = []
    patch = pytest.MonkeyPatch()
    run, execute, driver_sql = (
        PreparedStatement._run,
        Connection.execute,
        Connection.exec_driver_sql,
    )

    def spy_run(self, conn, form, params, **kwargs: Any):
        _keep(statements, form.sql)
        return run(self, conn, form, params, **kwargs)

    def spy_execute(self, statement, *args: Any, **kwargs: Any):
        _keep(statements, str(statement.compile(dialect=self.dialect)))
        return execute(self, statement, *args, **kwargs)

    def spy_driver_sql(self, statement, *args: Any, **kwargs: Any):
        _keep(statements, statement)
        return driver_sql(self, statement, *args, **kwargs)

    patch.setattr(PreparedStatement, "_run", spy_run)
    patch.setattr(Connection, "execute", spy_execute)
    patch.setattr(Connection, "exec_driver_sql", spy_driver_sql)
    try:
        yield statements
    finally:
        patch.undo()


@pytest.fixture(params=["events", "prepared"])
def counting(request: pytest.FixtureRequest) -> Counting:
    return counting_events if request.param == "events" else counting_calls


@pytest.fixture
def ledger(app):
    with app.app_context():
        ledger = current_ledger()
        ledger.get_or_create_by_user_id("warm-up")  # first connection's own queries
        yield ledger


def write_budget(engine_name: str, operation: str) -> int:
    """A top-up (account, entry, its grant, the key) and a charge drawing
    from one grant (account, grants read, the grant, entry, allocation, key);
    MariaDB reads the account row back (no RETURNING)."""
    budget = {"top_up": 4, "charge": 6}[operation]
    return budget + 1 if engine_name == "mysql" else budget


def test_balance_read_is_one_statement(ledger, counting, user_id):
    ledger.top_up(user_id, 10)
    with counting(ledger.engine) as statements:
        ledger.get_or_create_by_user_id(user_id)
    assert len(statements) == 1, statements


def test_top_up_budget(ledger, counting, engine_name, user_id):
    ledger.top_up(user_id, 10)
    with counting(ledger.engine) as statements:
        ledger.top_up(user_id, 10)
    assert len(statements) <= write_budget(engine_name, "top_up"), statements


def test_charge_budget(ledger, counting, engine_name, user_id):
    ledger.top_up(user_id, 10)
    with counting(ledger.engine) as statements:
        ledger.charge(user_id, 3)
    assert len(statements) <= write_budget(engine_name, "charge"), statements


def test_history_page_is_one_statement(ledger, counting, user_id):
    for _ in range(3):
        ledger.top_up(user_id, 10)
    first = ledger.history(user_id, limit=2)
    with counting(ledger.engine) as statements:
        ledger.history(user_id, limit=2, cursor=first.next_cursor)
    assert len(statements) == 1, statements


def test_http_balance_read_is_one_statement(app, client, counting, auth, user_id):
    client.get("/api/billing/credits", headers=auth(user_id))
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
    with counting(engine) as statements:
        assert client.get("/api/billing/credits", headers=auth(user_id)).status_code == 200
    assert len(statements) == 1, statements


def test_both_ways_send_the_same_sql(ledger, user_id):
    """The prepared path sends exactly what Connection.execute would."""
    ledger.top_up(user_id, 100)
    sent = {}
    for name, counter in (("events", counting_events), ("prepared", counting_calls)):
        with counter(ledger.engine) as statements:
            ledger.get_or_create_by_user_id(user_id)
            ledger.top_up(user_id, 10)
            ledger.charge(user_id, 3)
        sent[name] = [" ".join(statement.split()) for statement in statements]
    assert sent["prepared"] == sent["events"]
    assert len(sent["events"]) >= 7


def test_hot_statements_go_straight_to_the_cursor(ledger, user_id, monkeypatch):
    """With nothing listening, a charge and a read never build a SQLAlchemy result."""
    ledger.top_up(user_id, 100)
    executed: list[object] = []
    execute = Connection.execute

    def spy(self, statement, *args: Any, **kwargs: Any):
        executed.append(statement)
        return execute(self, statement, *args, **kwargs)

    monkeypatch.setattr(Connection, "execute", spy)
    ledger.charge(user_id, 3)
    ledger.get_or_create_by_user_id(user_id)
    assert executed == []
