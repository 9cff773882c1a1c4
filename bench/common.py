"""What bench/run.py and bench/profile_hotpaths.py share: the database, tokens, servers.

Everything started here is registered with a :class:`Cleanup`, which runs on
normal exit, on an exception and on SIGTERM/SIGINT, so no server and no
benchmark database outlives the run.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jwt
import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
SERVER_URL = os.environ.get(
    "BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
JWT_SECRET = "bench-" + uuid.uuid4().hex + uuid.uuid4().hex
ACCOUNTS = 1000
ACCOUNT_PREFIX = "acct_"
HOT_USER = "hot_account"
READER = "reader_user"
SERVICE = "gateway_service"
START_BALANCE = 10**16  # units: 1e9 USDC, far more than the run can spend


class Cleanup:
    """Undo actions run last-in first-out, once, whatever ends the run."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], object]]] = []
        atexit.register(self.run)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    def push(self, what: str, action: Callable[[], object]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # keep undoing the rest
                print(f"cleanup: {what} failed: {exc!r}", file=sys.stderr)


def libpq_dsn(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string for plain psycopg."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(cleanup: Cleanup) -> str:
    """A new, migrated database, dropped by ``cleanup``; returns its URL."""
    from callora_credits import migrate

    name = f"credits_bench_{uuid.uuid4().hex[:10]}"
    admin_dsn = libpq_dsn(SERVER_URL)
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        print(f"dropped database {name}", flush=True)

    cleanup.push(f"drop database {name}", drop)
    url = make_url(SERVER_URL).set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    return url


def account(index: int) -> str:
    return f"{ACCOUNT_PREFIX}{index:04d}"


def seed_accounts(dsn: str) -> None:
    """Funded accounts, each with the top-up entry its balance came from.

    ``acct_0000``…``acct_0999`` (spread), the hot account, the reader of the
    HTTP balance reads and the service caller. Bulk SQL: seconds, not minutes.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TEMP TABLE seed_users AS "
            "SELECT %(prefix)s || lpad(g::text, 4, '0') AS user_id "
            "FROM generate_series(0, %(last)s) AS g "
            "UNION ALL SELECT unnest(%(extra)s::text[])",
            {"prefix": ACCOUNT_PREFIX, "last": ACCOUNTS - 1, "extra": [HOT_USER, READER]},
        )
        conn.execute(
            "INSERT INTO credits (user_id, balance_units, last_seq, created_at, updated_at) "
            "SELECT user_id, %(balance)s, 1, now() AT TIME ZONE 'utc', "
            "now() AT TIME ZONE 'utc' FROM seed_users",
            {"balance": START_BALANCE},
        )
        conn.execute(
            "INSERT INTO credits_transactions (id, user_id, seq, type, amount_units, "
            "balance_after_units, metadata_json, refunded_units, created_at) "
            "SELECT 'ctx_' || substr(md5(user_id), 1, 24), user_id, 1, 'topup', %(balance)s, "
            "%(balance)s, '{}', 0, now() AT TIME ZONE 'utc' FROM seed_users",
            {"balance": START_BALANCE},
        )
        conn.execute("ANALYZE")


def seed_history(dsn: str, user_id: str, count: int) -> None:
    """``count`` top-ups of 1 USDC for one user: seq 1…count, balance_after chained."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO credits_transactions (id, user_id, seq, type, amount_units, "
            "balance_after_units, metadata_json, refunded_units, created_at) "
            "SELECT 'ctx_' || lpad(to_hex(s), 24, '0'), %(user)s, s, 'topup', 10000000, "
            "s * 10000000, '{}', 0, "
            "timestamp '2026-01-01' + s * interval '1 second' "
            "FROM generate_series(1::bigint, %(count)s) AS s",
            {"user": user_id, "count": count},
        )
        conn.execute(
            "INSERT INTO credits (user_id, balance_units, last_seq, created_at, updated_at) "
            "VALUES (%(user)s, %(count)s::bigint * 10000000, %(count)s, timestamp '2026-01-01', "
            "timestamp '2026-01-01' + %(count)s * interval '1 second')",
            {"user": user_id, "count": count},
        )
        conn.execute("VACUUM ANALYZE credits_transactions")


def make_token(user_id: str, scope: str | None = None) -> str:
    """An access token shaped like Flask-JWT-Extended's (as tests/conftest.py)."""
    now = datetime.now(timezone.utc)
    payload: dict[str, Any] = {
        "iat": now,
        "nbf": now,
        "exp": now + timedelta(hours=2),
        "jti": uuid.uuid4().hex,
        "type": "access",
        "fresh": False,
        "sub": user_id,
    }
    if scope is not None:
        payload["scope"] = scope
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A gunicorn serving ``target`` on 127.0.0.1, in its own process group."""

    def __init__(
        self,
        cleanup: Cleanup,
        name: str,
        target: str,
        env: dict[str, str],
        *,
        workers: int,
        worker_class: str,
        threads: int,
        log_dir: Path,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "gunicorn",
            "--chdir",
            str(BENCH_DIR),
            "--pythonpath",
            str(BENCH_DIR),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            str(workers),
            "--worker-class",
            worker_class,
            "--threads",
            str(threads),
            "--log-level",
            "warning",
            "--timeout",
            "60",
            target,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cleanup.push(f"stop {name}", self.stop)

    def wait_ready(self, path: str, token: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}:\n{self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return
                raise RuntimeError(f"{self.name} answered {status}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start in {timeout}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """The gunicorn workers: children of the master process."""
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                children.append(int(entry.name))
        return sorted(children)

    def workers_cpu_seconds(self) -> float:
        """User + system CPU time used so far by the workers."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.worker_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # After the command: state is field 3, utime and stime fields 14 and 15.
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._log.close()


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found
