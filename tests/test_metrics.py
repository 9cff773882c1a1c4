"""Prometheus metrics (``callora-credits[metrics]``).

In process, on a registry of the test's own (``CREDITS_METRICS_REGISTRY``):
every counter exact after a known sequence of operations through the HTTP
API and the Python API, units only for what committed, routes as URL rules,
and nothing collected (nothing broken) without ``prometheus_client`` or with
``CREDITS_METRICS = False``.

Under gunicorn with two workers and ``PROMETHEUS_MULTIPROC_DIR`` (the example
host app and its ``/metrics``): a scripted mix of 200/201/400/401/402/404/429
answers, each counted exactly across both workers, and no label value equal
to a user id.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import ADMIN_SCOPE, REDIS_URL, SECRET, SERVICE_SCOPE, Databases, assert_error
from flask import Flask
from ops_server import OpsServer, bearer, fresh
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from callora_credits import UNITS_PER_USDC, current_ledger
from callora_credits.core.ledger import Ledger
from callora_credits.metrics import METRIC_NAMES

U = UNITS_PER_USDC
CREDITS = "/api/billing/credits"


class Scrape:
    """Reads one registry's samples by name and labels (0 when absent)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def __call__(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def credits_samples(self) -> list[Any]:
        return [
            sample
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name.startswith("credits_")
        ]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def scrape(registry: CollectorRegistry) -> Scrape:
    return Scrape(registry)


def post(client: Any, path: str, headers: dict[str, str], key: str, body: Any) -> Any:
    return client.post(f"{CREDITS}{path}", headers={**headers, "Idempotency-Key": key}, json=body)


def test_counters_exact_after_a_known_sequence(
    host: Callable[..., Flask], registry: CollectorRegistry, scrape: Scrape, user_id: str
) -> None:
    app = host(CREDITS_METRICS_REGISTRY=registry)
    client = app.test_client()
    admin, service = bearer("ops_admin", ADMIN_SCOPE), bearer("gateway", SERVICE_SCOPE)

    topped = post(client, "/topup", admin, "t1", {"user_id": user_id, "amount_usdc": "10"})
    assert topped.status_code == 201
    replayed = post(client, "/topup", admin, "t1", {"user_id": user_id, "amount_usdc": "10"})
    assert replayed.headers["Idempotent-Replayed"] == "true"
    charged = post(client, "/charge", service, "c1", {"user_id": user_id, "amount_usdc": "3"})
    assert charged.status_code == 201
    short = post(client, "/charge", service, "c2", {"user_id": user_id, "amount_usdc": "100"})
    assert_error(short, 402, "INSUFFICIENT_CREDITS")
    held = post(client, "/holds", service, "h1", {"user_id": user_id, "amount_usdc": "2"})
    assert held.status_code == 201
    hold_id = held.get_json()["id"]
    captured = post(client, f"/holds/{hold_id}/capture", service, "h2", {"amount_usdc": "1.5"})
    assert captured.status_code == 200
    refunded = post(
        client,
        f"/transactions/{charged.get_json()['id']}/refund",
        admin,
        "r1",
        {"amount_usdc": "1"},
    )
    assert refunded.status_code == 201
    with app.app_context():
        ledger = current_ledger()
        ledger.adjust(user_id, -5, "a fix", idempotency_key="a1")
        ledger.adjust(user_id, -5, "a fix", idempotency_key="a1")  # replayed

    assert scrape("credits_operations_total", operation="top_up", outcome="ok") == 1
    assert scrape("credits_operations_total", operation="charge", outcome="ok") == 1
    assert (
        scrape("credits_operations_total", operation="charge", outcome="insufficient_credits") == 1
    )
    assert scrape("credits_operations_total", operation="hold", outcome="ok") == 1
    assert scrape("credits_operations_total", operation="capture", outcome="ok") == 1
    assert scrape("credits_operations_total", operation="refund", outcome="ok") == 1
    assert scrape("credits_operations_total", operation="adjust", outcome="ok") == 1
    operations = [s for s in scrape.credits_samples() if s.name == "credits_operations_total"]
    assert sum(s.value for s in operations) == 7
    assert scrape("credits_idempotent_replays_total") == 2
    assert scrape("credits_units_total", type="topup") == 10 * U
    assert scrape("credits_units_total", type="charge") == 3 * U
    assert scrape("credits_units_total", type="hold_capture") == 1.5 * U
    assert scrape("credits_units_total", type="refund") == 1 * U
    assert scrape("credits_units_total", type="adjustment") == 5
    # Each replay first lost the key's unique constraint, then ran again.
    assert scrape("credits_db_retries_total", reason="conflict") == 2
    route = "/api/billing/credits/holds/<hold_id>/capture"
    assert scrape("credits_http_requests_total", route=route, method="POST", status="200") == 1
    topup = "/api/billing/credits/topup"
    assert scrape("credits_http_requests_total", route=topup, method="POST", status="201") == 2
    assert scrape("credits_http_request_duration_seconds_count", route=topup, method="POST") == 2


