"""`session=db.session`: the host's Flask-SQLAlchemy session, savepoints, and
several ledger calls in one host transaction.

The host here is a real Flask app with its own model (an order table) on
Flask-SQLAlchemy, written the way docs/integration.md shows. Money is read
back with plain SQL; signals are counted at each step of the host's
transaction.
"""

from __future__ import annotations

import gc
import re
import textwrap
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import SECRET, Databases
from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.orm import Session

from callora_credits import credits_bp, current_ledger, signals
from callora_credits.db import unit_of_work
from callora_credits.errors import InsufficientCredits

U = 10_000_000  # units per USDC

db = SQLAlchemy()


class Order(db.Model):
    __tablename__ = "host_orders"

    id = sa.Column(sa.Integer, primary_key=True)
    number = sa.Column(sa.String(64), nullable=False, unique=True)
    user_id = sa.Column(sa.String(128), nullable=False)
    total_usdc = sa.Column(sa.String(32))
    status = sa.Column(sa.String(32), nullable=False, default="new")


def create_app(database_url: str) -> Flask:
    """The host of docs/integration.md, with a few routes of its own."""
    app = Flask("credits_host_session")
    app.config.update(
        TESTING=True,
        SQLALCHEMY_DATABASE_URI=database_url,
        JWT_SECRET_KEY=SECRET,
        CREDITS_LOW_BALANCE_USDC="1",
    )
    db.init_app(app)
    JWTManager(app)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")

    @app.post("/orders/<number>")
    def place_order(number: str) -> tuple[dict[str, str], int]:
        db.session.add(Order(number=number, user_id="host", status="new"))
        db.session.commit()
        return {"number": number}, 201

    @app.post("/orders/<number>/abandon")
    def abandon_order(number: str) -> tuple[dict[str, str], int]:
        db.session.add(Order(number=number, user_id="host", status="new"))
        db.session.flush()
        db.session.rollback()
        return {"number": number}, 200

    return app


@pytest.fixture
def host(databases: Databases, engine_name: str) -> Iterator[Flask]:
    app = create_app(databases.url(engine_name))
    with app.app_context():
        db.create_all()
    yield app
    with app.app_context():
        db.engine.dispose()


SIGNALS = (
    "credits_topped_up",
    "credits_charged",
    "credits_refunded",
    "credits_adjusted",
    "hold_created",
    "hold_captured",
    "hold_released",
    "balance_low",
    "balance_depleted",
)


@contextmanager
def counted(app: Flask) -> Iterator[Counter[str]]:
    """Counts the signals the app sends, by name."""
    sent: Counter[str] = Counter()

    def receiver(name: str) -> Any:
        def receive(sender: Any, **kwargs: Any) -> None:
            sent[name] += 1

        return receive

    with ExitStack() as stack:
        for name in SIGNALS:
            stack.enter_context(getattr(signals, name).connected_to(receiver(name), sender=app))
        yield sent


def money(app: Flask, user_id: str) -> tuple[int | None, list[tuple[str, int, int]]]:
    """The balance and the ledger rows, read with plain SQL."""
    with app.app_context(), app.extensions["sqlalchemy"].engine.connect() as conn:
        balance = conn.execute(
            sa.text("SELECT balance_units FROM credits WHERE user_id = :u"), {"u": user_id}
        ).scalar()
        rows = conn.execute(
            sa.text(
                "SELECT type, amount_units, balance_after_units FROM credits_transactions "
                "WHERE user_id = :u ORDER BY seq"
            ),
            {"u": user_id},
        ).all()
    return balance, [(r[0], int(r[1]), int(r[2])) for r in rows]


def order_status(app: Flask, number: str, table: str = "host_orders") -> str | None:
    with app.app_context(), app.extensions["sqlalchemy"].engine.connect() as conn:
        return conn.execute(
            sa.text(f"SELECT status FROM {table} WHERE number = :n"), {"n": number}
        ).scalar()


OURS = (
    ("after_commit", unit_of_work._on_commit),
    ("after_transaction_end", unit_of_work._on_transaction_end),
)


