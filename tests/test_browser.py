"""The example's billing page in a real browser: Debian's Chromium, headless,
driven by Playwright (the PyPI package only: nothing downloads a browser).

The example host app is served on a free loopback port from a thread, on a
temporary SQLite file. Tabs read dates in the en-GB locale and in UTC, so the
page's dates have one spelling. Without /usr/bin/chromium these tests are skipped,
except under ``CI=true``, where that is a failure. A failed test leaves a
screenshot in tests/artifacts/.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN, ADMIN_SCOPE, SECRET, make_token
from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from callora_credits import current_ledger, parse_amount
from callora_credits.core.money import parse_units

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - reported by the `browser` fixture
    sync_playwright = None

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = Path(os.environ.get("CREDITS_TEST_CHROMIUM", "/usr/bin/chromium"))
#: As root, in a container: no sandbox, no GPU, and no traffic of its own.
#: Playwright adds a fresh --user-data-dir for every launch.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 5_000
#: When the promotional credit of these tests expires, and how the page spells it.
PROMO_EXPIRY = datetime(2099, 3, 1, 17, 30, tzinfo=UTC)
PROMO_EXPIRY_SHOWN = "1 Mar 2099, 17:30"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def _units(ledger: Any, amount_usdc: str) -> int:
    return parse_amount(amount_usdc, max_units=ledger.config.max_amount_units)


# --- the server ---------------------------------------------------------------------


@dataclass
class LiveApp:
    """The example host app, served on a loopback port."""

    app: Flask
    base_url: str

    def page_url(self, user_id: str, **claims: Any) -> str:
        """The billing page's demo sign-in link for ``user_id``."""
        return f"{self.base_url}/billing?token={make_token(user_id, **claims)}"

    def top_up(self, user_id: str, amount_usdc: str) -> None:
        with self.app.app_context():
            ledger = current_ledger()
            ledger.top_up(user_id, _units(ledger, amount_usdc))

    def charge(self, user_id: str, amount_usdc: str) -> None:
        with self.app.app_context():
            ledger = current_ledger()
            ledger.charge(user_id, _units(ledger, amount_usdc))

    def hold(self, user_id: str, amount_usdc: str) -> None:
        with self.app.app_context():
            ledger = current_ledger()
            ledger.hold(user_id, _units(ledger, amount_usdc))

    def grant(self, user_id: str, amount_usdc: str, **options: Any) -> str:
        """A promotional grant (by default); its id."""
        with self.app.app_context():
            ledger = current_ledger()
            return str(ledger.grant(user_id, _units(ledger, amount_usdc), **options).id)

    def void_grant(self, grant_id: str) -> None:
        with self.app.app_context():
            current_ledger().void_grant(grant_id)

    def grants(self, user_id: str) -> list[Any]:
        with self.app.app_context():
            return current_ledger().grants(user_id, status="all", limit=100).items

    def entries(self, user_id: str) -> list[Any]:
        with self.app.app_context():
            return current_ledger().history(user_id, limit=100).items


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES_DIR))
        host_app = importlib.import_module("host_app")
        demo = importlib.import_module("demo")
    database = tmp_path_factory.mktemp("browser") / "host.sqlite3"
    app: Flask = host_app.create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{database}",
            "JWT_SECRET_KEY": SECRET,
        }
    )
    demo.apply_migrations(app)
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="billing-page", daemon=True)
    thread.start()
    try:
        yield LiveApp(app, f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        with app.app_context():
            host_app.db.engine.dispose()


# --- the browser ----------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    """Skip, or under CI=true fail: CI must never pass without a browser."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}: the browser tests cannot run", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        _unavailable("the playwright package is not installed (requirements-dev.txt)")
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


class _FailedCalls:
    """A plugin that notes which tests failed in their call phase."""

    def __init__(self) -> None:
        self.nodeids: set[str] = set()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Any:
        report = yield
        if report.when == "call" and report.failed:
            self.nodeids.add(item.nodeid)
        return report


@pytest.fixture(scope="module")
def failed_calls(request: pytest.FixtureRequest) -> Iterator[_FailedCalls]:
    plugin = _FailedCalls()
    request.config.pluginmanager.register(plugin, f"billing-page-failures-{id(plugin)}")
    yield plugin
    request.config.pluginmanager.unregister(plugin)


@pytest.fixture
def page(
    browser: Browser, failed_calls: _FailedCalls, request: pytest.FixtureRequest
) -> Iterator[Page]:
    """A fresh tab in a fresh context (its own sessionStorage); on failure, a
    screenshot in tests/artifacts/; any uncaught script error fails the test."""
    context = browser.new_context(
        viewport={"width": 1100, "height": 900}, locale="en-GB", timezone_id="UTC"
    )
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    script_errors: list[str] = []
    tab.on("pageerror", lambda error: script_errors.append(str(error)))
    yield tab
    try:
        if request.node.nodeid in failed_calls.nodeids:
            ARTIFACTS.mkdir(exist_ok=True)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.nodeid)
            tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    finally:
        context.close()
    assert script_errors == [], "the page's script raised"