def test_units_count_only_what_the_host_committed(
    host: Callable[..., Flask], registry: CollectorRegistry, scrape: Scrape, user_id: str
) -> None:
    app = host(CREDITS_METRICS_REGISTRY=registry)
    db = app.extensions["sqlalchemy"]
    with app.app_context():
        current_ledger().top_up(user_id, 7 * U, session=db.session)
        db.session.rollback()
    assert scrape("credits_units_total", type="topup") == 0
    with app.app_context():
        current_ledger().top_up(user_id, 2 * U, session=db.session)
        db.session.commit()
    assert scrape("credits_units_total", type="topup") == 2 * U


def test_every_answer_is_counted_by_url_rule(
    host: Callable[..., Flask], registry: CollectorRegistry, scrape: Scrape, user_id: str
) -> None:
    app = host(
        CREDITS_METRICS_REGISTRY=registry,
        CREDITS_RATE_LIMIT="2/minute",
        CREDITS_RATE_LIMIT_STORAGE_URI="memory://",
    )
    client = app.test_client()
    missing = f"{CREDITS}/transactions/ctx_{uuid.uuid4().hex[:24]}"
    assert client.get(missing, headers=bearer(user_id)).status_code == 404
    assert client.get(f"{CREDITS}/no/such/{user_id}", headers=bearer(user_id)).status_code == 404
    assert client.get(f"{CREDITS}/holds", headers=bearer(user_id)).status_code == 429
    assert client.get(CREDITS).status_code == 401

    def count(route: str, status: str) -> float:
        return scrape("credits_http_requests_total", route=route, method="GET", status=status)

    assert count("/api/billing/credits/transactions/<transaction_id>", "404") == 1
    assert count("/api/billing/credits/<credits_any:rest>", "404") == 1
    holds = "/api/billing/credits/holds"
    assert count(holds, "429") == 1
    assert count(CREDITS, "401") == 1
    # Timed from before the limiter's refusal, which comes before the blueprint's hooks.
    assert scrape("credits_http_request_duration_seconds_count", route=holds, method="GET") == 1
    assert scrape("credits_http_request_duration_seconds_sum", route=holds, method="GET") > 0
    for sample in scrape.credits_samples():
        assert all(user_id not in value for value in sample.labels.values()), sample


