"""The example's billing page in a real browser: Debian's Chromium, headless,
driven by Playwright (the PyPI package only: nothing downloads a browser).

The example host app is served on a free loopback port from a thread, on a
temporary SQLite file. Without /usr/bin/chromium these tests are skipped,
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
    context = browser.new_context(viewport={"width": 1100, "height": 900})
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
