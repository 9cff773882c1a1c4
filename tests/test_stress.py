"""Load through gunicorn, then every end-state invariant.

The short form of ``make stress`` (docs/reliability.md): the stress host app
(``stress/app.py``) under gunicorn with several worker processes, client
processes sending a mixed stream of balance reads, top-ups, charges, holds,
captures, releases and refunds over HTTP on a few hot accounts and many cold
ones, a share of them replayed with the same idempotency key (some
concurrently). Then ``stress.harness.verify`` holds the database to what the
clients saw: balance == ledger, gapless ``seq``, a consistent
``balance_after`` chain, nothing negative, every answered success stored
exactly once and as answered, every stored outcome byte for byte the answer,
no key applied twice, ``Ledger.reconcile()`` clean. On PostgreSQL the same
run goes through a PgBouncer in transaction pooling mode as well.

The run gets a database of its own per engine for this module: the
whole-database reconcile must see only the harness's rows (other tests insert
deliberately inconsistent ones), and creating one costs well under a second.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for `stress`, the harness beside the package

from stress.harness import FreshDatabases, RunConfig, run  # noqa: E402

pytestmark = pytest.mark.slow

SQLITE_REASON = (
    "gunicorn workers share a database server here; SQLite is one file whose write "
    "lock serializes every unit (covered by the in-process concurrency tests)"
)


@pytest.fixture(scope="module")
def stress_databases() -> Iterator[FreshDatabases]:
    databases = FreshDatabases()
    yield databases
    databases.drop_all()


@pytest.fixture
def server_engine(engine_name: str) -> str:
    if engine_name == "sqlite":
        pytest.skip(SQLITE_REASON)
    return engine_name


def test_load_through_gunicorn_keeps_every_invariant(
    server_engine: str, stress_databases: FreshDatabases, tmp_path: Path
) -> None:
    check_load(server_engine, stress_databases, tmp_path)


def test_load_through_pgbouncer_keeps_every_invariant(
    stress_databases: FreshDatabases, tmp_path: Path
) -> None:
    """The same, with the app on PostgreSQL through a PgBouncer in transaction
    pooling mode (four server connections for every worker's pool)."""
    from conftest import ENGINES
    from pgbouncer import find_pgbouncer, skip_or_fail_without_pgbouncer

    if "postgresql" not in ENGINES:
        pytest.skip("PgBouncer runs in front of PostgreSQL: CREDITS_TEST_POSTGRES_URL is not set")
    if find_pgbouncer() is None:
        skip_or_fail_without_pgbouncer()
    check_load("pgbouncer", stress_databases, tmp_path)


def check_load(server_engine: str, stress_databases: FreshDatabases, tmp_path: Path) -> None:
    report = run(
        RunConfig(
            engine=server_engine,
            seconds=12,
            clients=2,
            client_threads=3,
            workers=3,
            worker_threads=4,
            cold_users=150,
            database_url=stress_databases.url(server_engine),
            artifacts=tmp_path,
        )
    )
    summary = report.summary()
    print(summary)
    assert report.problems() == [], summary
    # The load happened and exercised what it claims to.
    assert sum(report.ops.values()) >= 100, summary
    for op in ("balance", "topup", "charge", "hold", "capture", "release", "refund"):
        assert report.ops[op] > 0, summary
    assert report.replays_checked > 0, summary
    assert report.concurrent_pairs > 0, summary
    assert report.checks["stored outcome == the answer, byte for byte"] > 0, summary


# --- how the clients take a 503 (no server needed) ------------------------------------


class _Scripted:
    """An ``Http`` that answers from a list, the last answer repeating."""

    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.sent = 0

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Any:
        self.sent += 1
        return self.replies[min(self.sent, len(self.replies)) - 1]


def _worker(monkeypatch: pytest.MonkeyPatch, **config: Any) -> Any:
    from stress import client

    monkeypatch.setattr(client.time, "sleep", lambda seconds: None)
    cfg = client.ClientConfig(
        host="127.0.0.1",
        port=1,
        prefix="t",
        hot_users=["hot"],
        cold_users=["cold"],
        seed=1,
        start_time=0.0,
        end_time=0.0,
        jwt_secret="s" * 32,
        **config,
    )
    return client.Worker(cfg, "w", client.Recorder())


def _reply(status: int, code: str, retry_after: str | None = None) -> Any:
    from stress.client import Reply

    headers = {"retry-after": retry_after} if retry_after is not None else {}
    return Reply(status, f'{{"code": "{code}"}}'.encode(), headers)


UNAVAILABLE = ("SERVICE_UNAVAILABLE", "1")


def test_a_503_is_retried_with_the_same_key_and_is_not_a_server_error(monkeypatch):
    worker = _worker(monkeypatch)
    worker.http = _Scripted([_reply(503, *UNAVAILABLE), _reply(201, "")])
    out = worker._send(worker.http, "POST", "/x", b"{}", {}, "charge", "k1")
    assert (out.reply.status, out.attempts) == (201, 2)
    recorder = worker.recorder
    assert (recorder.unavailable, recorder.server_errors) == (1, [])
    assert recorder.retries["service_unavailable"] == 1


def test_a_503_without_retry_after_or_its_code_is_a_server_error(monkeypatch):
    for odd in (_reply(503, "SERVICE_UNAVAILABLE"), _reply(503, "INTERNAL_SERVER_ERROR", "1")):
        worker = _worker(monkeypatch)
        worker.http = _Scripted([odd, _reply(201, "")])
        worker._send(worker.http, "POST", "/x", b"{}", {}, "charge", "k1")
        assert worker.recorder.unavailable == 0
        assert len(worker.recorder.server_errors) == 1


def test_a_request_unavailable_through_every_retry_is_allowed_and_unanswered(monkeypatch):
    worker = _worker(monkeypatch, max_attempts=3, replay_share=0.0, concurrent_share=0.0)
    worker.http = _Scripted([_reply(503, *UNAVAILABLE)])
    reply = worker.mutate("charge", "/x", "Bearer t", {"amount_usdc": "1"})
    recorder = worker.recorder
    assert reply is None
    assert recorder.unavailable >= 3
    assert recorder.unresolved == []  # not a problem of the run
    assert [item["op"] for item in recorder.unavailable_final] == ["charge"]
    # Checked as "applied at most once" (a connection lost during COMMIT).
    assert recorder.requests[-1]["status"] is None
