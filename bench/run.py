"""``make bench``: callora-credits against baselines measured in the same run.

Creates a PostgreSQL database (migrated with ``callora_credits.migrate``),
then measures and prints, as markdown tables of medians over repetitions:

1. Domain core, in process: ``Ledger.charge`` and the balance read
   (``get_or_create_by_user_id`` on an existing account), 1 and 8 client
   threads, on one hot account and spread over 1,000 accounts, against
   :mod:`baseline` (the same SQL through psycopg 3, no library code).
2. HTTP under gunicorn: ``GET /credits`` and ``POST /credits/charge`` of the
   blueprint in a minimal host app (bench/app.py) against a bare Flask view
   doing the same necessary work (bench/bare_app.py). Load from a separate
   process: wrk (installed with apt-get when missing and running as root),
   else bench/load.py.
3. History: first page and a page 100,000 entries deep through
   ``Ledger.history`` (keyset), the same SQL raw, and OFFSET pagination.
4. Memory: VmRSS/VmHWM of the gunicorn workers after 1,000 and after
   100,000 ``GET /credits`` requests.
5. Operations (``ops``): ``GET /credits`` with rate limits on (Redis
   storage) and with Prometheus metrics on (multi-process files), each
   against the same app with both off.

Then the goals, met or not. Everything is bounded in time, loopback only, and
the servers and the database are removed however the run ends.

Knobs (environment): BENCH_SECONDS (per in-process repetition, 1.5),
BENCH_HTTP_SECONDS (per HTTP repetition, 4), BENCH_REPS (5),
BENCH_MEMORY_REQUESTS (100000), BENCH_WORKERS (2), BENCH_WORKER_CLASS (sync),
BENCH_THREADS (1), BENCH_CONNECTIONS (8), BENCH_LOAD (auto|wrk|python),
BENCH_SECTIONS (core,http,history,memory,ops), BENCH_POSTGRES_URL, BENCH_FAST_PATH
(on|off: off sends the library's hot statements through Connection.execute),
BENCH_REDIS_URL (the ops section's rate limit storage, redis://127.0.0.1:6379).
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import baseline
import psycopg
from common import (
    ACCOUNT_PREFIX,
    ACCOUNTS,
    BENCH_DIR,
    HOT_USER,
    JWT_SECRET,
    READER,
    SERVER_URL,
    SERVICE,
    Cleanup,
    Server,
    account,
    create_database,
    libpq_dsn,
    make_token,
    memory_kib,
    seed_accounts,
    seed_history,
)
from sqlalchemy import event

SECONDS = float(os.environ.get("BENCH_SECONDS", "1.5"))
HTTP_SECONDS = max(1, round(float(os.environ.get("BENCH_HTTP_SECONDS", "4"))))
REPS = int(os.environ.get("BENCH_REPS", "5"))
MEMORY_REQUESTS = int(os.environ.get("BENCH_MEMORY_REQUESTS", "100000"))
MEMORY_BASE_REQUESTS = 1000
MEMORY_MAX_SECONDS = 180  # above this, shrink the count to fit ~120 s
WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))
WORKER_CLASS = os.environ.get("BENCH_WORKER_CLASS", "sync")
THREADS = int(os.environ.get("BENCH_THREADS", "1"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "8"))
SECTIONS = set(os.environ.get("BENCH_SECTIONS", "core,http,history,memory,ops").split(","))
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
# Never reached in a run: every request pays for the count, none is refused.
OPS_RATE_LIMIT = "1000000000/minute"
CLIENTS = (1, 8)
HTTP_MAX_REQUESTS = 200_000  # per timed run: a count bound never reached on 2 cores
HISTORY_DEPTH = 100_000
HISTORY_ENTRIES = HISTORY_DEPTH + 1_000
HISTORY_USER = "history_user"
HISTORY_SAMPLES = 200

GOAL_CHARGE = 0.8
GOAL_READ = 0.8
GOAL_HTTP_GET = 0.8
GOAL_HISTORY = 1.5
GOAL_MEMORY = 0.10  # peak RSS may grow by less than 10 %
GOAL_RATE_LIMITS = 0.8
GOAL_METRICS = 0.9


@dataclass
class Goal:
    name: str
    measured: str
    met: bool


@dataclass
class Report:
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    get_rps: float | None = None


def say(text: str = "") -> None:
    print(text, flush=True)


def table(headers: list[str], rows: list[list[str]]) -> None:
    """A markdown table, columns padded so it reads in a terminal too."""
    widths = [
        max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)
    ]

    def line(cells: list[str]) -> str:
        return (
            "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
        )

    say(line(headers))
    say("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        say(line(row))
    say()


def ratio_text(value: float) -> str:
    return f"{value:.2f}x"


def met_text(met: bool) -> str:
    return "met" if met else "NOT met"


def vacuum(dsn: str, tables: str = "") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {tables}".strip())


# --- 1. the domain core, in process ---------------------------------------------------

Op = Callable[[int], object]
MakeOp = Callable[[int], tuple[Op, Callable[[], object]]]


def throughput(make_op: MakeOp, clients: int, seconds: float) -> tuple[float, float]:
    """Operations per second of ``clients`` threads looping until a deadline,
    and the CPU time of this process per operation, in microseconds (steadier
    than wall time when other processes compete for the cores)."""
    ready = threading.Barrier(clients + 1)
    go = threading.Barrier(clients + 1)
    deadline = [0.0]
    counts = [0] * clients
    ends = [0.0] * clients
    failures: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            op, close = make_op(index)
        except BaseException as exc:
            failures.append(exc)
            ready.abort()
            return
        try:
            ready.wait()
            go.wait()
            stop_at = deadline[0]
            done = 0
            while time.perf_counter() < stop_at:
                op(done)
                done += 1
            counts[index] = done
            ends[index] = time.perf_counter()
        except BaseException as exc:
            failures.append(exc)
            go.abort()
        finally:
            close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        ready.wait(timeout=60)
        cpu_started = time.process_time()
        started = time.perf_counter()
        deadline[0] = started + seconds
        go.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join(timeout=seconds + 120)
    cpu = time.process_time() - cpu_started
    if failures:
        raise RuntimeError(f"a client failed: {failures[0]!r}") from failures[0]
    done = sum(counts)
    return done / (max(ends) - started), cpu / done * 1e6


def _normalized(sql: str) -> str:
    # Bind parameter names are SQLAlchemy's choice; the statement is the same.
    return re.sub(r"%\(\w+\)s", "%(p)s", " ".join(sql.split()))


def check_same_sql(ledger: Any) -> None:
    """Warn when the library's statements drifted from bench/baseline.py."""
    captured: list[str] = []

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        captured.append(statement)

    event.listen(ledger.engine, "before_cursor_execute", before)
    try:
        ledger.charge(account(0), 1)
        charge_sql = list(captured)
        captured.clear()
        ledger.get_or_create_by_user_id(account(0))
        read_sql = list(captured)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", before)
    expected_charge = [
        baseline.CHARGE_UPDATE,
        baseline.CHARGE_INSERT_ENTRY,
        baseline.CHARGE_INSERT_IDEMPOTENCY,
    ]
    for name, got, want in (
        ("charge", charge_sql, expected_charge),
        ("balance read", read_sql, [baseline.BALANCE_SELECT]),
    ):
        same = [_normalized(s) for s in got] == [_normalized(s) for s in want]
        verdict = "identical to the baseline's" if same else "DIFFERENT from bench/baseline.py"
        say(f"- library {name}: {len(got)} statement(s), {verdict}")
        if not same:
            for statement in got:
                say(f"    {_normalized(statement)[:160]}")


