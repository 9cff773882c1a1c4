"""Orchestration and end-state checks of a load run.

:func:`run` creates (or reuses) a migrated database, starts the stress host
under gunicorn, runs client processes and, optionally, a fault injector,
stops everything, and checks the database against what the clients saw
(:func:`verify`). The returned :class:`Report` lists every problem found;
an empty :meth:`Report.problems` is a clean run.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

from callora_credits import migrate
from callora_credits.core.records import Allocation, Entry
from callora_credits.db.models import (
    Account,
    AllocationRow,
    HoldRow,
    IdempotencyRecord,
    LedgerEntry,
)

from .app import DEFAULT_JWT_SECRET, create_app
from .client import ClientConfig, client_main
from .faults import ConnectionKiller, FaultInjector, TcpProxy, WorkerKiller, child_pids
from .pgbouncer import PgBouncer

__all__ = [
    "FAULTS",
    "Report",
    "RunConfig",
    "admin_url",
    "create_database",
    "drop_database",
    "run",
    "verify",
]

ROOT = Path(__file__).resolve().parent.parent
FAULTS = ("none", "connections", "workers", "outage", "nodes", "isolate", "all")
DEFAULT_SERVERS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/",
}
SERVER_ENV = {"postgresql": "CREDITS_TEST_POSTGRES_URL", "mysql": "CREDITS_TEST_MYSQL_URL"}
#: Engines that run on another's server: the app reaches PostgreSQL through a
#: PgBouncer in transaction pooling mode (stress/pgbouncer.py).
THROUGH = {"pgbouncer": "postgresql"}
#: A three-node Galera cluster of its own (``tests/galera.py``), a host per node.
GALERA = "galera"
ENGINES = (*SERVER_ENV, *THROUGH, GALERA)
#: Server connections of the bouncer per database and user: fewer than the
#: app's connections, so transactions move between server connections.
BOUNCER_POOL_SIZE = 4
UNITS = 10_000_000

# A 500 whose traceback ends in one of these was caused by an injected fault.
_FAULT_ERRORS = re.compile(
    r"OperationalError|InterfaceError|server closed the connection|terminating connection"
    r"|Lost connection|Connection refused|connection is closed|Can't connect|gone away"
    r"|consuming input failed|ConnectionResetError|BrokenPipeError|connection failed"
    r"|the connection is lost|connection timeout expired|QueuePool limit"
    r"|Connection reset by peer|administrator command|Broken pipe",
    re.IGNORECASE,
)


# --- databases -------------------------------------------------------------------


def server_url(engine: str) -> URL:
    """The server to use for ``engine``: the test suite's variable or the default."""
    engine = THROUGH.get(engine, engine)
    return make_url(os.environ.get(SERVER_ENV[engine]) or DEFAULT_SERVERS[engine])


def admin_url(url: str | URL) -> URL:
    """A URL on the same server that is not the test database."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(database="postgres")
    return parsed.set(database="information_schema")


def create_database(engine: str) -> str:
    """A fresh, migrated database on ``engine``'s server; returns its URL."""
    server = server_url(engine)
    name = f"credits_stress_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url(server), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if server.get_backend_name() == "mysql":
                conn.exec_driver_sql(
                    f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                )
            else:
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        admin.dispose()
    url = server.set(database=name).render_as_string(hide_password=False)
    db = sa.create_engine(url, poolclass=NullPool)
    try:
        migrate.upgrade(db)
    finally:
        db.dispose()
    return url


def drop_database(url: str) -> None:
    parsed = make_url(url)
    admin = sa.create_engine(admin_url(parsed), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if parsed.get_backend_name() == "postgresql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {parsed.database} WITH (FORCE)")
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {parsed.database}")
    finally:
        admin.dispose()


# --- the server --------------------------------------------------------------------


class FreshDatabases:
    """Fresh, migrated databases created on demand, one per engine, all
    dropped by :meth:`drop_all` (for tests that must not share one)."""

    def __init__(self) -> None:
        self.urls: dict[str, str] = {}

    def url(self, engine: str) -> str:
        if engine not in self.urls:
            self.urls[engine] = create_database(engine)
        return self.urls[engine]

    def drop_all(self) -> None:
        for url in self.urls.values():
            drop_database(url)