def assert_nothing_left(session: Session) -> None:
    """No listener on any session class; nothing pending on the session.

    The ``after_transaction_end`` listener may stay on the session object
    itself, inert: SQLAlchemy cannot remove a listener while running it.
    """
    for cls in type(session).__mro__:
        if issubclass(cls, Session):
            for name, fn in OURS:
                assert not event.contains(cls, name, fn), (cls, name)
    assert not event.contains(session, "after_commit", unit_of_work._on_commit)
    assert unit_of_work._PENDING not in session.info


def class_listener_counts(app: Flask) -> tuple[int, ...]:
    """Listeners a brand-new session of the app inherits from its class."""
    with app.app_context():
        db = app.extensions["sqlalchemy"]
        fresh = db.session()
        counts = (
            len(fresh.dispatch.after_commit),
            len(fresh.dispatch.after_rollback),
            len(fresh.dispatch.after_transaction_end),
        )
        db.session.remove()
    return counts


def later_host_work(app: Flask, rounds: int = 20) -> None:
    """Unrelated host commits and rollbacks, in later requests and app contexts."""
    client = app.test_client()
    for i in range(rounds):
        tag = f"later-{id(app)}-{i}"
        assert client.post(f"/orders/{tag}").status_code == 201
        assert client.post(f"/orders/{tag}-x/abandon").status_code == 200
        with app.app_context():
            db.session.add(Order(number=f"{tag}-ctx", user_id="host"))
            db.session.commit()
            db.session.add(Order(number=f"{tag}-gone", user_id="host"))
            db.session.flush()
            db.session.rollback()
            with db.session.begin_nested():
                db.session.add(Order(number=f"{tag}-sp", user_id="host"))
            db.session.commit()
        assert order_status(app, tag) == "new"
        assert order_status(app, f"{tag}-x") is None
        assert order_status(app, f"{tag}-ctx") == "new"
        assert order_status(app, f"{tag}-gone") is None
        assert order_status(app, f"{tag}-sp") == "new"


def test_one_commit_for_the_order_and_the_charge(host, user_id):
    """The documented pattern, then many unrelated host transactions."""
    baseline = class_listener_counts(host)
    with host.app_context():
        current_ledger().top_up(user_id, 30 * U)
    with counted(host) as sent, host.app_context():
        order = Order(number=f"A-{user_id}", user_id=user_id, total_usdc="25")
        db.session.add(order)
        current_ledger().charge(
            user_id,
            25 * U,
            reference=f"order-{user_id}",
            idempotency_key=f"order-{user_id}",
            session=db.session,
        )
        assert sent == {}  # nothing before the host commits
        current = db.session()
        db.session.commit()
        assert sent == {"credits_charged": 1}
        assert_nothing_left(current)
    assert money(host, user_id) == (5 * U, [("topup", 30 * U, 30 * U), ("charge", -25 * U, 5 * U)])
    assert order_status(host, f"A-{user_id}") == "new"

    with counted(host) as later:
        later_host_work(host)
    assert later == {}
    assert sent == {"credits_charged": 1}  # never sent again
    assert class_listener_counts(host) == baseline
    assert money(host, user_id)[0] == 5 * U


def test_host_rollback_drops_the_operation_and_its_signals(host, user_id):
    with counted(host) as sent, host.app_context():
        db.session.add(Order(number=f"B-{user_id}", user_id=user_id))
        current_ledger().top_up(user_id, 7 * U, session=db.session)
        session = db.session()
        db.session.rollback()
        assert_nothing_left(session)
        db.session.add(Order(number=f"B2-{user_id}", user_id=user_id))
        db.session.commit()  # the same session commits other work afterwards
    assert sent == {}
    assert money(host, user_id) == (None, [])
    assert order_status(host, f"B-{user_id}") is None
    assert order_status(host, f"B2-{user_id}") == "new"
    later_host_work(host, rounds=5)
    assert sent == {}


def test_an_app_context_that_ends_without_a_commit_drops_the_signals(host, user_id):
    """Flask-SQLAlchemy closes the session at teardown: that is a rollback."""
    with counted(host) as sent:
        with host.app_context():
            current_ledger().top_up(user_id, 2 * U, session=db.session)
        later_host_work(host, rounds=3)
    assert sent == {}
    assert money(host, user_id) == (None, [])


