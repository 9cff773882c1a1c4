"""The example's billing page and its paid endpoints, without a browser.

``/billing`` is a server-rendered shell whose script calls the credits API
(its grants table from ``GET /api/billing/credits/grants``, the next expiry
from the balance, its usage chart from ``GET /api/billing/credits/usage``);
``/api/quote`` and ``/api/echo`` are host routes made paid with
``@charge_credits``. The browser side, the grants and the chart included,
is in test_browser.py.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import ADMIN, ADMIN_SCOPE, SECRET, Databases
from flask import Flask

from callora_credits import current_ledger

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
BASE_URL = "http://127.0.0.1:5000"
U = 10_000_000
#: When the promotional credit of these tests expires: a known instant.
PROMO_EXPIRY = datetime(2099, 3, 1, 17, 30, tzinfo=UTC)


@pytest.fixture(scope="module")
def example() -> Iterator[SimpleNamespace]:
    """The example's modules, imported the way `python examples/demo.py` does."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES_DIR))
        yield SimpleNamespace(
            host_app=importlib.import_module("host_app"),
            demo=importlib.import_module("demo"),
        )


@pytest.fixture
def host(example: SimpleNamespace, databases: Databases, engine_name: str) -> Iterator[Flask]:
    """The example host app on the session's migrated database for the engine.

    The billing page and the paid routes use only the library's tables, which
    that database has; test users are unique, so tests share it.
    """
    app: Flask = example.host_app.create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": databases.url(engine_name),
            "JWT_SECRET_KEY": SECRET,
        }
    )
    yield app
    with app.app_context():
        example.host_app.db.engine.dispose()


def _top_up(app: Flask, user_id: str, units: int) -> None:
    with app.app_context():
        current_ledger().top_up(user_id, units)


def _charge(app: Flask, user_id: str, units: int) -> None:
    with app.app_context():
        current_ledger().charge(user_id, units)


def _balance_units(app: Flask, user_id: str) -> int:
    with app.app_context():
        balance = current_ledger().find_by_user_id(user_id)
    return 0 if balance is None else balance.balance_units


# --- the page -------------------------------------------------------------------


def test_page_renders_its_containers(host):
    response = host.test_client().get("/billing")

    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    for element_id in (
        "balance",
        "held",
        "available",
        "paid-credit",
        "promotional-credit",
        "next-expiry",
        "grants-rows",
        "grants-all",
        "grants-more",
        "grant-form",
        "chart",
        "depletion",
        "history-rows",
        "load-more",
        "paid-call",
        "paid-result",
        "topup-form",
        "notice",
    ):
        assert f'id="{element_id}"' in html, element_id
    # The admin panel starts hidden: the script shows it for an admin token.
    assert re.search(r'<section id="admin"[^>]* hidden>', html)
    # The script finds every URL it calls in data attributes.
    assert 'data-balance-url="/api/billing/credits"' in html
    assert 'data-transactions-url="/api/billing/credits/transactions"' in html
    assert 'data-topup-url="/api/billing/credits/topup"' in html
    assert 'data-usage-url="/api/billing/credits/usage"' in html
    assert 'data-grants-url="/api/billing/credits/grants"' in html
    # One column per figure of a grant, its expiry included.
    grants_table = html[html.index('<table class="data-table grants">') :]
    grants_table = grants_table[: grants_table.index("</table>")]
    headers = re.findall(r"<th scope=\"col\"[^>]*>([^<]+)</th>", grants_table)
    assert headers == ["Category", "Granted", "Remaining", "Held", "Expires", "Status"]
    assert 'data-paid-url="/api/quote"' in html
    assert 'data-admin-scope="credits:admin"' in html
    # Scripts and styles from this origin only; the sign-in token in the URL
    # never leaves as a Referer.
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert response.headers["Referrer-Policy"] == "no-referrer"


def test_page_assets_are_served(host):
    client = host.test_client()
    script = client.get("/static/billing.js")
    assert script.status_code == 200
    assert "javascript" in script.mimetype
    text = script.get_data(as_text=True)
    assert '"Not enough credits for this call."' in text
    assert "Idempotency-Key" in text
    assert "sessionStorage" in text
    style = client.get("/static/billing.css")
    assert style.status_code == 200
    assert style.mimetype == "text/css"
    script.close()
    style.close()


# --- the chart's data ---------------------------------------------------------


