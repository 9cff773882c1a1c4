"""What bench/run.py and bench/profile_hotpaths.py share: the database, tokens, servers.

Everything started here is registered with a :class:`Cleanup`, which runs on
normal exit, on an exception and on SIGTERM/SIGINT, so no server and no
benchmark database outlives the run.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
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
from typing import Any, NamedTuple

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
GRANTS_PREFIX = "grants_"
HOT_GRANTS_USER = "hot_grants_account"
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


class GrantSeed(NamedTuple):
    """One grant every account of a seeded set gets (with its entry)."""

    category: str
    priority: int
    expires_in_days: int | None
    units: int


#: The funded accounts' one grant: a paid top-up without expiry.
ONE_GRANT = (GrantSeed("paid", 50, None, START_BALANCE),)

#: The grants of each account of the five-grant case, in creation order.
#: Consumption order: the 4th (priority 10), the 5th (20), the 2nd (30), then
#: the 3rd and the 1st (both 50: the one that expires, then the one that never
#: does). Every charge draws from the 4th, which holds nearly all the balance.
#: The soonest expiry is 200 days away: nothing falls due during a run.
FIVE_GRANTS = (
    GrantSeed("paid", 50, None, 10**12),
    GrantSeed("promotional", 30, 400, 10**12),
    GrantSeed("paid", 50, 300, 10**12),
    GrantSeed("promotional", 10, 365, START_BALANCE),
    GrantSeed("promotional", 20, 200, 10**12),
)
#: The ``number`` of the grant a charge on a five-grant account draws from.
FIRST_IN_ORDER = 4


def grants_account(index: int) -> str:
    return f"{GRANTS_PREFIX}{index:04d}"


def seeded_grant_id(user_id: str, number: int) -> str:
    """The id :func:`seed_accounts` gives a user's grant ``number``."""
    return "grant_" + hashlib.md5(f"g/{user_id}/{number}".encode()).hexdigest()[:24]


def _fund(conn: psycopg.Connection[Any], users: list[str], grants: tuple[GrantSeed, ...]) -> None:
    """Give each of ``users`` an account with ``grants``, each grant with the
    entry that brought it in (a ``topup`` for a paid grant, a ``grant`` for a
    promotional one): balance = the grants' remaining = the entries' sum."""
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    params = {
        "users": users,
        "numbers": list(range(1, len(grants) + 1)),
        "categories": [g.category for g in grants],
        "priorities": [g.priority for g in grants],
        "days": [g.expires_in_days for g in grants],
        "units": [g.units for g in grants],
        "now": now,
    }
    each = (
        "FROM unnest(%(users)s::text[]) AS u(user_id) "
        "CROSS JOIN unnest(%(numbers)s::int[], %(categories)s::text[], %(priorities)s::int[], "
        "%(days)s::int[], %(units)s::bigint[]) AS m(number, category, priority, days, units)"
    )
    entry_id = "'ctx_' || substr(md5('e/' || u.user_id || '/' || m.number), 1, 24)"
    grant_id = "'grant_' || substr(md5('g/' || u.user_id || '/' || m.number), 1, 24)"
    expires = "%(now)s::timestamp + m.days * interval '1 day'"
    conn.execute(
        "INSERT INTO credits (user_id, balance_units, last_seq, created_at, updated_at, "
        "next_due_at, scheduled_units, last_grant_number) "
        f"SELECT u.user_id, sum(m.units), count(*), %(now)s, %(now)s, min({expires}), 0, "
        f"count(*) {each} GROUP BY u.user_id",
        params,
    )
    conn.execute(
        "INSERT INTO credits_transactions (id, user_id, seq, type, amount_units, "
        "balance_after_units, metadata_json, refunded_units, created_at, grant_id) "
        f"SELECT {entry_id}, u.user_id, m.number, "
        "CASE m.category WHEN 'paid' THEN 'topup' ELSE 'grant' END, m.units, "
        "sum(m.units) OVER (PARTITION BY u.user_id ORDER BY m.number), '{}', 0, %(now)s, "
        f"{grant_id} {each}",
        params,
    )
    conn.execute(
        "INSERT INTO credits_grants (id, user_id, number, category, origin, amount_units, "
        "remaining_units, held_units, priority, effective_at, expires_at, status, "
        "metadata_json, transaction_id, created_at) "
        f"SELECT {grant_id}, u.user_id, m.number, m.category, "
        "CASE m.category WHEN 'paid' THEN 'topup' ELSE 'grant' END, m.units, m.units, 0, "
        f"m.priority, %(now)s, {expires}, 'active', '{{}}', {entry_id}, %(now)s {each}",
        params,
    )


def seed_accounts(dsn: str) -> None:
    """Funded accounts, their grants, and the entries their balances came from.

    One paid grant each: ``acct_0000``…``acct_0999`` (spread), the hot
    account, the reader of the HTTP balance reads. Five grants each
    (:data:`FIVE_GRANTS`): ``grants_0000``…``grants_0999`` and the hot
    five-grant account. Bulk SQL: seconds, not minutes.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        _fund(conn, [account(i) for i in range(ACCOUNTS)] + [HOT_USER, READER], ONE_GRANT)
        _fund(conn, [grants_account(i) for i in range(ACCOUNTS)] + [HOT_GRANTS_USER], FIVE_GRANTS)
        conn.execute("ANALYZE")


def seed_history(dsn: str, user_id: str, count: int) -> None:
    """``count`` top-ups of 1 USDC for one user, each with its grant: seq
    1…count, balance_after chained."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO credits_transactions (id, user_id, seq, type, amount_units, "
            "balance_after_units, metadata_json, refunded_units, created_at, grant_id) "
            "SELECT 'ctx_' || lpad(to_hex(s), 24, '0'), %(user)s, s, 'topup', 10000000, "
            "s * 10000000, '{}', 0, "
            "timestamp '2026-01-01' + s * interval '1 second', "
            "'grant_' || lpad(to_hex(s), 24, '0') "
            "FROM generate_series(1::bigint, %(count)s) AS s",
            {"user": user_id, "count": count},
        )
        conn.execute(
            "INSERT INTO credits_grants (id, user_id, number, category, origin, amount_units, "
            "remaining_units, held_units, priority, effective_at, status, metadata_json, "
            "transaction_id, created_at) "
            "SELECT 'grant_' || lpad(to_hex(s), 24, '0'), %(user)s, s, 'paid', 'topup', "
            "10000000, 10000000, 0, 50, timestamp '2026-01-01' + s * interval '1 second', "
            "'active', '{}', 'ctx_' || lpad(to_hex(s), 24, '0'), "
            "timestamp '2026-01-01' + s * interval '1 second' "
            "FROM generate_series(1::bigint, %(count)s) AS s",
            {"user": user_id, "count": count},
        )
        conn.execute(
            "INSERT INTO credits (user_id, balance_units, last_seq, created_at, updated_at, "
            "last_grant_number) "
            "VALUES (%(user)s, %(count)s::bigint * 10000000, %(count)s, timestamp '2026-01-01', "
            "timestamp '2026-01-01' + %(count)s * interval '1 second', %(count)s)",
            {"user": user_id, "count": count},
        )
        conn.execute("VACUUM ANALYZE credits_transactions")
        conn.execute("VACUUM ANALYZE credits_grants")


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