# --- the tests --------------------------------------------------------------------------


def test_page_shows_the_balance(page, live, user_id):
    live.top_up(user_id, "12.5")
    live.hold(user_id, "2.5")

    page.goto(live.page_url(user_id))

    expect(page.locator("#balance")).to_have_text("12.50")
    expect(page.locator("#held")).to_have_text("2.50")
    expect(page.locator("#available")).to_have_text("10.00")
    expect(page.locator("#paid-credit")).to_have_text("12.50")
    expect(page.locator("#promotional-credit")).to_have_text("0.00")
    expect(page.locator("#next-expiry")).to_have_text("No credit is set to expire.")
    expect(page.locator("#grants-rows tr")).to_have_count(1)
    expect(page.locator("#whoami")).to_have_text(f"Signed in as {user_id}")
    expect(page.locator("#admin")).to_be_hidden()
    # The token leaves the address bar at once and lives in the tab.
    assert page.url == f"{live.base_url}/billing"
    page.goto(f"{live.base_url}/billing")
    expect(page.locator("#balance")).to_have_text("12.50")
    expect(page.locator("#history-rows tr")).to_have_count(1)
    expect(page.locator("#notice")).to_be_hidden()
    # Nothing spent yet: no estimate of when the credits run out.
    expect(page.locator("#depletion")).to_have_text("No spending in the last 7 days.")


def test_admin_top_up_changes_balance_chart_and_history(page, live, user_id):
    live.top_up(user_id, "10")
    page.goto(live.page_url(ADMIN, scopes=ADMIN_SCOPE))
    expect(page.locator("#admin")).to_be_visible()
    page.get_by_label("Show account").fill(user_id)
    page.get_by_role("button", name="Show", exact=True).click()
    expect(page.locator("#balance")).to_have_text("10.00")
    chart = page.locator("#chart svg")
    expect(chart).to_have_attribute("data-added", "100000000")
    today = page.locator("#chart g.bucket").last
    expect(today).to_have_attribute("data-credited", "100000000")

    expect(page.get_by_label("User id")).to_have_value(user_id)
    page.get_by_label("Amount (USDC)").fill("25")
    with page.expect_request(lambda sent: sent.url.endswith("/credits/topup")) as sent:
        page.get_by_role("button", name="Top up").click()

    assert UUID.fullmatch(sent.value.headers["idempotency-key"])
    expect(page.locator("#topup-result")).to_have_text(
        f"Added 25.00 USDC to {user_id}. New balance: 35.00 USDC."
    )
    expect(page.locator("#balance")).to_have_text("35.00")
    expect(chart).to_have_attribute("data-added", "350000000")
    expect(today).to_have_attribute("data-credited", "350000000")
    expect(page.locator("#chart-title")).to_have_text(f"Usage of {user_id}, by day")
    newest = page.locator("#history-rows tr").first
    expect(newest).to_contain_text("Top-up")
    expect(newest).to_contain_text("+25.00")
    assert [(entry.type, entry.amount_units) for entry in live.entries(user_id)] == [
        ("topup", 250_000_000),
        ("topup", 100_000_000),
    ]


def test_the_chart_is_drawn_from_the_usage_endpoint(page, live, user_id):
    live.top_up(user_id, "20")
    live.charge(user_id, "3.5")
    live.charge(user_id, "3.5")

    with page.expect_response(lambda answer: "/api/billing/credits/usage" in answer.url) as sent:
        page.goto(live.page_url(user_id))
    usage = sent.value.json()

    chart = page.locator("#chart svg")
    expect(chart).to_have_attribute("data-buckets", str(len(usage["data"])))
    expect(chart).to_have_attribute("data-granularity", "day")
    buckets = page.locator("#chart g.bucket")
    expect(buckets).to_have_count(31)
    drawn = buckets.evaluate_all(
        "groups => groups.map(g => [g.dataset.start, g.dataset.debited, "
        "g.dataset.credited, g.dataset.expired])"
    )
    assert drawn == [
        [
            bucket["start"],
            str(parse_units(bucket["debited_usdc"])),
            str(parse_units(bucket["credited_usdc"])),
            str(parse_units(bucket["expired_usdc"])),
        ]
        for bucket in usage["data"]
    ]
    assert drawn[-1][1:] == ["70000000", "200000000", "0"]
    # The tallest bar (20 added) fills the plot, 172 units high; 7 spent is 7/20 of it.
    today = buckets.last
    expect(today.locator("rect.bar-credited")).to_have_attribute("height", "172.00")
    expect(today.locator("rect.bar-debited")).to_have_attribute("height", "60.20")
    expect(today.locator("rect.bar-expired")).to_have_count(0)
    expect(buckets.first.locator("rect")).to_have_count(0)
    # 7 USDC in 7 days: 1 USDC a day, and 13 available.
    assert usage["depletion_estimate"]["daily_burn_usdc"] == "1.0000000"
    expect(page.locator("#depletion")).to_contain_text("(1.00 USDC a day)")
    expect(page.locator("#depletion")).to_have_attribute(
        "data-at", usage["depletion_estimate"]["at"]
    )