def test_two_calls_in_one_transaction_signal_only_at_the_final_commit(host, user_id):
    with counted(host) as sent, host.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U, session=db.session)
        assert sent == {}
        # The second call's savepoint is released before it returns; the
        # first call's signal must still wait for the host.
        ledger.charge(user_id, 4 * U, session=db.session)
        assert sent == {}
        ledger.charge(user_id, 6 * U, session=db.session)
        assert sent == {}
        session = db.session()
        db.session.commit()
        assert sent == {
            "credits_topped_up": 1,
            "credits_charged": 2,
            "balance_low": 1,
            "balance_depleted": 1,
        }
        assert_nothing_left(session)
    assert money(host, user_id) == (
        0,
        [("topup", 10 * U, 10 * U), ("charge", -4 * U, 6 * U), ("charge", -6 * U, 0)],
    )
    later_host_work(host, rounds=5)
    assert sent == {
        "credits_topped_up": 1,
        "credits_charged": 2,
        "balance_low": 1,
        "balance_depleted": 1,
    }


def test_two_calls_then_a_host_rollback_send_nothing(host, user_id):
    with counted(host) as sent, host.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U, session=db.session)
        ledger.charge(user_id, 4 * U, session=db.session)
        db.session.rollback()
    assert sent == {}
    assert money(host, user_id) == (None, [])


def test_a_refused_charge_in_a_savepoint_keeps_the_rest(host, user_id):
    """The documented begin_nested() + except InsufficientCredits pattern."""
    with host.app_context():
        current_ledger().top_up(user_id, 3 * U)
    with counted(host) as sent, host.app_context():
        ledger = current_ledger()
        order = Order(number=f"C-{user_id}", user_id=user_id)
        db.session.add(order)
        ledger.top_up(user_id, 1 * U, session=db.session)  # before the savepoint: kept
        try:
            with db.session.begin_nested():
                ledger.charge(user_id, 50 * U, session=db.session)
        except InsufficientCredits:
            order.status = "awaiting_payment"
        assert sent == {}
        session = db.session()
        db.session.commit()
        assert sent == {"credits_topped_up": 1}
        assert_nothing_left(session)
    assert money(host, user_id) == (4 * U, [("topup", 3 * U, 3 * U), ("topup", 1 * U, 4 * U)])
    assert order_status(host, f"C-{user_id}") == "awaiting_payment"
    later_host_work(host, rounds=5)
    assert sent == {"credits_topped_up": 1}


def test_a_refused_call_without_a_savepoint_changes_nothing(host, user_id):
    """The library's own savepoint: the host may catch the refusal and commit."""
    with host.app_context():
        current_ledger().top_up(user_id, 10 * U)
        current_ledger().hold(user_id, 8 * U)
    with counted(host) as sent, host.app_context():
        ledger = current_ledger()
        db.session.add(Order(number=f"C2-{user_id}", user_id=user_id))
        ledger.top_up(user_id, 1 * U, session=db.session)
        with pytest.raises(InsufficientCredits):
            ledger.charge(user_id, 5 * U, session=db.session)  # the balance covers it, holds don't
        db.session.commit()
    assert sent == {"credits_topped_up": 1}
    assert money(host, user_id) == (11 * U, [("topup", 10 * U, 10 * U), ("topup", 1 * U, 11 * U)])
    assert order_status(host, f"C2-{user_id}") == "new"


def test_a_charge_in_a_released_savepoint_signals_at_the_outer_commit(host, user_id):
    with host.app_context():
        current_ledger().top_up(user_id, 5 * U)
    with counted(host) as sent, host.app_context():
        db.session.add(Order(number=f"D-{user_id}", user_id=user_id))
        with db.session.begin_nested():
            current_ledger().charge(user_id, 2 * U, session=db.session)
        assert sent == {}  # the savepoint was released, nothing committed yet
        db.session.commit()
    assert sent == {"credits_charged": 1}
    assert money(host, user_id) == (3 * U, [("topup", 5 * U, 5 * U), ("charge", -2 * U, 3 * U)])


def test_a_released_savepoint_is_undone_by_a_host_rollback(host, user_id):
    with host.app_context():
        current_ledger().top_up(user_id, 5 * U)
    with counted(host) as sent, host.app_context():
        db.session.add(Order(number=f"D2-{user_id}", user_id=user_id))
        with db.session.begin_nested():
            current_ledger().charge(user_id, 2 * U, session=db.session)
        db.session.rollback()
    assert sent == {}
    assert money(host, user_id) == (5 * U, [("topup", 5 * U, 5 * U)])
    assert order_status(host, f"D2-{user_id}") is None