class Server:
    """The stress host under gunicorn, in its own process group."""

    def __init__(
        self,
        database_url: str,
        *,
        workers: int,
        threads: int,
        log_path: Path,
        secret: str,
        db_retry_seconds: float | None = None,
    ) -> None:
        self.db_retry_seconds = db_retry_seconds
        self.database_url = database_url
        self.workers = workers
        self.threads = threads
        self.log_path = log_path
        self.secret = secret
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 60) -> None:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            DATABASE_URL=self.database_url,
            STRESS_LOG="1",
            STRESS_WORKERS=str(self.workers),
            STRESS_THREADS=str(self.threads),
            STRESS_POOL_SIZE=os.environ.get("STRESS_POOL_SIZE", str(self.threads)),
            STRESS_JWT_SECRET=self.secret,
            STRESS_BIND="127.0.0.1:0",
        )
        if self.db_retry_seconds is not None:
            env["STRESS_DB_RETRY_SECONDS"] = str(self.db_retry_seconds)
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "python:stress.gunicorn_conf",
            "stress.app:app",
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.register(self.stop)  # even if the caller never reaches its finally
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            found = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", text)
            if found and text.count("Booting worker with pid") >= self.workers:
                self.port = int(found.group(1))
                if self._answers():
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start-up:\n{text[-3000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not become ready:\n{self.log_text()[-3000:]}")

    def _answers(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/api/billing/openapi.json")
            response = conn.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            return False
        finally:
            conn.close()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return child_pids(self.pid)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM (workers log their retry counts), then SIGKILL the group."""
        if self.proc is None:
            return
        atexit.unregister(self.stop)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(20)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


# --- configuration and report ------------------------------------------------------


@dataclass
class RunConfig:
    """One load run. ``database_url`` reuses a migrated database (the test
    suite's); without it the run creates and drops its own."""

    engine: str
    seconds: float = 10.0
    clients: int = 2
    client_threads: int = 3
    workers: int = 4
    worker_threads: int = 4
    fault: str = "none"
    hot_users: int = 3
    cold_users: int = 200
    database_url: str | None = None
    seed: int | None = None
    request_timeout: float = 15.0
    phase_seconds: float = 15.0
    outage_seconds: float = 1.0
    #: The app's CREDITS_DB_RETRY_SECONDS (None: the library's default, 5 s);
    #: below the outage, requests during it end in 503 SERVICE_UNAVAILABLE.
    db_retry_seconds: float | None = None
    run_cli_reconcile: bool = False
    artifacts: Path | None = None


@dataclass
class Report:
    """What a run did and found."""

    engine: str
    fault: str
    seconds: float = 0.0
    elapsed: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    client_retries: Counter[str] = field(default_factory=Counter)
    library_retries: Counter[str] = field(default_factory=Counter)
    library_retries_logged: Counter[str] = field(default_factory=Counter)
    workers_reporting: int = 0
    workers_booted: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    fault_hits: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    client_problems: list[str] = field(default_factory=list)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    unavailable: int = 0
    unavailable_final: list[dict[str, Any]] = field(default_factory=list)
    unexplained_500s: list[dict[str, Any]] = field(default_factory=list)
    timeouts: int = 0
    max_latency: float = 0.0
    replays_checked: int = 0
    concurrent_pairs: int = 0
    requests: int = 0
    entries: int = 0
    holds: int = 0
    reconcile: str = ""
    log_path: str = ""
    phases: dict[str, float] = field(default_factory=dict)

    def problems(self) -> list[str]:
        """Every broken guarantee, one line each; empty for a clean run."""
        found = list(self.client_problems)
        for name, messages in self.violations.items():
            found.extend(f"[{name}] {message}" for message in messages[:20])
            if len(messages) > 20:
                found.append(f"[{name}] … {len(messages) - 20} more")
        if self.fault == "none" and self.server_errors:
            found.append(f"{len(self.server_errors)} 5xx answers without any injected fault")
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for error in self.unexplained_500s:
            groups[error.get("exception") or "(no traceback in the log)"].append(error)
        for exception, errors in groups.items():
            first = errors[0]
            found.append(
                f"{len(errors)} x 5xx not caused by a fault: {exception}; first: "
                f"{first['method']} {first['path']} key={first['key']} -> {first['status']} "
                f"{first['body'][:200]}\n{first['traceback'][-2500:]}"
            )
        if self.timeouts:
            found.append(f"{self.timeouts} requests hit the client timeout")
        return found

    def summary(self) -> str:
        """A human summary (what `make stress` prints)."""
        total = sum(self.ops.values())
        lines = [
            f"== {self.engine} / faults: {self.fault} / {self.seconds:.0f}s of load "
            f"({self.elapsed:.0f}s in all)",
            f"operations: {total} ({total / max(self.seconds, 1):.0f}/s): "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())),
            "final statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
            f"idempotent replays compared byte for byte: {self.replays_checked} "
            f"(concurrent pairs: {self.concurrent_pairs})",
            "faults injected: "
            + (
                ", ".join(
                    f"{k} {v} events ({self.fault_hits[k]} hit)" for k, v in self.faults.items()
                )
                or "none"
            ),
            "client retries (same key): "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.client_retries.items())) or "none"),
            f"5xx answers (all retried): {len(self.server_errors)}",
            f"503 SERVICE_UNAVAILABLE answers (allowed, retried): {self.unavailable}; "
            f"requests left unavailable through every retry: {len(self.unavailable_final)}",
            "library retries (stats.counts of "
            f"{self.workers_reporting} exited workers): "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.library_retries.items())) or "none"),
            "library retries (log lines, all workers incl. killed): "
            + (
                ", ".join(f"{k} {v}" for k, v in sorted(self.library_retries_logged.items()))
                or "none"
            ),
            f"max latency {self.max_latency:.2f}s; client timeouts {self.timeouts}",
            f"database: {self.entries} ledger entries, {self.holds} holds; reconcile: "
            f"{self.reconcile}",
            f"invariants checked ({sum(self.checks.values())} checks): "
            + ", ".join(f"{k} x{v}" for k, v in sorted(self.checks.items())),
        ]
        problems = self.problems()
        lines.append(
            "RESULT: " + ("clean, nothing lost or applied twice" if not problems else "PROBLEMS")
        )
        lines.extend(f"  - {p}" for p in problems[:60])
        lines.append("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.phases.items()))
        lines.append(f"server log: {self.log_path}")
        return "\n".join(lines)


# --- the run ------------------------------------------------------------------------


def _app_url(database_url: str, proxy: TcpProxy | None) -> str:
    if proxy is None:
        return database_url
    parsed = make_url(database_url)
    return parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def run(config: RunConfig) -> Report:
    """Run the load (and faults) of ``config``; return what was checked and found."""
    if config.engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}")
    if config.fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}")
    started = time.monotonic()
    seed = config.seed if config.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    prefix = f"st{uuid.uuid4().hex[:8]}-"
    artifacts = config.artifacts or Path(tempfile.mkdtemp(prefix="callora-stress-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    report = Report(engine=config.engine, fault=config.fault, seconds=config.seconds)
    report.log_path = str(artifacts / "gunicorn.log")

    galera = config.engine == GALERA
    cluster: Any = None
    if galera:
        cluster = _start_cluster(report)
        database_url = cluster.urls()[0]
        own_database = False
    else:
        own_database = config.database_url is None
        database_url = config.database_url or create_database(config.engine)
    proxy: TcpProxy | None = None
    bouncer: PgBouncer | None = None
    servers: list[Server] = []
    killers: list[ConnectionKiller] = []
    injector: FaultInjector | None = None
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        parsed = make_url(database_url)
        default_port = 3306 if parsed.get_backend_name() == "mysql" else 5432
        upstream = (parsed.host or "127.0.0.1", parsed.port or default_port)
        if config.fault in ("outage", "all") and not galera:
            proxy = TcpProxy(*upstream)
            proxy.start()
            upstream = ("127.0.0.1", proxy.port)
        if config.engine in THROUGH:
            # The app -> PgBouncer -> (the outage proxy ->) PostgreSQL.
            bouncer = PgBouncer(*upstream, pool_size=BOUNCER_POOL_SIZE).start()
        if galera:
            node_urls = cluster.urls()
        elif bouncer is not None:
            node_urls = [bouncer.url(database_url)]
        else:
            node_urls = [_app_url(database_url, proxy)]
        mark = time.monotonic()
        for number, url in enumerate(node_urls):
            # On the cluster: one host per node, the workers shared out.
            servers.append(
                Server(
                    url,
                    workers=max(1, config.workers // len(node_urls)),
                    threads=config.worker_threads,
                    log_path=artifacts
                    / ("gunicorn.log" if number == 0 else f"gunicorn-{number + 1}.log"),
                    secret=DEFAULT_JWT_SECRET,
                    db_retry_seconds=config.db_retry_seconds,
                )
            )
            servers[-1].start()
        report.phases["server start"] = time.monotonic() - mark

        start_at = time.time() + 1.5  # spawned clients import first, then start together
        end_at = start_at + config.seconds
        hot = [f"{prefix}hot{i}" for i in range(config.hot_users)]
        cold = [f"{prefix}cold{i}" for i in range(config.cold_users)]
        context = multiprocessing.get_context("spawn")
        for index in range(config.clients):
            client_config = ClientConfig(
                host="127.0.0.1",
                port=servers[index % len(servers)].port,
                prefix=prefix,
                hot_users=hot,
                cold_users=cold,
                seed=seed + index,
                start_time=start_at,
                end_time=end_at,
                threads=config.client_threads,
                jwt_secret=DEFAULT_JWT_SECRET,
                request_timeout=config.request_timeout,
            )
            process = context.Process(
                target=client_main,
                args=(client_config, index, str(artifacts / f"client-{index}.json")),
                name=f"stress-client-{index}",
                daemon=True,
            )
            process.start()
            processes.append(process)

        plan: dict[str, Any] = {}
        if config.fault in ("connections", "all"):
            for url in cluster.urls() if galera else [database_url]:
                killers.append(ConnectionKiller(admin_url(url), make_url(url).database))
            plan["connections"] = (_rotating(killers, rng), (0.4, 1.0))
        if galera:
            # Isolation first: a restarted node can take most of its phase.
            if config.fault in ("isolate", "all"):
                plan["isolate"] = (_NodeFaults(cluster, rng).isolate_and_rejoin, (1.0, 2.0))
            if config.fault in ("nodes", "all"):
                plan["nodes"] = (_NodeFaults(cluster, rng).kill_and_restart, (1.0, 2.0))
        elif config.fault in ("workers", "all"):
            plan["workers"] = (WorkerKiller(servers[0].pid, rng).kill_once, (1.5, 2.5))
        if proxy is not None:
            outage = config.outage_seconds
            plan["outage"] = (lambda: proxy.outage(outage), (1.5, 3.0))
        if plan:
            injector = FaultInjector(
                plan,
                start_at=start_at + 0.5,
                stop_at=end_at,
                phase_seconds=config.phase_seconds,
                rng=rng,
            )
            injector.start()

        bound = config.seconds + 1.5 + 2 * 40 + 90  # load + start + retry budgets + slack
        deadline = time.monotonic() + bound
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        report.phases["drain after the load"] = max(0.0, time.time() - end_at)
        if injector is not None:
            injector.halt()
            report.faults.update(injector.events)
            report.fault_hits.update(injector.hits)
            report.client_problems.extend(f"fault injector: {e}" for e in injector.errors)
        for process in processes:
            if process.is_alive():
                report.client_problems.append(f"{process.name} did not finish in {bound:.0f}s")
                process.kill()
                process.join(5)
            elif process.exitcode != 0:
                report.client_problems.append(f"{process.name} exited with {process.exitcode}")
        mark = time.monotonic()
        for each in servers:
            each.stop()
        report.phases["server stop"] = time.monotonic() - mark
        logs = "\n".join(each.log_text() for each in servers)
        _read_server_log(report, logs)
        records = _read_clients(report, artifacts, config.clients)
        _explain_server_errors(report, logs)
        mark = time.monotonic()
        if galera:
            # Every node holds every row: each is checked on its own, and
            # their tables compared.
            cluster.wait_synced()
            cluster.catch_up()
            for url in cluster.urls():
                verify(url, prefix, records, report)
            report.client_problems.extend(_cluster_differences(cluster))
        else:
            verify(database_url, prefix, records, report)
        report.phases["verify"] = time.monotonic() - mark
        if config.run_cli_reconcile:
            report.reconcile += "; " + _cli_reconcile(database_url, report)
    finally:
        if injector is not None and injector.is_alive():
            injector.halt()
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        for each in servers:
            each.stop()
        for killer in killers:
            killer.close()
        if bouncer is not None:
            bouncer.stop()
        if proxy is not None:
            proxy.stop()
        if own_database:
            drop_database(database_url)
        if cluster is not None:
            cluster.stop()
    report.elapsed = time.monotonic() - started
    return report


def _start_cluster(report: Report) -> Any:
    """The three-node Galera cluster of ``tests/galera.py``, started and migrated."""
    sys.path.insert(0, str(ROOT / "tests"))
    from galera import GaleraCluster, prerequisites

    missing = prerequisites()
    if missing is not None:
        raise RuntimeError(f"cannot run the Galera cluster: {missing}")
    mark = time.monotonic()
    cluster = GaleraCluster()
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    report.phases["cluster start"] = time.monotonic() - mark
    return cluster


def _rotating(killers: list[ConnectionKiller], rng: random.Random) -> Any:
    """Kill the connections of one node (at random) at a time."""
    return lambda: rng.choice(killers).kill_once()


class _NodeFaults:
    """Node faults on the cluster: one node at a time, back before the next."""

    def __init__(self, cluster: Any, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng

    def kill_and_restart(self) -> int:
        index = self.rng.randrange(len(self.cluster.nodes))
        self.cluster.kill(index)
        time.sleep(1.0)
        self.cluster.restart(index)
        return 1

    def isolate_and_rejoin(self) -> int:
        index = self.rng.randrange(len(self.cluster.nodes))
        self.cluster.isolate(index)
        time.sleep(1.0)
        self.cluster.rejoin(index)
        return 1


#: The tables compared across nodes after a cluster run.
_TABLES = (
    "credits",
    "credits_transactions",
    "credits_holds",
    "credits_grants",
    "credits_allocations",
    "credits_idempotency",
)


def _cluster_differences(cluster: Any) -> list[str]:
    """Tables whose checksum differs between node 1 and another node."""
    sums = []
    for index in range(len(cluster.nodes)):
        rows = cluster.sql(
            index, "CHECKSUM TABLE " + ", ".join(f"{cluster.database}.{t}" for t in _TABLES)
        )
        sums.append({str(name): value for name, value in rows})
    return [
        f"node{index + 1}: {table} differs from node1's"
        for index in range(1, len(sums))
        for table, value in sums[index].items()
        if value != sums[0].get(table)
    ]


def _read_server_log(report: Report, text: str) -> None:
    report.workers_booted = text.count("Booting worker with pid")
    for match in re.finditer(r"credits-retry-stats pid=\d+ (\{.*\})", text):
        report.workers_reporting += 1
        report.library_retries.update(json.loads(match.group(1)))
    for match in re.finditer(r"credits: retrying a transaction \((\w+), attempt \d+\)", text):
        report.library_retries_logged[match.group(1)] += 1


def _read_clients(report: Report, artifacts: Path, clients: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for index in range(clients):
        path = artifacts / f"client-{index}.json"
        if not path.exists():
            report.client_problems.append(f"client {index} wrote no record")
            continue
        data = json.loads(path.read_text())
        records.extend(data["requests"])
        report.ops.update(data["ops"])
        report.statuses.update(data["statuses"])
        report.client_retries.update(data["retries"])
        report.server_errors.extend(data["server_errors"])
        report.unavailable += data["unavailable"]
        report.unavailable_final.extend(data["unavailable_final"])
        report.timeouts += data["timeouts"]
        report.max_latency = max(report.max_latency, data["max_latency"])
        report.replays_checked += data["replays_checked"]
        report.concurrent_pairs += data["concurrent_pairs"]
        for item in data["unresolved"]:
            report.client_problems.append(f"never answered after retries: {json.dumps(item)}")
        for item in data["unexpected"]:
            report.client_problems.append(f"unexpected answer: {json.dumps(item)[:800]}")
        report.client_problems.extend(data["anomalies"])
    report.requests = len(records)
    return records


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d|^\[\d{4}-")


def _tracebacks(text: str) -> dict[str, str]:
    """request id → the log record (with its traceback) of each 500."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.search(r"request_id=(\S+) credits: unhandled error", line)
        if match is None:
            continue
        block = [line]
        for following in lines[index + 1 : index + 200]:
            if _LOG_LINE.match(following):
                break
            block.append(following)
        found[match.group(1)] = "\n".join(block)
    return found


def _explain_server_errors(report: Report, text: str) -> None:
    """A 5xx is fine under a fault only if its traceback is a connection error."""
    tracebacks = _tracebacks(text)
    for error in report.server_errors:
        record = tracebacks.get(error.get("request_id") or "")
        last = record.strip().splitlines()[-1] if record else ""
        error["exception"] = last
        if report.fault == "none" or record is None or not _FAULT_ERRORS.search(record):
            report.unexplained_500s.append({**error, "traceback": record or "(none in the log)"})


def _cli_reconcile(database_url: str, report: Report) -> str:
    env = dict(os.environ)
    env.update(
        FLASK_APP="stress.app:app",
        DATABASE_URL=database_url,
        PYTHONPATH=str(ROOT),
    )
    flask = Path(sys.executable).with_name("flask")
    command = [str(flask) if flask.exists() else shutil.which("flask") or "flask"]
    result = subprocess.run(  # noqa: S603 - our own virtualenv's flask
        [*command, "credits", "reconcile"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    report.checks["flask credits reconcile exits 0"] += 1
    if result.returncode != 0:
        report.violations["flask credits reconcile"].append(output[-2000:])
    return f"`flask credits reconcile`: {output.splitlines()[-1] if output else '?'}"


# --- the checks -----------------------------------------------------------------------


def _units(text: str) -> int:
    whole, _, frac = text.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * UNITS + int((frac + "0000000")[:7]))


def _naive_utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class _Checker:
    def __init__(self, report: Report) -> None:
        self.report = report

    def __call__(self, name: str, ok: bool, message: str | None = None) -> bool:
        self.report.checks[name] += 1
        if not ok:
            self.report.violations[name].append(message or "failed")
        return ok


def verify(
    database_url: str, prefix: str, records: list[dict[str, Any]], report: Report
) -> Report:
    """Check the database against the clients' records; fill ``report``.

    Invariants: every balance equals the sum of its ledger and never goes
    negative, nor does the available balance; ``seq`` runs 1, 2, 3… and each
    ``balance_after`` follows; every row was written by a known request and no
    request's key was applied twice; every request a client saw succeed is in
    the ledger or the holds table exactly once, as answered; every stored
    outcome is the one answered, byte for byte; the library's reconcile is
    clean.
    """
    check = _Checker(report)
    like = prefix + "%"
    engine = sa.create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            a, t = Account.__table__, LedgerEntry.__table__
            h, i = HoldRow.__table__, IdempotencyRecord.__table__
            accounts = {
                r.user_id: r for r in conn.execute(sa.select(a).where(a.c.user_id.like(like)))
            }
            entries = list(conn.execute(sa.select(t).where(t.c.user_id.like(like))))
            holds = {r.id: r for r in conn.execute(sa.select(h).where(h.c.user_id.like(like)))}
            al = AllocationRow.__table__
            drawn: dict[str, list[Allocation]] = defaultdict(list)
            for row in conn.execute(
                sa.select(al)
                .where(al.c.user_id.like(like), al.c.entry_id.is_not(None))
                .order_by(al.c.entry_id, al.c.position)
            ):
                drawn[row.entry_id].append(Allocation(row.grant_id, int(row.amount_units)))
            stored: dict[str, list[Any]] = defaultdict(list)
            for row in conn.execute(sa.select(i).where(i.c.idempotency_key.like(like))):
                stored[row.idempotency_key].append(row)
        now = _naive_utc_now()
    finally:
        engine.dispose()
    report.entries, report.holds = len(entries), len(holds)

    by_id = {row.id: row for row in entries}
    by_user: dict[str, list[Any]] = defaultdict(list)
    for row in entries:
        by_user[row.user_id].append(row)
    holds_by_user: dict[str, list[Any]] = defaultdict(list)
    for row in holds.values():
        holds_by_user[row.user_id].append(row)

    # 1. Each account against its own ledger.
    for user_id, account in accounts.items():
        rows = sorted(by_user.get(user_id, []), key=lambda r: r.seq)
        total = sum(int(r.amount_units) for r in rows)
        balance = int(account.balance_units)
        check(
            "balance == sum of ledger amounts",
            total == balance,
            f"{user_id}: balance {balance} != ledger sum {total}",
        )
        seqs = [int(r.seq) for r in rows]
        check(
            "seq gapless 1..last_seq",
            seqs == list(range(1, len(rows) + 1)) and len(rows) == int(account.last_seq),
            f"{user_id}: seqs {seqs[:10]}… ({len(seqs)}) last_seq {account.last_seq}",
        )
        running = 0
        for row in rows:
            running += int(row.amount_units)
            check(
                "balance_after chain consistent",
                int(row.balance_after_units) == running,
                f"{user_id} seq {row.seq}: balance_after {row.balance_after_units} != {running}",
            )
            check("balance never negative", running >= 0, f"{user_id} seq {row.seq}: {running}")
        check("balance never negative", balance >= 0, f"{user_id}: balance {balance}")
        held = sum(
            int(hold.amount_units)
            for hold in holds_by_user.get(user_id, [])
            if hold.status == "pending" and hold.expires_at > now
        )
        check(
            "available never negative",
            balance - held >= 0,
            f"{user_id}: balance {balance} - live holds {held} < 0",
        )
    for user_id in by_user:
        check("entries have an account", user_id in accounts, f"{user_id} has no account row")

    # 2. Holds against their capture entries.
    captures: dict[str, list[Any]] = defaultdict(list)
    for row in entries:
        if row.type == "hold_capture":
            captures[row.hold_id].append(row)
    for hold_id, hold in holds.items():
        found = captures.get(hold_id, [])
        if hold.status == "captured":
            ok = (
                len(found) == 1
                and found[0].id == hold.transaction_id
                and -int(found[0].amount_units) == int(hold.captured_units)
                and found[0].user_id == hold.user_id
            )
            check("captured hold has exactly its one entry", ok, f"{hold_id}: {found!r}")
        else:
            check(
                "unresolved/released hold has no entry",
                not found and int(hold.captured_units) == 0,
                f"{hold_id} ({hold.status}): {found!r}",
            )
    for hold_id in captures:
        check("capture entries point at a hold", hold_id in holds, f"{hold_id} is not a hold")

    # 3. Every row written by a known request; no key applied twice.
    requests = {r["key"]: r for r in records}
    entry_tags: dict[str, list[Any]] = defaultdict(list)
    hold_tags: dict[str, list[Any]] = defaultdict(list)
    for row in entries:
        if row.type in ("topup", "charge"):
            entry_tags[json.loads(row.metadata_json).get("stress_key", "")].append(row)
        elif row.type == "refund":
            entry_tags[row.description or ""].append(row)
    for hold in holds.values():
        hold_tags[json.loads(hold.metadata_json).get("stress_key", "")].append(hold)
    for tag, rows in [*entry_tags.items(), *hold_tags.items()]:
        check(
            "every row written by a request a client sent",
            tag in requests,
            f"{len(rows)} rows tagged {tag!r}, a key no client sent",
        )
        check("every key applied at most once", len(rows) <= 1, f"{tag}: {len(rows)} rows")

    # 4. Every request against the database.
    refunded: Counter[str] = Counter()
    refund_unknown: set[str] = set()
    for key, request in requests.items():
        op, status = request["op"], request["status"]
        rows = hold_tags.get(key, []) if op == "hold" else entry_tags.get(key, [])
        if op in ("topup", "charge", "refund", "hold"):
            check("every key applied at most once", len(rows) <= 1, f"{key}: {len(rows)} rows")
        records_stored = stored.get(key, [])
        if status is None:  # never answered: at most once is all we can ask
            if op == "refund":
                refund_unknown.add(request["path"].split("/")[-2])
            continue
        body = request["body"]
        check(
            "stored outcome == the answer, byte for byte",
            len(records_stored) == 1
            and int(records_stored[0].status_code) == status
            and records_stored[0].response_body == body,
            f"{key}: answered {status} {body[:200]}; stored "
            + repr([(r.status_code, r.response_body[:200]) for r in records_stored]),
        )
        data = json.loads(body)
        if status >= 300:
            check(
                "a refused request wrote nothing",
                not rows,
                f"{key} ({op} {status}) wrote {[r.id for r in rows]}",
            )
            if data.get("code") == "DUPLICATE_REFERENCE":
                existing = data["details"][0].get("transaction_id")
                reference = request["payload"]["reference"]
                owner = next(
                    (
                        r
                        for r in by_user.get(request["payload"]["user_id"], [])
                        if r.type == "topup" and r.reference == reference
                    ),
                    None,
                )
                check(
                    "duplicate reference names the entry that holds it",
                    owner is not None and owner.id == existing,
                    f"{key}: details name {existing}, ledger has {owner and owner.id}",
                )
            continue
        if op in ("topup", "charge", "refund"):
            row = by_id.get(data["id"])
            if not check(
                "every success is in the ledger exactly once",
                row is not None and [r.id for r in rows] == [data["id"]],
                f"{key}: answered {data['id']}; rows tagged {[r.id for r in rows]}",
            ):
                continue
            assert row is not None
            shown = Entry.from_row(row, allocations=tuple(drawn.get(row.id, ()))).as_json()
            differs = {
                name: (data[name], shown[name])
                for name in data
                if name != "refunded_usdc" and data[name] != shown.get(name)
            }
            check(
                "the answered entry == the stored entry",
                not differs,
                f"{key} ({op}) {data['id']}: answered vs stored {differs}",
            )
            if op == "refund":
                refunded[request["path"].split("/")[-2]] += _units(data["amount_usdc"])
        elif op == "hold":
            hold = holds.get(data["id"])
            ok = (
                hold is not None
                and [r.id for r in rows] == [data["id"]]
                and hold.user_id == data["user_id"]
                and int(hold.amount_units) == _units(data["amount_usdc"])
            )
            check("every success is in the holds table exactly once", ok, f"{key}: {data}")
        else:  # capture, release
            hold = holds.get(data["id"])
            captured = _units(data["captured_usdc"])
            expected = "captured" if captured > 0 else "released"
            ok = (
                hold is not None
                and hold.status == expected == data["status"]
                and int(hold.captured_units) == captured
                and hold.transaction_id == data["transaction_id"]
                and len(captures.get(data["id"], [])) == (1 if captured else 0)
            )
            check(
                "every resolved hold is resolved as answered",
                ok,
                f"{key}: answered {data}; stored {hold and (hold.status, hold.captured_units)}",
            )

    # 5. Refunds: what each debit says was refunded is what was answered.
    linked_units: Counter[str] = Counter()
    for row in entries:
        if row.type == "refund" and row.refund_of is not None:
            linked_units[row.refund_of] += int(row.amount_units)
    for row in entries:
        if row.type not in ("charge", "hold_capture"):
            continue
        refunded_units = int(row.refunded_units)
        check(
            "refunded never exceeds the debit",
            0 <= refunded_units <= -int(row.amount_units),
            f"{row.id}: refunded {refunded_units} of {-int(row.amount_units)}",
        )
        if row.id not in refund_unknown:
            check(
                "refunded_units == sum of answered refunds",
                refunded_units == refunded[row.id],
                f"{row.id}: refunded_units {refunded_units}, refunds answered {refunded[row.id]}",
            )
        linked = linked_units[row.id]
        if refunded_units:
            check(
                "refund entries link to their debit (refund_of)",
                linked == refunded_units,
                f"{row.id}: refunded_units {refunded_units}, refund entries with refund_of "
                f"pointing at it sum to {linked}",
            )

    # 6. The library's own reconcile, over the whole database.
    app = create_app(database_url)
    with app.app_context():
        from callora_credits import current_ledger

        result = current_ledger().reconcile()
        app.extensions["sqlalchemy"].engine.dispose()
    check(
        "Ledger.reconcile() clean",
        result.ok,
        "; ".join(f"{m.user_id}: {m.problem}" for m in result.mismatches[:20]),
    )
    report.reconcile = (
        f"Ledger.reconcile(): {result.accounts} accounts, {result.entries} entries, "
        f"{len(result.mismatches)} mismatches"
    )
    return report
