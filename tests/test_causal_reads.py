"""``CREDITS_GALERA_CAUSAL_READS``: the library's own reads wait for the cluster.

On plain MariaDB (the shared server) the setting's statements are checked: the
read runs with ``wsrep_sync_wait = 1``, the pooled connection gets its previous
value back, and one that cannot be put back is discarded. On the Galera
cluster a balance read on node 2 right after a top-up on node 1 is never stale.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import make_app
from flask import Flask
from sqlalchemy import event

from callora_credits import current_ledger

MYSQL_URL = os.environ.get("CREDITS_TEST_MYSQL_URL")
needs_mysql = pytest.mark.skipif(not MYSQL_URL, reason="CREDITS_TEST_MYSQL_URL is not set")


@pytest.fixture
def mysql_app(databases: Any) -> Iterator[Flask]:
    """An app on the shared MariaDB with causal reads on and one pooled connection."""
    app = make_app(
        databases.url("mysql"),
        CREDITS_GALERA_CAUSAL_READS=True,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 1, "max_overflow": 0},
    )
    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


def statements_of(engine: Any) -> tuple[list[str], Any]:
    sent: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        sent.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    return sent, before


def session_sync_wait(engine: Any) -> tuple[int, int]:
    """The pooled connection's ``wsrep_sync_wait`` and connection id."""
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT @@SESSION.wsrep_sync_wait, CONNECTION_ID()").one()
    return int(row[0]), int(row[1])


@needs_mysql
def test_a_read_sets_sync_wait_and_puts_the_previous_value_back(mysql_app):
    user_id = f"user_{uuid.uuid4().hex[:12]}"
    with mysql_app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 100)
        engine = ledger.engine
        with engine.connect() as conn:  # a host's own session value, kept
            conn.exec_driver_sql("SET SESSION wsrep_sync_wait = 4")
        before, conn_id = session_sync_wait(engine)
        assert before == 4
        sent, listener = statements_of(engine)
        seen: list[int] = []

        def spy(conn, cursor, statement, parameters, context, executemany):
            if "balance_units" in statement:
                cursor.execute("SELECT @@SESSION.wsrep_sync_wait")
                seen.append(int(cursor.fetchone()[0]))

        event.listen(engine, "before_cursor_execute", spy)
        try:
            shown = ledger.find_by_user_id(user_id)
        finally:
            event.remove(engine, "before_cursor_execute", spy)
            event.remove(engine, "before_cursor_execute", listener)
        assert shown is not None
        assert shown.balance_units == 100
        assert seen == [1]  # the read itself ran with wsrep_sync_wait = 1
        assert "wsrep_sync_wait = 1" in sent[0]
        assert sent[-1].startswith("SET SESSION wsrep_sync_wait = @")
        assert session_sync_wait(engine) == (4, conn_id)  # the same connection, put back


@needs_mysql
def test_writes_and_reads_with_the_setting_off_send_no_sync_wait(databases):
    app = make_app(databases.url("mysql"))
    user_id = f"user_{uuid.uuid4().hex[:12]}"
    try:
        with app.app_context():
            ledger = current_ledger()
            sent, listener = statements_of(ledger.engine)
            ledger.top_up(user_id, 100)
            ledger.find_by_user_id(user_id)
            event.remove(ledger.engine, "before_cursor_execute", listener)
    finally:
        with app.app_context():
            app.extensions["sqlalchemy"].engine.dispose()
    assert sent
    assert not [s for s in sent if "sync_wait" in s]


@needs_mysql
def test_a_connection_that_cannot_be_put_back_is_discarded(mysql_app):
    user_id = f"user_{uuid.uuid4().hex[:12]}"
    with mysql_app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 100)
        engine = ledger.engine
        _, first_id = session_sync_wait(engine)

        def fail_restore(conn, cursor, statement, parameters, context, executemany):
            if statement.startswith("SET SESSION wsrep_sync_wait = @"):
                raise RuntimeError("restore refused")

        event.listen(engine, "before_cursor_execute", fail_restore)
        try:
            shown = ledger.find_by_user_id(user_id)
        finally:
            event.remove(engine, "before_cursor_execute", fail_restore)
        assert shown is not None
        assert shown.balance_units == 100
        value, second_id = session_sync_wait(engine)
        assert second_id != first_id  # the changed connection never went back to the pool
        assert value == 0


# --- on the Galera cluster ----------------------------------------------------------------

READS = 150


def stale_reads(galera: Any, causal: bool) -> int:
    """Top up on node 1, read the balance at once on node 2, ``READS`` times;
    how many reads missed the top-up."""
    writer = make_app(galera.urls()[0])
    reader = make_app(galera.urls()[1], CREDITS_GALERA_CAUSAL_READS=causal)
    user_id = f"user_{uuid.uuid4().hex[:12]}"
    stale = 0
    try:
        with writer.app_context():
            credit = current_ledger()
            credit.top_up(user_id, 1)
            galera.catch_up()
            with reader.app_context():
                read = current_ledger()
                for n in range(2, READS + 2):
                    credit.top_up(user_id, 1)
                    shown = read.find_by_user_id(user_id)
                    assert shown is not None
                    stale += shown.balance_units != n
    finally:
        for app in (writer, reader):
            with app.app_context():
                app.extensions["sqlalchemy"].engine.dispose()
    return stale


@pytest.mark.galera
@pytest.mark.xdist_group("galera")
def test_causal_reads_on_a_cluster_are_never_stale(galera):
    without = stale_reads(galera, causal=False)
    print(f"stale balance reads on node 2 after a top-up on node 1: {without}/{READS} off")
    assert stale_reads(galera, causal=True) == 0