def test_the_chart_reads_the_usage_summary_of_the_shown_user(host, user_id, auth):
    """What the page's script fetches for its chart: 30 days of the user's
    usage (another user's for an admin), by day, with the estimate."""
    _top_up(host, user_id, 100 * U)
    _charge(host, user_id, 7 * U)
    client = host.test_client()
    script = client.get("/static/billing.js")
    assert "urls.usage" in script.get_data(as_text=True)
    script.close()

    mine = client.get("/api/billing/credits/usage", headers=auth(user_id))
    assert mine.status_code == 200, mine.get_json()
    usage = mine.get_json()
    assert (len(usage["data"]), usage["granularity"]) == (31, "day")
    today = usage["data"][-1]
    assert (today["debited_usdc"], today["credited_usdc"], today["count"]) == (
        "7.0000000",
        "100.0000000",
        2,
    )
    assert usage["depletion_estimate"]["daily_burn_usdc"] == "1.0000000"
    admin = auth(ADMIN, scopes=ADMIN_SCOPE)
    shown = client.get(f"/api/billing/credits/usage?user_id={user_id}", headers=admin)
    assert shown.get_json()["data"] == usage["data"]
    other = client.get(f"/api/billing/credits/usage?user_id={user_id}", headers=auth("someone"))
    assert other.status_code == 403


# --- the grants' data --------------------------------------------------------