def test_a_rolled_back_savepoint_drops_its_signals_while_the_outer_commits(host, user_id):
    with host.app_context():
        current_ledger().top_up(user_id, 5 * U)
    with counted(host) as sent, host.app_context():
        ledger = current_ledger()
        db.session.add(Order(number=f"E-{user_id}", user_id=user_id))
        ledger.charge(user_id, 1 * U, session=db.session)
        savepoint = db.session.begin_nested()
        ledger.charge(user_id, 2 * U, session=db.session)
        ledger.top_up(user_id, 9 * U, session=db.session)
        savepoint.rollback()
        assert sent == {}
        session = db.session()
        db.session.commit()
        assert sent == {"credits_charged": 1}
        assert_nothing_left(session)
    assert money(host, user_id) == (4 * U, [("topup", 5 * U, 5 * U), ("charge", -1 * U, 4 * U)])
    assert order_status(host, f"E-{user_id}") == "new"


def test_savepoints_within_savepoints(host, user_id):
    """A released inner savepoint is undone with the outer one around it."""
    with host.app_context():
        current_ledger().top_up(user_id, 10 * U)
    with counted(host) as sent, host.app_context():
        ledger = current_ledger()
        db.session.add(Order(number=f"F-{user_id}", user_id=user_id))
        outer = db.session.begin_nested()
        with db.session.begin_nested():
            ledger.charge(user_id, 1 * U, session=db.session)
        outer.rollback()
        with db.session.begin_nested(), db.session.begin_nested():
            ledger.charge(user_id, 2 * U, session=db.session)
        assert sent == {}
        db.session.commit()
    assert sent == {"credits_charged": 1}
    assert money(host, user_id) == (8 * U, [("topup", 10 * U, 10 * U), ("charge", -2 * U, 8 * U)])


def test_a_commit_inside_an_open_savepoint_fires_once(host, user_id):
    """session.commit() with a savepoint still open commits both, in order."""
    with counted(host) as sent, host.app_context():
        db.session.add(Order(number=f"G-{user_id}", user_id=user_id))
        db.session.begin_nested()
        current_ledger().top_up(user_id, 1 * U, session=db.session)
        db.session.commit()
    assert sent == {"credits_topped_up": 1}
    assert money(host, user_id) == (1 * U, [("topup", 1 * U, 1 * U)])


def test_a_savepoint_opened_before_anything_was_written(host, user_id):
    """The docs' SQLite note: start the transaction before the savepoint."""
    with counted(host) as sent, host.app_context():
        if db.engine.dialect.name == "sqlite":
            db.session.execute(sa.text("BEGIN"))
        with db.session.begin_nested():
            current_ledger().top_up(user_id, 1 * U, session=db.session)
        db.session.rollback()
    assert sent == {}
    assert money(host, user_id) == (None, [])


def test_a_long_lived_session_collects_no_listeners(host, user_id):
    """One plain Session over many transactions: nothing accumulates."""
    with counted(host) as sent, host.app_context(), Session(db.engine) as session:
        ledger = current_ledger()
        ledger.top_up(user_id, 100 * U, session=session)
        session.commit()
        listeners = len(session.dispatch.after_transaction_end), len(session.dispatch.after_commit)
        for i in range(20):
            ledger.charge(user_id, 1 * U, session=session)
            ledger.charge(user_id, 1 * U, session=session)
            if i % 2:
                session.rollback()
            else:
                session.commit()
            assert_nothing_left(session)
            assert (
                len(session.dispatch.after_transaction_end),
                len(session.dispatch.after_commit),
            ) == listeners
    assert sent == {"credits_topped_up": 1, "credits_charged": 20}
    balance, rows = money(host, user_id)
    assert balance == 80 * U
    assert len(rows) == 21