def test_top_up_errors_read_as_sentences(page, live, user_id):
    page.goto(live.page_url(ADMIN, scopes=ADMIN_SCOPE))
    page.get_by_label("User id").fill(user_id)
    page.get_by_label("Amount (USDC)").fill("0")
    page.get_by_role("button", name="Top up").click()

    result = page.locator("#topup-result")
    expect(result).to_have_text("Amount must be greater than zero.")
    expect(result).to_have_attribute("data-kind", "error")
    assert live.entries(user_id) == []


def test_load_more_pages_through_the_history(page, live, user_id):
    live.top_up(user_id, "100")
    for _ in range(24):
        live.charge(user_id, "0.5")

    page.goto(live.page_url(user_id))
    rows = page.locator("#history-rows tr")
    expect(rows).to_have_count(10)
    load_more = page.get_by_role("button", name="Load more")
    load_more.click()
    expect(rows).to_have_count(20)
    load_more.click()
    expect(rows).to_have_count(25)
    expect(load_more).to_be_hidden()

    seqs = [int(seq) for seq in rows.evaluate_all("rows => rows.map(row => row.dataset.seq)")]
    assert seqs == list(range(25, 0, -1))
    expect(rows.last).to_contain_text("Top-up")
    expect(rows.first).to_contain_text("88.00")


def test_paid_call_shows_a_readable_402(page, live, user_id):
    live.top_up(user_id, "0.015")
    page.goto(live.page_url(user_id))
    expect(page.locator("#balance")).to_have_text("0.015")
    try_it = page.get_by_role("button", name="Try the paid call")
    result = page.locator("#paid-result")

    try_it.click()
    expect(result).to_contain_text("Charged 0.01 USDC.")
    expect(page.locator("#balance")).to_have_text("0.005")

    try_it.click()
    expect(result).to_have_text("Not enough credits for this call.")
    expect(result).to_have_attribute("data-kind", "error")
    expect(page.locator("#balance")).to_have_text("0.005")
    assert [entry.type for entry in live.entries(user_id)] == ["hold_capture", "topup"]


def test_a_bad_sign_in_link_says_so(page, live):
    page.goto(f"{live.base_url}/billing?token=not-a-token")
    expect(page.locator("#notice")).to_have_text(re.compile(r"^Your sign-in link is not valid"))

    page.get_by_role("button", name="Sign out").click()
    expect(page.locator("#notice")).to_have_text(re.compile(r"^You are not signed in"))
    expect(page.get_by_role("button", name="Try the paid call")).to_be_hidden()


def _grant_rows(page: Page) -> list[list[str]]:
    """The grants table as the reader sees it: one list of cell texts a row."""
    rows = page.locator("#grants-rows tr")
    return rows.evaluate_all(
        "rows => rows.map(row => Array.from(row.cells, cell => cell.textContent))"
    )


def test_page_shows_the_grants_and_the_next_expiry(page, live, user_id):
    live.top_up(user_id, "20")
    promo = live.grant(user_id, "3", expires_at=PROMO_EXPIRY)
    # Both at priority 50: the promotional credit expires first, so it is
    # spent first and pinned by the hold.
    live.charge(user_id, "0.5")
    live.hold(user_id, "1")
    # Listed, but neither in the balance nor expiring.
    live.grant(user_id, "4", effective_at=datetime(2098, 1, 1, tzinfo=UTC))

    page.goto(live.page_url(user_id))

    expect(page.locator("#balance")).to_have_text("22.50")
    expect(page.locator("#paid-credit")).to_have_text("20.00")
    expect(page.locator("#promotional-credit")).to_have_text("2.50")
    # What can still be spent of it expires then: the held part stays.
    next_expiry = page.locator("#next-expiry")
    expect(next_expiry).to_have_text(f"1.50 USDC expires on {PROMO_EXPIRY_SHOWN}.")
    expect(next_expiry).to_have_attribute("data-amount", "1.5000000")
    expect(next_expiry.locator("time")).to_have_attribute(
        "datetime", "2099-03-01T17:30:00.000000Z"
    )
    rows = page.locator("#grants-rows tr")
    expect(rows).to_have_count(3)
    assert _grant_rows(page) == [
        ["Promotional", "4.00", "4.00", "0.00", "never", "Starts 1 Jan 2098, 00:00"],
        ["Promotional", "3.00", "1.50", "1.00", PROMO_EXPIRY_SHOWN, "Active"],
        ["Paid", "20.00", "20.00", "0.00", "never", "Active"],
    ]
    expect(rows.nth(1)).to_have_attribute("data-grant-id", promo)
    expect(page.locator("#grants-empty")).to_be_hidden()
    expect(page.locator("#grants-more")).to_be_hidden()