def test_the_grants_table_reads_the_grants_of_the_shown_user(host, user_id, auth):
    """What the page's script fetches for its grants and its next-expiry line:
    a paid top-up and a promotional grant with a known expiry, with the
    category split and the next expiry in the balance."""
    with host.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 20 * U)
        promo = ledger.grant(user_id, 3 * U, expires_at=PROMO_EXPIRY, description="Welcome")
        ledger.charge(user_id, U // 2)  # drawn from the promotional grant: it expires first
    client = host.test_client()
    script = client.get("/static/billing.js")
    text = script.get_data(as_text=True)
    script.close()
    for used in ("urls.grants", "next_expiry", "paid_usdc", "promotional_usdc", "expires_at"):
        assert used in text, used

    balance = client.get("/api/billing/credits", headers=auth(user_id)).get_json()
    assert (balance["paid_usdc"], balance["promotional_usdc"]) == ("20.0000000", "2.5000000")
    assert balance["next_expiry"] == {
        "at": "2099-03-01T17:30:00.000000Z",
        "amount_usdc": "2.5000000",
    }
    mine = client.get("/api/billing/credits/grants?limit=10", headers=auth(user_id))
    assert mine.status_code == 200, mine.get_json()
    shown = [
        (g["id"], g["category"], g["remaining_usdc"], g["held_usdc"], g["expires_at"], g["status"])
        for g in mine.get_json()["data"]
    ]
    assert shown[0] == (
        promo.id,
        "promotional",
        "2.5000000",
        "0.0000000",
        "2099-03-01T17:30:00.000000Z",
        "active",
    )
    assert shown[1][1:] == ("paid", "20.0000000", "0.0000000", None, "active")
    assert len(shown) == 2
    admin = auth(ADMIN, scopes=ADMIN_SCOPE)
    theirs = client.get(f"/api/billing/credits/grants?limit=10&user_id={user_id}", headers=admin)
    assert theirs.get_json()["data"] == mine.get_json()["data"]
    other = client.get(f"/api/billing/credits/grants?user_id={user_id}", headers=auth("someone"))
    assert other.status_code == 403


def test_the_grants_box_lists_used_up_grants_too(host, user_id, auth):
    """Ticked, the page asks for ``status=all``: a used-up grant is listed."""
    _top_up(host, user_id, U)
    _charge(host, user_id, U)
    client = host.test_client()

    current = client.get("/api/billing/credits/grants?limit=10", headers=auth(user_id))
    assert current.get_json()["data"] == []
    every = client.get("/api/billing/credits/grants?limit=10&status=all", headers=auth(user_id))
    assert [g["status"] for g in every.get_json()["data"]] == ["depleted"]
    balance = client.get("/api/billing/credits", headers=auth(user_id)).get_json()
    assert balance["next_expiry"] is None


def test_the_admin_grant_form_request_gives_promotional_credit(host, user_id, auth):
    """The request the admin form sends: an expiry in UTC with milliseconds, as
    the browser's ``toISOString()`` writes it."""
    _top_up(host, user_id, 10 * U)
    client = host.test_client()
    admin = auth(ADMIN, scopes=ADMIN_SCOPE)
    body = {
        "user_id": user_id,
        "amount_usdc": "5",
        "category": "promotional",
        "description": "Promotional credit from the billing page",
        "expires_at": "2099-06-30T18:00:00.000Z",
    }

    given = client.post(
        "/api/billing/credits/grants", json=body, headers={**admin, "Idempotency-Key": user_id}
    )

    assert given.status_code == 201, given.get_json()
    grant = given.get_json()
    assert (grant["category"], grant["amount_usdc"], grant["expires_at"]) == (
        "promotional",
        "5.0000000",
        "2099-06-30T18:00:00.000000Z",
    )
    balance = client.get("/api/billing/credits", headers=auth(user_id)).get_json()
    assert balance["next_expiry"] == {
        "at": "2099-06-30T18:00:00.000000Z",
        "amount_usdc": "5.0000000",
    }
    assert _balance_units(host, user_id) == 15 * U
    # A past expiry is a 400 on the field, which the page words as a sentence.
    past = client.post(
        "/api/billing/credits/grants",
        json={**body, "expires_at": "2001-01-01T00:00:00.000Z"},
        headers={**admin, "Idempotency-Key": f"{user_id}-past"},
    )
    assert past.status_code == 400
    assert past.get_json()["details"][0]["field"] == "expires_at"
    assert _balance_units(host, user_id) == 15 * U


# --- the paid endpoints ---------------------------------------------------------


def test_quote_is_a_paid_call(host, user_id, auth):
    _top_up(host, user_id, U // 50)  # 0.02 USDC: two quotes
    client = host.test_client()

    first = client.get("/api/quote", headers=auth(user_id))
    assert first.status_code == 200, first.get_data(as_text=True)
    assert first.json["quote"]
    assert first.headers["X-Credits-Charged"] == "0.0100000"
    assert first.headers["X-Credits-Balance"] == "0.0100000"
    assert client.get("/api/quote", headers=auth(user_id)).status_code == 200

    broke = client.get("/api/quote", headers=auth(user_id))
    assert broke.status_code == 402
    assert broke.json["code"] == "INSUFFICIENT_CREDITS"
    assert broke.json["requestId"] == broke.headers["X-Request-Id"]
    assert _balance_units(host, user_id) == 0
    assert client.get("/api/quote").status_code == 401


def test_echo_lowers_its_price_for_short_texts(host, user_id, auth):
    _top_up(host, user_id, U)
    client = host.test_client()

    short = client.get("/api/echo?text=hello", headers=auth(user_id))
    assert short.status_code == 200
    assert short.json == {"text": "hello"}
    assert short.headers["X-Credits-Charged"] == "0.0040000"

    long = client.get("/api/echo", query_string={"text": "x" * 40}, headers=auth(user_id))
    assert long.status_code == 200
    assert long.headers["X-Credits-Charged"] == "0.0100000"

    # A refused request releases its hold: nothing is charged.
    empty = client.get("/api/echo", headers=auth(user_id))
    assert empty.status_code == 400
    assert empty.headers["X-Credits-Charged"] == "0.0000000"
    assert _balance_units(host, user_id) == U - 40_000 - 100_000
    with host.app_context():
        balance = current_ledger().find_by_user_id(user_id)
    assert balance is not None
    assert balance.held_units == 0


# --- make demo ------------------------------------------------------------------


def test_demo_prints_the_billing_page_first(example, tmp_path, capsys):
    demo = example.demo
    app = example.host_app.create_app(
        {"TESTING": True, "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'demo.sqlite3'}"}
    )
    try:
        demo.apply_migrations(app)
        demo.seed_balance(app)
        demo.print_quickstart(app, BASE_URL)

        lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
        first_url = next(index for index, line in enumerate(lines) if "http" in line.split()[-1])
        links = {}
        for line in lines[first_url:]:
            if line.startswith(("#", "curl ")):
                break
            user, url = line.split()[:2]
            links[user.rstrip(":")] = url
        assert list(links) == [demo.DEMO_USER, demo.DEMO_ADMIN]
        assert lines[first_url - 1].startswith("# the billing page")
        # Nothing before the links but the banner.
        assert not any(line.startswith("curl ") for line in lines[:first_url])

        client = app.test_client()
        tokens = {}
        for user, url in links.items():
            parts = urlsplit(url)
            assert f"{parts.scheme}://{parts.netloc}" == BASE_URL
            assert parts.path == "/billing"
            (tokens[user],) = parse_qs(parts.query)["token"]
            page = client.get(parts.path, query_string=parts.query)
            assert page.status_code == 200
            # Nothing a terminal would cut a clickable link at.
            assert re.fullmatch(r"[A-Za-z0-9:/._?=~-]+", url), url

        mine = client.get(
            "/api/billing/credits", headers={"Authorization": f"Bearer {tokens[demo.DEMO_USER]}"}
        )
        assert mine.status_code == 200
        assert mine.json["user_id"] == demo.DEMO_USER
        assert mine.json["balance_usdc"] == "100.0000000"
        theirs = client.get(
            f"/api/billing/credits?user_id={demo.DEMO_USER}",
            headers={"Authorization": f"Bearer {tokens[demo.DEMO_ADMIN]}"},
        )
        assert theirs.status_code == 200, "the admin link can read (and top up) others"
    finally:
        with app.app_context():
            example.host_app.db.engine.dispose()
