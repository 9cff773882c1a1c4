"""@charge_credits on a host route: hold, capture on 2xx, release otherwise."""

from __future__ import annotations

import pytest
from conftest import make_app
from flask import abort, jsonify

from callora_credits import charge_credits, current_ledger, set_final_price, signals

U = 10_000_000


@pytest.fixture
def app(databases, engine_name):
    app = make_app(databases.url(engine_name))

    @app.get("/paid")
    @charge_credits("0.5000000")
    def paid():
        return jsonify(ok=True)

    @app.get("/cheaper")
    @charge_credits("1")
    def cheaper():
        set_final_price("0.2500000")
        return jsonify(ok=True)

    @app.get("/greedy")
    @charge_credits("1")
    def greedy():
        set_final_price("1.0000001")
        return jsonify(ok=True)

    @app.get("/missing")
    @charge_credits("1")
    def missing():
        abort(404)

    @app.get("/failing")
    @charge_credits("1")
    def failing():
        return jsonify(error="upstream"), 502

    @app.get("/crashing")
    @charge_credits("1")
    def crashing():
        raise RuntimeError("view bug")

    @app.get("/priced/<int:size>")
    @charge_credits(lambda request: f"0.{request.view_args['size']:07d}")
    def priced(size):
        return jsonify(size=size)

    yield app
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()


def state(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        balance = ledger.find_by_user_id(user_id)
        return balance, ledger.history(user_id).items


def fund(app, user_id, units):
    with app.app_context():
        current_ledger().top_up(user_id, units)


def test_success_captures_and_sets_headers(app, client, auth, user_id):
    fund(app, user_id, 2 * U)
    response = client.get("/paid", headers=auth(user_id))
    assert response.status_code == 200
    assert response.headers["X-Credits-Charged"] == "0.5000000"
    assert response.headers["X-Credits-Balance"] == "1.5000000"
    balance, entries = state(app, user_id)
    assert (balance.balance_units, balance.held_units) == (15_000_000, 0)
    assert [(e.type, e.amount_units) for e in entries] == [("hold_capture", -5_000_000),
                                                          ("topup", 2 * U)]  # fmt: skip


def test_view_can_lower_but_not_raise_the_price(app, client, auth, user_id):
    fund(app, user_id, 2 * U)
    assert client.get("/cheaper", headers=auth(user_id)).headers["X-Credits-Charged"] == (
        "0.2500000"
    )
    with pytest.raises(ValueError):
        client.get("/greedy", headers=auth(user_id))
    balance, _ = state(app, user_id)
    assert (balance.balance_units, balance.held_units) == (2 * U - 2_500_000, 0)


@pytest.mark.parametrize(("path", "status"), [("/missing", 404), ("/failing", 502)])
def test_error_responses_release(app, client, auth, user_id, path, status):
    fund(app, user_id, 2 * U)
    response = client.get(path, headers=auth(user_id))
    assert response.status_code == status
    if path == "/failing":  # abort(404) raises past the decorator: no header to add
        assert response.headers["X-Credits-Charged"] == "0.0000000"
    balance, entries = state(app, user_id)
    assert (balance.balance_units, balance.held_units, len(entries)) == (2 * U, 0, 1)


def test_exception_releases(app, client, auth, user_id):
    fund(app, user_id, 2 * U)
    with pytest.raises(RuntimeError):
        client.get("/crashing", headers=auth(user_id))
    balance, entries = state(app, user_id)
    assert (balance.balance_units, balance.held_units, len(entries)) == (2 * U, 0, 1)


def test_cannot_pay_is_402_and_the_view_does_not_run(app, client, auth, user_id):
    fund(app, user_id, 1)
    response = client.get("/paid", headers=auth(user_id))
    assert response.status_code == 402
    assert set(response.json) == {"code", "message", "requestId", "details"}
    assert response.json["code"] == "INSUFFICIENT_CREDITS"
    assert response.headers["X-Request-Id"] == response.json["requestId"]
    balance, entries = state(app, user_id)
    assert (balance.balance_units, len(entries)) == (1, 1)


def test_unauthenticated_is_401_json(client):
    response = client.get("/paid")
    assert response.status_code == 401
    assert response.json["code"] == "UNAUTHORIZED"


def test_callable_price(app, client, auth, user_id):
    fund(app, user_id, 1 * U)
    response = client.get("/priced/1234", headers=auth(user_id))
    assert response.headers["X-Credits-Charged"] == "0.0001234"
    balance, _ = state(app, user_id)
    assert balance.balance_units == U - 1234


def test_failed_capture_returns_the_response_and_signals(app, client, auth, user_id):
    fund(app, user_id, 2 * U)
    failures = []

    @app.get("/expires-instantly")
    @charge_credits("1")
    def expires_instantly():
        # The hold expires while the view runs, so the capture must fail.
        state_ = app.extensions["callora_credits"]
        real = state_.clock
        state_.clock = lambda: real() + __import__("datetime").timedelta(days=2)
        return jsonify(done=True)

    with signals.capture_failed.connected_to(lambda sender, **kw: failures.append(kw)):
        response = client.get("/expires-instantly", headers=auth(user_id))
    assert response.status_code == 200
    assert "X-Credits-Charged" not in response.headers
    assert len(failures) == 1
    balance, entries = state(app, user_id)
    assert balance.balance_units == 2 * U
    assert len(entries) == 1