def section_core(ledger: Any, dsn: str, report: Report) -> None:
    say("## 1. Domain core, in process (ops/s, median of repetitions)")
    say()
    check_same_sql(ledger)
    say()
    users = [account(i) for i in range(ACCOUNTS)]

    def pick(index: int, spread: bool) -> Callable[[], str]:
        if not spread:
            return lambda: HOT_USER
        rng = random.Random(index)
        return lambda: users[rng.randrange(ACCOUNTS)]

    def library(kind: str, spread: bool) -> MakeOp:
        def make(index: int) -> tuple[Op, Callable[[], object]]:
            user = pick(index, spread)
            if kind == "charge":
                return (lambda n: ledger.charge(user(), 1)), (lambda: None)
            return (lambda n: ledger.get_or_create_by_user_id(user())), (lambda: None)

        return make

    def floor(kind: str, spread: bool) -> MakeOp:
        def make(index: int) -> tuple[Op, Callable[[], object]]:
            user = pick(index, spread)
            conn = baseline.connect(dsn)
            if kind == "charge":
                return (lambda n: baseline.charge(conn, user(), 1)), conn.close
            return (lambda n: baseline.read_balance_row(conn, user())), conn.close

        return make

    rows = []
    ratios: dict[str, list[float]] = {"charge": [], "read": []}
    goals = {"charge": GOAL_CHARGE, "read": GOAL_READ}
    for kind in ("charge", "read"):
        for clients in CLIENTS:
            for spread in (False, True):
                vacuum(dsn, "credits")
                lib, base = library(kind, spread), floor(kind, spread)
                # Warm-up: fills the library's pool, lets psycopg prepare.
                throughput(lib, clients, 0.5)
                throughput(base, clients, 0.5)
                lib_runs, base_runs = [], []
                for _ in range(REPS):
                    lib_runs.append(throughput(lib, clients, SECONDS))
                    base_runs.append(throughput(base, clients, SECONDS))
                lib_ops = statistics.median(run[0] for run in lib_runs)
                base_ops = statistics.median(run[0] for run in base_runs)
                lib_cpu = statistics.median(run[1] for run in lib_runs)
                base_cpu = statistics.median(run[1] for run in base_runs)
                ratio = lib_ops / base_ops
                placement = f"{ACCOUNTS:,} accounts" if spread else "1 hot account"
                label = "Ledger.charge" if kind == "charge" else "balance read"
                ratios[kind].append(ratio)
                goal = f">= {goals[kind]}x: {met_text(ratio >= goals[kind])}"
                rows.append(
                    [
                        label,
                        str(clients),
                        placement,
                        f"{lib_ops:,.0f}",
                        f"{base_ops:,.0f}",
                        ratio_text(ratio),
                        f"{lib_cpu:,.0f} / {base_cpu:,.0f}",
                        goal,
                    ]
                )
                say(f"  measured {label}, {clients} client(s), {placement}")
    say()
    table(
        [
            "operation",
            "clients",
            "accounts",
            "library ops/s",
            "baseline ops/s",
            "ratio",
            "CPU us/op lib / base",
            "goal",
        ],
        rows,
    )
    retries = ledger.stats.counts
    if retries:
        say(f"Library retries during the run: {retries}")
        say()
    for kind, label in (("charge", "charge"), ("read", "balance read")):
        worst = min(ratios[kind])
        report.goals.append(
            Goal(
                f"domain-core {label} >= {goals[kind]}x baseline (every case)",
                f"{ratio_text(worst)} (worst of {len(ratios[kind])})",
                worst >= goals[kind],
            )
        )