def test_every_request_gets_a_clean_session(host, user_id):
    """Sessions used with session= leave nothing behind once they are gone."""
    with host.app_context():
        current_ledger().top_up(user_id, 100 * U)
    gc.collect()
    before = _registered()
    with counted(host) as sent:
        for i in range(20):
            with host.app_context():
                current_ledger().charge(user_id, 1 * U, session=db.session)
                if i % 2:
                    db.session.rollback()
                else:
                    db.session.commit()
    gc.collect()
    assert _registered() == before
    assert sent == {"credits_charged": 10}
    assert money(host, user_id)[0] == 90 * U


def _registered() -> int:
    # SQLAlchemy's registry of (target, event, listener) keys: ours must not
    # pile up as sessions come and go.
    from sqlalchemy.event import registry

    ours = {id(fn) for _, fn in OURS}
    return sum(1 for key in list(registry._key_to_collection) if key[2] in ours)


DOCS = Path(__file__).resolve().parent.parent / "docs" / "integration.md"


def documented_snippets() -> list[str]:
    """The Python blocks of the docs' `session=` section, as written."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("### Transactions and `session=`") : text.index("\n## Signals")]
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", section, re.S)]


@pytest.fixture
def documented(databases: Databases, engine_name: str) -> Iterator[tuple[Flask, SimpleNamespace]]:
    """A host whose code is the docs' snippets, on the docs' app setup."""
    docs_db = SQLAlchemy()
    namespace: dict[str, Any] = {"db": docs_db, "__name__": "documented_host"}
    for block in documented_snippets():
        exec(compile(block, str(DOCS), "exec"), namespace)  # noqa: S102
    app = Flask("documented_host")
    app.config.update(
        TESTING=True, SQLALCHEMY_DATABASE_URI=databases.url(engine_name), JWT_SECRET_KEY=SECRET
    )
    docs_db.init_app(app)
    JWTManager(app)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")
    with app.app_context():
        docs_db.create_all()
    yield app, SimpleNamespace(**namespace)
    with app.app_context():
        docs_db.engine.dispose()


def test_the_documented_patterns_work_as_shown(documented, user_id):
    app, docs = documented
    assert {"place_order", "abandon_order", "pay_then_tip", "order_or_wait"} <= set(vars(docs))
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
    baseline = class_listener_counts(app)

    def status(number: str) -> str | None:
        return order_status(app, number, table="orders")

    with counted(app) as sent:
        with app.app_context():
            docs.place_order(f"A-{user_id}", user_id, 3 * U)
        assert sent == {"credits_charged": 1}
        with app.app_context():
            docs.abandon_order(f"B-{user_id}", user_id, 1 * U)
        assert sent == {"credits_charged": 1}
        with app.app_context():
            docs.pay_then_tip(f"C-{user_id}", user_id, 2 * U, 1 * U)
        assert sent == {"credits_charged": 3}
        with app.app_context():
            assert docs.order_or_wait(f"D-{user_id}", user_id, 1 * U).status == "paid"
            assert docs.order_or_wait(f"E-{user_id}", user_id, 50 * U).status == "awaiting_payment"
        assert sent == {"credits_charged": 4}
        with app.app_context():
            docs.charge_in_a_savepoint(user_id, 1 * U)
        assert sent == {"credits_charged": 5}

        # Unrelated host work afterwards, in later app contexts.
        for i in range(20):
            with app.app_context():
                session = app.extensions["sqlalchemy"].session
                session.add(docs.Order(number=f"L-{user_id}-{i}", user_id="host", total_usdc="0"))
                if i % 2:
                    session.rollback()
                else:
                    session.commit()
                    session.execute(sa.text("SELECT 1"))
                    session.rollback()
        assert sent == {"credits_charged": 5}

    assert money(app, user_id) == (
        2 * U,
        [
            ("topup", 10 * U, 10 * U),
            ("charge", -3 * U, 7 * U),
            ("charge", -2 * U, 5 * U),
            ("charge", -1 * U, 4 * U),
            ("charge", -1 * U, 3 * U),
            ("charge", -1 * U, 2 * U),
        ],
    )
    assert status(f"A-{user_id}") == "new"
    assert status(f"B-{user_id}") is None
    assert status(f"C-{user_id}") == "new"
    assert status(f"D-{user_id}") == "paid"
    assert status(f"E-{user_id}") == "awaiting_payment"
    assert [status(f"L-{user_id}-{i}") for i in range(4)] == ["new", None, "new", None]
    assert class_listener_counts(app) == baseline