def test_past_grants_show_when_asked_and_page_on(page, live, user_id):
    for _ in range(11):
        live.top_up(user_id, "1")
    live.charge(user_id, "1")  # the oldest top-up: used up
    live.void_grant(live.grant(user_id, "2", expires_at=PROMO_EXPIRY))

    page.goto(live.page_url(user_id))
    rows = page.locator("#grants-rows tr")
    expect(rows).to_have_count(10)
    expect(page.locator("#grants-more")).to_be_hidden()
    assert {row[-1] for row in _grant_rows(page)} == {"Active"}
    expect(page.locator("#next-expiry")).to_have_text("No credit is set to expire.")

    page.get_by_label("Show used-up, expired and voided grants").check()
    expect(rows.first).to_have_attribute("data-status", "voided")
    expect(rows).to_have_count(10)
    page.get_by_role("button", name="More grants").click()
    expect(rows).to_have_count(12)
    expect(page.locator("#grants-more")).to_be_hidden()
    shown = _grant_rows(page)
    assert shown[0] == ["Promotional", "2.00", "0.00", "0.00", PROMO_EXPIRY_SHOWN, "Voided"]
    assert shown[-1] == ["Paid", "1.00", "0.00", "0.00", "never", "Used up"]
    expect(page.locator("#grants-status")).to_have_text("Showing 12 grants.")


def test_admin_gives_promotional_credit(page, live, user_id):
    live.top_up(user_id, "10")
    page.goto(live.page_url(ADMIN, scopes=ADMIN_SCOPE))
    page.get_by_label("Show account").fill(user_id)
    page.get_by_role("button", name="Show", exact=True).click()
    expect(page.locator("#grants-rows tr")).to_have_count(1)
    expect(page.get_by_label("For user")).to_have_value(user_id)

    page.get_by_label("Promotional credit (USDC)").fill("5")
    page.get_by_label("Expires").fill("2099-06-30T18:00")
    with page.expect_request(lambda sent: sent.url.endswith("/credits/grants")) as sent:
        page.get_by_role("button", name="Give credit").click()

    assert UUID.fullmatch(sent.value.headers["idempotency-key"])
    assert sent.value.post_data_json["expires_at"] == "2099-06-30T18:00:00.000Z"
    expect(page.locator("#grant-result")).to_have_text(
        f"Gave 5.00 USDC of promotional credit to {user_id}, expiring on 30 Jun 2099, 18:00."
    )
    expect(page.locator("#promotional-credit")).to_have_text("5.00")
    expect(page.locator("#next-expiry")).to_have_text("5.00 USDC expires on 30 Jun 2099, 18:00.")
    expect(page.locator("#grants-rows tr")).to_have_count(2)
    assert _grant_rows(page)[0] == [
        "Promotional",
        "5.00",
        "5.00",
        "0.00",
        "30 Jun 2099, 18:00",
        "Active",
    ]
    expect(page.locator("#history-rows tr").first).to_contain_text("Credit grant")
    expect(page.locator("#balance")).to_have_text("15.00")
    given = [grant for grant in live.grants(user_id) if grant.category == "promotional"]
    assert [(grant.amount_units, grant.expires_at) for grant in given] == [
        (50_000_000, datetime(2099, 6, 30, 18, tzinfo=UTC))
    ]

    # An expiry already past reads as a sentence, and gives nothing.
    page.get_by_label("Promotional credit (USDC)").fill("5")
    page.get_by_label("Expires").fill("2001-01-01T00:00")
    page.get_by_role("button", name="Give credit").click()
    result = page.locator("#grant-result")
    expect(result).to_have_text("Expiry must be in the future.")
    expect(result).to_have_attribute("data-kind", "error")
    assert len(live.grants(user_id)) == 2
