"""Hot statements sent on the DBAPI cursor behave as Connection.execute would."""

from __future__ import annotations

from datetime import datetime

import pytest
from sqlalchemy import event, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from callora_credits import current_ledger
from callora_credits.db import store
from callora_credits.db.prepared import PreparedStatement


@pytest.fixture
def engine(app) -> Engine:
    with app.app_context():
        current_ledger()
        return app.extensions["sqlalchemy"].engine


def idempotency_values(key_hash: str, now: datetime) -> dict[str, object]:
    return {
        "key_hash": key_hash,
        "user_id": "someone",
        "actor_id": "",
        "method": "CALL",
        "path": "test",
        "idempotency_key": key_hash,
        "fingerprint": "f",
        "status_code": 201,
        "response_body": "{}",
        "created_at": now,
        "expires_at": now,
    }


def test_a_duplicate_key_is_sqlalchemys_integrity_error(engine, user_id):
    now = datetime(2026, 1, 1)
    with engine.connect() as conn, conn.begin():
        store.insert_idempotency(conn, idempotency_values(user_id, now))
        with pytest.raises(IntegrityError) as raised:
            store.insert_idempotency(conn, idempotency_values(user_id, now))
        assert raised.value.orig is not None
        assert not raised.value.connection_invalidated


def test_rows_have_names_and_engine_types(engine, user_id):
    now = datetime(2026, 1, 1, 12, 30, 15, 123456)
    with engine.connect() as conn, conn.begin():
        store.insert_account_if_missing(conn, user_id, now)
        row = store.balance_row(conn, user_id, now)
    assert row.user_id == user_id
    assert int(row.balance_units) == 0
    assert int(row.held_units) == 0
    # SQLite hands back text: the column type's result processing still applies.
    assert row.created_at == now
    assert isinstance(row.updated_at, datetime)
    assert row == tuple(row)


@pytest.mark.parametrize("listen_on", ["engine", "Engine class"])
def test_a_listener_sees_every_hot_statement(engine, listen_on, user_id):
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    target = engine if listen_on == "engine" else Engine
    event.listen(target, "before_cursor_execute", before)
    try:
        with engine.connect() as conn, conn.begin():
            store.insert_account_if_missing(conn, user_id, datetime(2026, 1, 1))
            store.balance_row(conn, user_id, datetime(2026, 1, 1))
    finally:
        event.remove(target, "before_cursor_execute", before)
    assert seen[-1] == store._BALANCE_ROW.sql(engine.dialect)


def test_a_handle_error_listener_sees_hot_statement_errors(engine, user_id):
    handled: list[object] = []

    def on_error(context):
        handled.append(context.original_exception)

    now = datetime(2026, 1, 1)
    event.listen(engine, "handle_error", on_error)
    try:
        with engine.connect() as conn, conn.begin():
            store.insert_idempotency(conn, idempotency_values(user_id, now))
            with pytest.raises(IntegrityError):
                store.insert_idempotency(conn, idempotency_values(user_id, now))
    finally:
        event.remove(engine, "handle_error", on_error)
    assert len(handled) == 1


def test_a_missing_parameter_is_refused_before_sending(engine):
    with engine.connect() as conn, pytest.raises(KeyError, match="p_now"):
        store._BALANCE_ROW.first(conn, {"p_user_id": "someone"})


def test_statements_with_per_execution_parts_are_refused(engine):
    expanding = PreparedStatement(
        select(store.accounts.c.user_id).where(store.accounts.c.user_id.in_(["a", "b"]))
    )
    with engine.connect() as conn, pytest.raises(ValueError, match="bound by the caller"):
        expanding.first(conn, {})

    # A listener sends statements through Connection.execute; the refusal stays.
    def listener(*args: object) -> None:
        pass

    event.listen(engine, "before_cursor_execute", listener)
    try:
        with engine.connect() as conn, pytest.raises(ValueError, match="bound by the caller"):
            expanding.first(conn, {})
    finally:
        event.remove(engine, "before_cursor_execute", listener)


def test_the_fast_path_stays_off_connection_execute(engine, user_id, monkeypatch):
    calls: list[object] = []
    execute = Connection.execute

    def spy(self, statement, *args, **kwargs):
        calls.append(statement)
        return execute(self, statement, *args, **kwargs)

    monkeypatch.setattr(Connection, "execute", spy)
    with engine.connect() as conn, conn.begin():
        store.balance_row(conn, user_id, datetime(2026, 1, 1))
    assert calls == []