# --- load generation ------------------------------------------------------------------


def find_wrk() -> str | None:
    """wrk if available, installing it with apt-get as root; else ``None``."""
    choice = os.environ.get("BENCH_LOAD", "auto")
    if choice == "python":
        return None
    found = shutil.which("wrk")
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ("install", "update+install"):
        if attempt == "update+install":
            say("apt-get install failed; running `apt-get update` and trying again")
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        say("wrk is not installed: installing it with `apt-get install -y wrk` (running as root)")
        try:
            result = subprocess.run(
                ["apt-get", "install", "-y", "-q", "wrk"],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            continue
        if result.returncode == 0:
            return shutil.which("wrk")
        say(result.stderr.strip()[-500:])
    return None


class Load:
    """Runs load from a separate process (wrk, else bench/load.py)."""

    def __init__(self, wrk: str | None) -> None:
        self.wrk = wrk
        self.name = "wrk (-t1)" if wrk else "bench/load.py (Python threads, keep-alive)"

    def run(
        self,
        port: int,
        path: str,
        mode: str,
        token: str,
        seconds: int,
        max_requests: int = 0,
    ) -> dict[str, Any]:
        nonce = uuid.uuid4().hex[:12]
        if self.wrk:
            cmd = [
                self.wrk,
                "-t1",
                f"-c{CONNECTIONS}",
                f"-d{seconds}s",
                "--timeout",
                "10s",
                "-s",
                str(BENCH_DIR / "wrk" / "credits.lua"),
                f"http://127.0.0.1:{port}{path}",
                "--",
                mode,
                token,
                nonce,
                str(max_requests),
                str(ACCOUNTS),
                ACCOUNT_PREFIX,
            ]
        else:
            cmd = [
                sys.executable,
                str(BENCH_DIR / "load.py"),
                f"--port={port}",
                f"--path={path}",
                f"--mode={mode}",
                f"--token={token}",
                f"--nonce={nonce}",
                f"--seconds={seconds}",
                f"--max-requests={max_requests}",
                f"--connections={CONNECTIONS}",
                f"--accounts={ACCOUNTS}",
                f"--prefix={ACCOUNT_PREFIX}",
            ]
        started = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        wall_us = int((time.perf_counter() - started) * 1e6)
        for line in result.stdout.splitlines():
            tag, _, payload = line.partition(" ")
            if tag == "BENCH_RESULT":
                data: dict[str, Any] = json.loads(payload)
            elif tag == "BENCH_DONE":  # wrk stopped at max_requests: no latency figures
                data = {
                    **json.loads(payload),
                    "duration_us": wall_us,
                    "socket_errors": 0,
                    "p50_us": 0,
                    "p99_us": 0,
                }
            else:
                continue
            data["rps"] = data["responses"] / (data["duration_us"] / 1e6)
            return data
        raise RuntimeError(f"load generator failed:\n{result.stdout}\n{result.stderr}")


# --- 2. HTTP --------------------------------------------------------------------------


def server_env(url: str, dsn: str) -> dict[str, str]:
    return {
        "BENCH_DATABASE_URL": url,
        "BENCH_PG_DSN": dsn,
        "BENCH_JWT_SECRET": JWT_SECRET,
        "BENCH_POOL_SIZE": str(max(2, THREADS)),
    }


def start(cleanup: Cleanup, name: str, target: str, env: dict[str, str], logs: Path) -> Server:
    return Server(
        cleanup,
        name,
        target,
        env,
        workers=WORKERS,
        worker_class=WORKER_CLASS,
        threads=THREADS,
        log_dir=logs,
    )


def section_http(
    url: str, dsn: str, cleanup: Cleanup, logs: Path, load: Load, report: Report
) -> None:
    say(
        f"## 2. HTTP under gunicorn ({WORKERS} {WORKER_CLASS} workers x {THREADS} thread(s) "
        f"each, {CONNECTIONS} connections, {load.name})"
    )
    say()
    env = server_env(url, dsn)
    servers = {
        "library": start(cleanup, "library", "app:create_app()", env, logs),
        "bare": start(cleanup, "bare", "bare_app:create_app()", env, logs),
    }
    reader, service = make_token(READER), make_token(SERVICE, "credits:charge")
    for server in servers.values():
        server.wait_ready("/api/billing/credits", reader)
    cases = [
        ("GET /credits", "/api/billing/credits", "get", reader),
        ("POST /credits/charge", "/api/billing/credits/charge", "charge", service),
    ]
    rows = []
    for label, path, mode, token in cases:
        for server in servers.values():
            load.run(server.port, path, mode, token, 2)  # warm-up
        runs: dict[str, list[dict[str, Any]]] = {"library": [], "bare": []}
        for _ in range(REPS):
            for name, server in servers.items():
                cpu_before = server.workers_cpu_seconds()
                result = load.run(server.port, path, mode, token, HTTP_SECONDS, HTTP_MAX_REQUESTS)
                cpu = server.workers_cpu_seconds() - cpu_before
                result["cpu_us"] = cpu / max(1, result["responses"]) * 1e6
                if result["unexpected"]:
                    raise RuntimeError(
                        f"{name} {label}: {result['unexpected']} unexpected statuses\n"
                        + server.log_tail()
                    )
                runs[name].append(result)
        say(f"  measured {label}")
        medians = {
            name: {
                key: statistics.median(r[key] for r in results)
                for key in ("rps", "p50_us", "p99_us", "socket_errors", "cpu_us")
            }
            for name, results in runs.items()
        }
        ratio = medians["library"]["rps"] / medians["bare"]["rps"]
        goal = ""
        if mode == "get":
            report.get_rps = medians["library"]["rps"]
            goal = f">= {GOAL_HTTP_GET}x: {met_text(ratio >= GOAL_HTTP_GET)}"
            report.goals.append(
                Goal(
                    f"HTTP GET /credits >= {GOAL_HTTP_GET}x the bare view",
                    ratio_text(ratio),
                    ratio >= GOAL_HTTP_GET,
                )
            )
        lib, bare = medians["library"], medians["bare"]
        rows.append(
            [
                label,
                f"{lib['rps']:,.0f}",
                f"{bare['rps']:,.0f}",
                ratio_text(ratio),
                f"{lib['p50_us'] / 1000:.2f} / {lib['p99_us'] / 1000:.2f}",
                f"{bare['p50_us'] / 1000:.2f} / {bare['p99_us'] / 1000:.2f}",
                f"{lib['cpu_us']:,.0f} / {bare['cpu_us']:,.0f}",
                goal,
            ]
        )
        errors = lib["socket_errors"] + bare["socket_errors"]
        if errors:
            report.notes.append(f"{label}: median socket errors per run {errors:.0f}")
    for server in servers.values():
        server.stop()
    say()
    table(
        [
            "endpoint",
            "library req/s",
            "bare req/s",
            "ratio",
            "library p50/p99 ms",
            "bare p50/p99 ms",
            "worker CPU us/req lib / bare",
            "goal",
        ],
        rows,
    )


# --- 3. history -----------------------------------------------------------------------


def latency_ms(call: Callable[[], object], samples: int) -> float:
    """Median wall time of ``call`` in milliseconds, after a short warm-up."""
    for _ in range(20):
        call()
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def section_history(ledger: Any, dsn: str, report: Report) -> None:
    say(
        f"## 3. History of one account with {HISTORY_ENTRIES:,} entries "
        f"(page of 20, median of {REPS} x {HISTORY_SAMPLES} calls)"
    )
    say()
    started = time.perf_counter()
    seed_history(dsn, HISTORY_USER, HISTORY_ENTRIES)
    say(f"- seeded {HISTORY_ENTRIES:,} entries in {time.perf_counter() - started:.1f} s")

    # Reach the deep page the way a client does: following next_cursor.
    started = time.perf_counter()
    cursor = None
    for _ in range(HISTORY_DEPTH // 100):
        page = ledger.history(HISTORY_USER, limit=100, cursor=cursor)
        cursor = page.next_cursor
    deep = ledger.history(HISTORY_USER, limit=20, cursor=cursor)
    expected_seq = HISTORY_ENTRIES - HISTORY_DEPTH
    if deep.items[0].seq != expected_seq:
        raise RuntimeError(f"deep page starts at seq {deep.items[0].seq}, not {expected_seq}")
    say(
        f"- walked {HISTORY_DEPTH // 100:,} pages of 100 to depth {HISTORY_DEPTH:,} in "
        f"{time.perf_counter() - started:.1f} s (deep page starts at seq {expected_seq:,}, "
        "no gap, no duplicate)"
    )
    say()

    conn = baseline.connect(dsn)

    def raw(sql: str, params: dict[str, Any]) -> Callable[[], object]:
        def call() -> object:
            rows = conn.execute(sql, params).fetchall()
            conn.commit()
            return rows

        return call

    base = {"user_id_1": HISTORY_USER, "param_1": 21}
    candidates = {
        "Ledger.history (keyset)": (
            lambda: ledger.history(HISTORY_USER, limit=20),
            lambda: ledger.history(HISTORY_USER, limit=20, cursor=cursor),
        ),
        "same keyset SQL, raw psycopg": (
            raw(baseline.HISTORY_KEYSET_FIRST, base),
            raw(baseline.HISTORY_KEYSET_AFTER, {**base, "seq_1": expected_seq + 1}),
        ),
        "OFFSET pagination, raw psycopg": (
            raw(baseline.HISTORY_OFFSET, {**base, "param_2": 0}),
            raw(baseline.HISTORY_OFFSET, {**base, "param_2": HISTORY_DEPTH}),
        ),
    }
    try:
        results: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in candidates}
        for rep in range(REPS):
            for name, (first, deeper) in candidates.items():
                samples = HISTORY_SAMPLES if "OFFSET" not in name else HISTORY_SAMPLES // 10
                # Alternate which page goes first, so order effects cancel out.
                if rep % 2:
                    results[name][1].append(latency_ms(deeper, samples))
                    results[name][0].append(latency_ms(first, samples))
                else:
                    results[name][0].append(latency_ms(first, samples))
                    results[name][1].append(latency_ms(deeper, samples))
    finally:
        conn.close()
    rows = []
    for name, (first_runs, deep_runs) in results.items():
        first_ms, deep_ms = statistics.median(first_runs), statistics.median(deep_runs)
        ratio = deep_ms / first_ms
        goal = ""
        if name.startswith("Ledger"):
            goal = f"<= {GOAL_HISTORY}x: {met_text(ratio <= GOAL_HISTORY)}"
            report.goals.append(
                Goal(
                    f"history page {HISTORY_DEPTH:,} deep <= {GOAL_HISTORY}x the first page",
                    ratio_text(ratio),
                    ratio <= GOAL_HISTORY,
                )
            )
        rows.append([name, f"{first_ms:.3f}", f"{deep_ms:.3f}", ratio_text(ratio), goal])
    table(
        ["pagination", "first page ms", f"{HISTORY_DEPTH:,} deep ms", "deep/first", "goal"], rows
    )


# --- 4. memory ------------------------------------------------------------------------


def section_memory(
    url: str, dsn: str, cleanup: Cleanup, logs: Path, load: Load, report: Report
) -> None:
    say(f"## 4. Memory of the library's gunicorn workers: GET /credits, {WORKERS} workers")
    say()
    server = start(cleanup, "library-memory", "app:create_app()", server_env(url, dsn), logs)
    reader = make_token(READER)
    server.wait_ready("/api/billing/credits", reader)
    path = "/api/billing/credits"
    served = 1  # the readiness probe
    first = load.run(server.port, path, "get", reader, 60, MEMORY_BASE_REQUESTS - served)
    served += first["responses"]
    at_base = {pid: memory_kib(pid) for pid in server.worker_pids()}

    total = MEMORY_REQUESTS
    rate = report.get_rps or first["rps"]
    expected = (total - served) / rate
    if expected > MEMORY_MAX_SECONDS:
        total = max(10_000, int(rate * 120) // 1000 * 1000)
        note = (
            f"{MEMORY_REQUESTS:,} requests would take ~{expected:.0f} s at {rate:,.0f} req/s "
            f"on this machine; using {total:,} instead (what fits in ~2 minutes)"
        )
        say(f"- NOTE: {note}")
        report.notes.append(note)
    started = time.perf_counter()
    rest = load.run(server.port, path, "get", reader, MEMORY_MAX_SECONDS + 30, total - served)
    served += rest["responses"]
    elapsed = time.perf_counter() - started
    at_end = {pid: memory_kib(pid) for pid in server.worker_pids()}
    server.stop()
    if rest["unexpected"] or first["unexpected"]:
        raise RuntimeError("unexpected statuses during the memory run")
    say(
        f"- served {served:,} requests: {MEMORY_BASE_REQUESTS:,} first, then "
        f"{rest['responses']:,} more in {elapsed:.0f} s"
    )
    if served < total:
        note = (
            f"the memory run hit its time bound ({MEMORY_MAX_SECONDS + 30} s) after "
            f"{served:,} of {total:,} requests: the machine got slower than estimated"
        )
        say(f"- NOTE: {note}")
        report.notes.append(note)
    say()
    rows = []
    growths = []
    for pid, before in at_base.items():
        after = at_end.get(pid)
        if after is None:
            raise RuntimeError(f"worker {pid} was replaced during the run")
        growth = (after["VmHWM"] - before["VmHWM"]) / before["VmHWM"]
        growths.append(growth)
        rows.append(
            [
                str(pid),
                f"{before['VmRSS'] / 1024:.1f}",
                f"{before['VmHWM'] / 1024:.1f}",
                f"{after['VmRSS'] / 1024:.1f}",
                f"{after['VmHWM'] / 1024:.1f}",
                f"{growth * 100:+.1f} %",
            ]
        )
    table(
        [
            "worker pid",
            f"RSS MiB @{MEMORY_BASE_REQUESTS:,}",
            f"peak MiB @{MEMORY_BASE_REQUESTS:,}",
            f"RSS MiB @{served:,}",
            f"peak MiB @{served:,}",
            "peak growth",
        ],
        rows,
    )
    worst = max(growths)
    report.goals.append(
        Goal(
            f"memory flat (peak RSS growth < {GOAL_MEMORY:.0%}, {MEMORY_BASE_REQUESTS:,} -> "
            f"{served:,} requests)",
            f"{worst * 100:+.1f} % (worst worker)",
            worst < GOAL_MEMORY,
        )
    )


# --- 5. operations: rate limits and metrics ---------------------------------------------


def _redis_cleanup(prefix: str) -> Callable[[], None]:
    def delete() -> None:
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()

    return delete


def section_ops(
    url: str, dsn: str, cleanup: Cleanup, logs: Path, load: Load, report: Report
) -> None:
    say(
        f"## 5. Operating it: GET /credits with rate limits and with metrics "
        f"({WORKERS} {WORKER_CLASS} workers, {CONNECTIONS} connections, {load.name})"
    )
    say()
    env = server_env(url, dsn)
    prefix = f"credits-bench-{uuid.uuid4().hex[:12]}"
    cleanup.push("delete the rate limit keys", _redis_cleanup(prefix))
    multiproc = Path(tempfile.mkdtemp(prefix="callora-bench-prometheus-"))
    cleanup.push("remove metric files", lambda: shutil.rmtree(multiproc, ignore_errors=True))
    variants = {
        "off": {**env, "BENCH_METRICS": "off"},
        "rate limits": {
            **env,
            "BENCH_METRICS": "off",
            "BENCH_RATE_LIMIT": OPS_RATE_LIMIT,
            "BENCH_RATE_LIMIT_STORAGE_URI": REDIS_URL,
            "BENCH_RATELIMIT_KEY_PREFIX": prefix,
        },
        "metrics": {
            **env,
            "BENCH_METRICS": "on",
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        },
    }
    servers = {
        name: start(cleanup, f"ops-{name.replace(' ', '-')}", "app:create_app()", variant, logs)
        for name, variant in variants.items()
    }
    reader = make_token(READER)
    path = "/api/billing/credits"
    for server in servers.values():
        server.wait_ready(path, reader)
        load.run(server.port, path, "get", reader, 2)  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in servers}
    for _ in range(REPS):
        for name, server in servers.items():
            result = load.run(server.port, path, "get", reader, HTTP_SECONDS, HTTP_MAX_REQUESTS)
            if result["unexpected"]:
                raise RuntimeError(
                    f"ops {name}: {result['unexpected']} unexpected statuses (a 429 means "
                    "the limit was reached)\n" + server.log_tail()
                )
            runs[name].append(result["rps"])
    for server in servers.values():
        server.stop()
    say("  measured GET /credits")
    say()
    off = statistics.median(runs["off"])
    rows = [["both off", f"{off:,.0f}", "1.00x", ""]]
    for name, goal in (("rate limits", GOAL_RATE_LIMITS), ("metrics", GOAL_METRICS)):
        rps = statistics.median(runs[name])
        ratio = rps / off
        label = (
            f"rate limits on (Redis, {OPS_RATE_LIMIT})"
            if name == "rate limits"
            else "metrics on (PROMETHEUS_MULTIPROC_DIR)"
        )
        rows.append(
            [label, f"{rps:,.0f}", ratio_text(ratio), f">= {goal}x: {met_text(ratio >= goal)}"]
        )
        report.goals.append(
            Goal(f"GET /credits with {name} on >= {goal}x off", ratio_text(ratio), ratio >= goal)
        )
    table(["GET /credits", "req/s", "vs both off", "goal"], rows)


# --- main -----------------------------------------------------------------------------


def main() -> int:
    began = time.perf_counter()
    cleanup = Cleanup()
    report = Report()
    try:
        say("# callora-credits benchmark")
        say()
        with psycopg.connect(libpq_dsn(SERVER_URL)) as conn:
            server_version = conn.execute("SHOW server_version").fetchone()
        say(
            f"- machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"PostgreSQL {server_version[0] if server_version else '?'}, "
            f"psycopg {psycopg.__version__}"
        )
        say(
            f"- repetitions: {REPS}; in-process {SECONDS:g} s each, HTTP {HTTP_SECONDS} s each; "
            "figures are medians"
        )
        from app import create_app, fast_path

        if not fast_path():
            say("- BENCH_FAST_PATH=off: library hot statements go through Connection.execute")
        load_1m = os.getloadavg()[0]
        say(f"- load average at start: {load_1m:.1f} on {os.cpu_count()} cores")
        if load_1m > (os.cpu_count() or 1):
            report.notes.append(
                f"the machine was busy (load {load_1m:.1f} at start): other processes "
                "competed for the CPU; the interleaved same-run ratios are steadier than "
                "the absolute figures"
            )
        url = create_database(cleanup)
        dsn = libpq_dsn(url)
        seed_accounts(dsn)
        say(f"- database: {dsn.rsplit('/', 1)[-1]} (migrated, {ACCOUNTS:,} funded accounts)")
        load = Load(find_wrk() if SECTIONS & {"http", "memory", "ops"} else None)
        say()
        logs = Path(tempfile.mkdtemp(prefix="callora-bench-"))
        cleanup.push("remove logs", lambda: shutil.rmtree(logs, ignore_errors=True))

        from callora_credits import current_ledger

        app = create_app(url, pool_size=max(CLIENTS) + 2)
        with app.app_context():
            ledger = current_ledger()
        cleanup.push("dispose engine", ledger.engine.dispose)

        if "core" in SECTIONS:
            section_core(ledger, dsn, report)
            vacuum(dsn)
        if "http" in SECTIONS:
            section_http(url, dsn, cleanup, logs, load, report)
            vacuum(dsn)
        if "history" in SECTIONS:
            section_history(ledger, dsn, report)
        if "memory" in SECTIONS:
            section_memory(url, dsn, cleanup, logs, load, report)
        if "ops" in SECTIONS:
            section_ops(url, dsn, cleanup, logs, load, report)

        started = time.perf_counter()
        checked = ledger.reconcile()
        say(
            f"Ledger check after the run (`Ledger.reconcile`): "
            f"{'consistent' if checked.ok else 'MISMATCHES'} ({checked.accounts:,} accounts, "
            f"{checked.entries:,} entries, {time.perf_counter() - started:.1f} s)"
        )
        say()
        if not checked.ok:
            for mismatch in checked.mismatches[:10]:
                say(f"- {mismatch.user_id}: {mismatch.problem}")
            raise RuntimeError("the benchmark left the ledger inconsistent")
        say("## Goals")
        say()
        table(
            ["goal", "measured", "status"],
            [[g.name, g.measured, met_text(g.met)] for g in report.goals],
        )
        for note in report.notes:
            say(f"- note: {note}")
        say(f"- load average at end: {os.getloadavg()[0]:.1f}")
        say(f"- total time: {time.perf_counter() - began:.0f} s")
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
