"""A throwaway PgBouncer in transaction pooling mode, in front of a PostgreSQL.

Debian's ``pgbouncer`` binary, with its own ini, auth file, log and pid file
in a temporary directory, listening on a free loopback port:

    with PgBouncer("127.0.0.1", 5432, pool_size=2) as bouncer:
        url = bouncer.url(database_url)  # the same database, through the bouncer
        ...

Every database of the server is reachable through it (a ``*`` entry), with
``auth_type = trust`` (the server itself decides who connects). The pool is
small on purpose, so the clients of one database and user share a few server
connections and a client's next transaction often runs on another one.
PgBouncer refuses to run as root: as root it is started with ``-u postgres``
and its directory is handed to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from sqlalchemy.engine import make_url

__all__ = ["PgBouncer", "PgBouncerFailed", "find_pgbouncer"]

#: Where Debian's package puts it (``/usr/sbin`` is not on every user's PATH).
DEBIAN_BINARY = "/usr/sbin/pgbouncer"
#: The unprivileged user a root caller runs it as.
RUN_AS = "postgres"


class PgBouncerFailed(RuntimeError):
    """PgBouncer did not start (its log is in the message)."""


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` binary, or ``None`` when it is not installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    """One PgBouncer process in transaction mode; :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        upstream_host: str = "127.0.0.1",
        upstream_port: int = 5432,
        *,
        pool_size: int = 2,
        max_client_conn: int = 400,
        binary: str | None = None,
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.binary = binary or find_pgbouncer()
        self.port = 0
        self.directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path | None:
        return None if self.directory is None else self.directory / "pgbouncer.log"

    def url(self, database_url: str) -> str:
        """``database_url`` (a SQLAlchemy URL on the upstream server) through the bouncer."""
        parsed = make_url(database_url).set(host="127.0.0.1", port=self.port)
        return parsed.render_as_string(hide_password=False)

    def dsn(self, database: str, user: str = "postgres") -> str:
        """A libpq connection string through the bouncer."""
        return f"host=127.0.0.1 port={self.port} dbname={database} user={user}"

    def log_text(self) -> str:
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return path.read_text(errors="replace")

    def _write_config(self, directory: Path, user: str) -> Path:
        (directory / "userlist.txt").write_text(f'"{user}" ""\n')
        ini = directory / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = host={self.upstream_host} port={self.upstream_port}\n"
            "\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {directory / 'userlist.txt'}\n"
            f"logfile = {directory / 'pgbouncer.log'}\n"
            f"pidfile = {directory / 'pgbouncer.pid'}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            "min_pool_size = 0\n"
            "reserve_pool_size = 0\n"
            f"max_client_conn = {self.max_client_conn}\n"
            # psycopg and SQLAlchemy send no startup options PgBouncer would
            # refuse, but libpq's environment (PGOPTIONS) might.
            "ignore_startup_parameters = extra_float_digits,options\n"
            "server_check_delay = 0\n"
            # A server that went away (an outage, a restart) is tried again
            # within a second, not after the default 15.
            "server_login_retry = 1\n"
            "server_connect_timeout = 5\n"
            "query_wait_timeout = 60\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        return ini

    def start(self, timeout: float = 15.0) -> PgBouncer:
        """Start it; return once it accepts connections."""
        if self.binary is None:
            raise PgBouncerFailed("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        # Not under pytest's tmp_path: a root-owned 0700 parent would keep the
        # postgres user out.
        directory = Path(tempfile.mkdtemp(prefix="callora-pgbouncer-"))
        self.directory = directory
        command = [self.binary]
        user = "postgres"
        if os.geteuid() == 0:
            entry = pwd.getpwnam(RUN_AS)
            command += ["-u", RUN_AS]
            user = RUN_AS
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        last_error = ""
        for _attempt in range(3):  # another process may take the free port first
            self.port = _free_port()
            ini = self._write_config(directory, user)
            if os.geteuid() == 0:
                for name in ("pgbouncer.ini", "userlist.txt"):
                    os.chown(directory / name, entry.pw_uid, entry.pw_gid)
            self._process = subprocess.Popen(  # noqa: S603 - the installed pgbouncer
                [*command, str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            if self._wait_ready(timeout):
                return self
            last_error = self.log_text()[-2000:]
            self._terminate()
        self.stop()
        raise PgBouncerFailed(f"pgbouncer did not start:\n{last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                return False
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return True
            time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)  # immediate shutdown
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def stop(self) -> None:
        """Stop it and remove its directory."""
        self._terminate()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def __enter__(self) -> PgBouncer:
        return self.start() if self._process is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