def test_without_prometheus_client_nothing_is_collected(
    host: Callable[..., Flask],
    registry: CollectorRegistry,
    scrape: Scrape,
    user_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # the import fails
    app = host(CREDITS_METRICS_REGISTRY=registry)
    client = app.test_client()
    assert client.get(CREDITS, headers=bearer(user_id)).status_code == 200
    topped = post(client, "/topup", bearer("ops_admin", ADMIN_SCOPE), "k", {"user_id": user_id})
    assert topped.status_code == 400
    with app.app_context():
        assert type(current_ledger()) is Ledger
        current_ledger().top_up(user_id, U)
    assert app.extensions["callora_credits"].metrics is None
    assert scrape.credits_samples() == []


def test_metrics_can_be_switched_off(
    host: Callable[..., Flask], registry: CollectorRegistry, scrape: Scrape, user_id: str
) -> None:
    app = host(CREDITS_METRICS_REGISTRY=registry, CREDITS_METRICS=False)
    assert app.test_client().get(CREDITS, headers=bearer(user_id)).status_code == 200
    assert scrape.credits_samples() == []


def test_apps_share_one_registry_and_a_clash_says_how_to_fix_it(
    host: Callable[..., Flask], registry: CollectorRegistry, scrape: Scrape, user_id: str
) -> None:
    first = host(CREDITS_METRICS_REGISTRY=registry)
    second = host(CREDITS_METRICS_REGISTRY=registry)
    for app in (first, second):
        assert app.test_client().get(CREDITS, headers=bearer(user_id)).status_code == 200
    assert scrape("credits_http_requests_total", route=CREDITS, method="GET", status="200") == 2
    taken = CollectorRegistry()
    Counter("credits_units", "someone else's", registry=taken)
    with pytest.raises(RuntimeError, match="CREDITS_METRICS_REGISTRY"):
        host(CREDITS_METRICS_REGISTRY=taken)


def test_the_example_app_serves_the_metrics(
    databases: Databases, user_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ops_server import EXAMPLES_DIR

    monkeypatch.syspath_prepend(str(EXAMPLES_DIR))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    from host_app import create_app

    app = create_app(
        {"SQLALCHEMY_DATABASE_URI": databases.url("sqlite"), "JWT_SECRET_KEY": SECRET}
    )
    client = app.test_client()
    before = client.get("/metrics").get_data(as_text=True)
    assert client.get(CREDITS, headers=bearer(user_id)).status_code == 200
    scraped = client.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.mimetype == "text/plain"

    def reads(text: str) -> float:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "credits_http_requests_total" and sample.labels == {
                    "route": CREDITS,
                    "method": "GET",
                    "status": "200",
                }:
                    return sample.value
        return 0.0

    assert reads(scraped.get_data(as_text=True)) == reads(before) + 1


# --- under gunicorn ------------------------------------------------------------------


@pytest.fixture
def metrics_server(databases: Databases, redis_prefix: str, tmp_path: Path) -> Iterator[OpsServer]:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    server = OpsServer(
        {
            "SQLALCHEMY_DATABASE_URI": databases.url("sqlite"),
            "JWT_SECRET_KEY": SECRET,
            "CREDITS_RATE_LIMIT": "4/minute",
            "CREDITS_RATE_LIMIT_STORAGE_URI": REDIS_URL,
            "RATELIMIT_KEY_PREFIX": redis_prefix,
        },
        tmp_path / "gunicorn.log",
        env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
    )
    yield server
    server.stop()


def test_gunicorn_metrics_count_each_answer_across_workers(metrics_server: OpsServer) -> None:
    server = metrics_server
    user, admin_id, service_id = fresh(), fresh("admin"), fresh("gateway")
    admin, service = bearer(admin_id, ADMIN_SCOPE), bearer(service_id, SERVICE_SCOPE)
    topup = {"user_id": user, "amount_usdc": "1"}
    too_much, bad = {**topup, "amount_usdc": "5"}, {**topup, "amount_usdc": "x"}
    script: list[tuple[str, str, dict[str, str], Any, int]] = [
        ("POST", "/topup", {**admin, "Idempotency-Key": "t"}, topup, 201),
        ("POST", "/topup", {**admin, "Idempotency-Key": "t"}, topup, 201),  # replay
        ("POST", "/charge", {**service, "Idempotency-Key": "c"}, too_much, 402),
        ("POST", "/charge", {**service, "Idempotency-Key": "d"}, bad, 400),
        *[("GET", "", bearer(user), None, 200)] * 4,
        *[("GET", "", bearer(user), None, 429)] * 2,
        *[("GET", "", {}, None, 401)] * 2,
    ]
    workers = set()
    for method, path, headers, body, status in script:
        reply = server.request(method, CREDITS + path, headers, body)
        assert reply.status == status, (method, path, reply.body)
        workers.add(reply.worker)
    # Sequential requests may all be accepted by the same worker; requests
    # sent four at a time keep one worker busy while another accepts.
    not_found = 0

    def nowhere(_: int) -> Any:
        return server.request("GET", f"{CREDITS}/nowhere", bearer(fresh()))

    with ThreadPoolExecutor(4) as pool:
        while not_found < 1 or (len(workers) < 2 and not_found < 200):
            for reply in pool.map(nowhere, range(4)):
                assert reply.status == 404
                workers.add(reply.worker)
                not_found += 1
    assert len(workers) == 2

    scraped = server.request("GET", "/metrics")
    assert scraped.status == 200
    samples = [
        sample
        for family in text_string_to_metric_families(scraped.body.decode())
        for sample in family.samples
        if sample.name.startswith("credits_")
    ]

    def value(name: str, **labels: str) -> float:
        found = [s.value for s in samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels)
        return found[0] if found else 0.0

    def requests(route: str, method: str, status: int) -> float:
        route = "/api/billing/credits" + route
        return value("credits_http_requests_total", route=route, method=method, status=str(status))

    assert requests("/topup", "POST", 201) == 2
    assert requests("/charge", "POST", 402) == 1
    assert requests("/charge", "POST", 400) == 1
    assert requests("", "GET", 200) == 4
    assert requests("", "GET", 429) == 2
    assert requests("", "GET", 401) == 2
    assert requests("/<credits_any:rest>", "GET", 404) == not_found
    http_total = sum(s.value for s in samples if s.name == "credits_http_requests_total")
    assert http_total == len(script) + not_found
    get_count = value("credits_http_request_duration_seconds_count", route=CREDITS, method="GET")
    assert get_count == 8
    assert value("credits_operations_total", operation="top_up", outcome="ok") == 1
    assert (
        value("credits_operations_total", operation="charge", outcome="insufficient_credits") == 1
    )
    assert value("credits_idempotent_replays_total") == 1
    assert value("credits_units_total", type="topup") == U
    exported = {family.name for family in text_string_to_metric_families(scraped.body.decode())}
    for name in METRIC_NAMES:
        assert name.removesuffix("_total") in exported, name
    users = {user, admin_id, service_id}
    for sample in samples:
        assert not users & set(sample.labels.values()), sample
