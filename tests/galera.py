"""A three-node MariaDB Galera cluster on this machine, for tests, stress and bench.

Each node is a ``mariadbd`` with its own data directory, socket and loopback
ports (client, group communication, IST, SST) under one temporary directory;
the first node bootstraps the cluster (``--wsrep-new-cluster``) and the others
join it by rsync SST. :class:`GaleraCluster` starts them, waits until the
cluster has three synced members, creates the test database and migrates it
once, and kills everything on :meth:`~GaleraCluster.stop`.

Faults: :meth:`~GaleraCluster.kill` (SIGKILL) and :meth:`~GaleraCluster.start_node`
(the node rejoins, by IST when the others still hold its missing writes);
:meth:`~GaleraCluster.isolate` (``gmcast.isolate=1``: the node leaves the
primary component and refuses queries with 1047) and
:meth:`~GaleraCluster.rejoin`.

:func:`prerequisites` names what is missing (the binaries, the galera
library, rsync, a ``mysql`` user when running as root); the pytest fixture
skips on it, except under ``CI=true``, where it fails.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from callora_credits import migrate

__all__ = ["GaleraCluster", "GaleraError", "Node", "prerequisites"]

MARIADBD = os.environ.get("CREDITS_GALERA_MARIADBD", "/usr/sbin/mariadbd")
PROVIDER = os.environ.get("CREDITS_GALERA_PROVIDER", "/usr/lib/galera/libgalera_smm.so")
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
DATABASE = "credits_galera"

#: Failure detection fast enough for a test (defaults: suspect after 5 s,
#: evict after 15 s), and a gcache big enough to rejoin a node by IST.
PROVIDER_OPTIONS = (
    "evs.keepalive_period=PT0.5S;evs.suspect_timeout=PT2S;evs.inactive_timeout=PT4S;"
    "evs.inactive_check_period=PT0.5S;evs.install_timeout=PT3S;gcache.size=128M;"
    "pc.wait_prim_timeout=PT10S"
)


class GaleraError(RuntimeError):
    """The cluster did not start, or a node did not reach the state asked for."""


def prerequisites() -> str | None:
    """What this machine lacks to run the cluster, or ``None``."""
    for path, what in (
        (MARIADBD, "the MariaDB server"),
        (INSTALL_DB, "mariadb-install-db"),
        (PROVIDER, "the Galera library (Debian: galera-4)"),
    ):
        if not os.path.exists(path):
            return f"{what} is not at {path}"
    if shutil.which("rsync") is None or shutil.which("wsrep_sst_rsync") is None:
        return "rsync and wsrep_sst_rsync are needed for the nodes to join (SST)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("mysql")
        except KeyError:
            return "running as root without a 'mysql' user to run the nodes as"
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Node:
    """One ``mariadbd`` of the cluster."""

    index: int
    datadir: Path
    port: int
    gcomm_port: int
    ist_port: int
    sst_port: int
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return f"node{self.index + 1}"

    def url(self, database: str = DATABASE) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{database}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class GaleraCluster:
    """Three Galera nodes under ``base`` (a new temporary directory by default)."""

    def __init__(self, size: int = 3, base: Path | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="credits-galera-")) if base is None else base
        self.user = "mysql" if os.geteuid() == 0 else None
        ports = free_ports(4 * size)
        self.nodes = [
            Node(
                i,
                self.base / f"node{i + 1}",
                port=ports[4 * i],
                gcomm_port=ports[4 * i + 1],
                ist_port=ports[4 * i + 2],
                sst_port=ports[4 * i + 3],
            )
            for i in range(size)
        ]
        for node in self.nodes:
            node.log = self.base / f"{node.name}.err"
        self.database = DATABASE
        self._sync_conns: dict[int, pymysql.Connection[Any]] = {}

    # --- life cycle -----------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Bootstrap node 1, join the others, create and migrate the database."""
        if self.user is not None:
            shutil.chown(self.base, self.user, self.user)
        first = self.nodes[0]
        self._install(first)
        self.start_node(0, bootstrap=True, timeout=timeout)
        self.sql(
            0,
            f"CREATE DATABASE {self.database} CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin",
        )
        for index in range(1, len(self.nodes)):
            self.nodes[index].datadir.mkdir()
            if self.user is not None:
                shutil.chown(self.nodes[index].datadir, self.user, self.user)
            self.start_node(index, timeout=timeout)
        self.wait_synced(timeout=timeout)
        engine = sa.create_engine(first.url(), poolclass=NullPool)
        try:
            migrate.upgrade(engine)
        finally:
            engine.dispose()

    def _install(self, node: Node) -> None:
        command = [
            INSTALL_DB,
            "--no-defaults",
            f"--datadir={node.datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--skip-name-resolve",
        ]
        if self.user is not None:
            command.append(f"--user={self.user}")
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise GaleraError(f"mariadb-install-db failed: {done.stdout}\n{done.stderr}")

    def _command(self, node: Node, bootstrap: bool) -> list[str]:
        cluster = ",".join(f"127.0.0.1:{other.gcomm_port}" for other in self.nodes)
        options = (
            f"gmcast.listen_addr=tcp://127.0.0.1:{node.gcomm_port};"
            f"ist.recv_addr=127.0.0.1:{node.ist_port};{PROVIDER_OPTIONS}"
        )
        command = [
            MARIADBD,
            "--no-defaults",
            f"--datadir={node.datadir}",
            f"--socket={self.base / (node.name + '.sock')}",
            f"--pid-file={self.base / (node.name + '.pid')}",
            f"--log-error={node.log}",
            f"--port={node.port}",
            "--bind-address=127.0.0.1",
            "--skip-name-resolve",
            "--wsrep-on=ON",
            f"--wsrep-provider={PROVIDER}",
            f"--wsrep-cluster-address=gcomm://{cluster}",
            "--wsrep-cluster-name=credits_test",
            f"--wsrep-node-name={node.name}",
            f"--wsrep-node-address=127.0.0.1:{node.gcomm_port}",
            f"--wsrep-sst-receive-address=127.0.0.1:{node.sst_port}",
            "--wsrep-sst-method=rsync",
            f"--wsrep-provider-options={options}",
            "--wsrep-slave-threads=2",
            "--binlog-format=ROW",
            "--default-storage-engine=InnoDB",
            "--innodb-autoinc-lock-mode=2",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=48M",
            "--innodb-flush-log-at-trx-commit=2",
            "--performance-schema=OFF",
            "--max-connections=400",
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_nopad_bin",
        ]
        if self.user is not None:
            command.append(f"--user={self.user}")
        if bootstrap:
            command.append("--wsrep-new-cluster")
        return command

    def start_node(self, index: int, *, bootstrap: bool = False, timeout: float = 120.0) -> None:
        """Start node ``index`` (again) and wait until it is synced and ready."""
        node = self.nodes[index]
        if node.alive:
            raise GaleraError(f"{node.name} is already running")
        log = open(self.base / f"{node.name}.out", "ab")  # noqa: SIM115 (kept by the process)
        node.process = subprocess.Popen(
            self._command(node, bootstrap),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.wait_ready(index, timeout=timeout)

    def stop(self) -> None:
        """Kill every node and remove the directory."""
        for conn in self._sync_conns.values():
            with contextlib.suppress(Exception):
                conn.close()
        self._sync_conns.clear()
        for node in self.nodes:
            if node.alive:
                assert node.process is not None
                node.process.kill()
                node.process.wait(timeout=30)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> GaleraCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults ---------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (no shutdown, no goodbye to the others)."""
        node = self.nodes[index]
        if node.process is None:
            return
        os.kill(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)
        stale = self._sync_conns.pop(index, None)
        if stale is not None:
            with contextlib.suppress(Exception):
                stale.close()

    def restart(self, index: int, timeout: float = 120.0) -> None:
        """Start a killed node again; it rejoins the cluster (IST when it can)."""
        self.start_node(index, timeout=timeout)
        self.wait_synced(timeout=timeout)

    def isolate(self, index: int, timeout: float = 30.0) -> None:
        """Cut node ``index`` off the group: it leaves the primary component."""
        self.sql(index, "SET GLOBAL wsrep_provider_options='gmcast.isolate=1'")
        self._wait(index, lambda s: s.get("wsrep_cluster_status") != "Primary", timeout)
        others = [i for i in range(len(self.nodes)) if i != index]
        for other in others:
            self._wait(other, lambda s: s.get("wsrep_cluster_size") == str(len(others)), timeout)

    def rejoin(self, index: int, timeout: float = 60.0) -> None:
        """Undo :meth:`isolate` and wait until the node is synced again."""
        self.sql(index, "SET GLOBAL wsrep_provider_options='gmcast.isolate=0'")
        self.wait_synced(timeout=timeout)

    # --- state ----------------------------------------------------------------------

    def sql(self, index: int, *statements: str) -> list[tuple[Any, ...]]:
        """Run statements on node ``index`` over one plain PyMySQL connection
        (SQLAlchemy's first-connect queries fail on a non-primary node); the
        last one's rows."""
        conn = self._connect(index)
        try:
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
                return list(cursor.fetchall())
        finally:
            conn.close()

    def catch_up(self) -> None:
        """Wait until every live node has applied every write committed anywhere
        before this call (a read with ``wsrep_sync_wait`` on each)."""
        for node in self.nodes:
            if not node.alive:
                continue
            conn = self._sync_conns.get(node.index)
            try:
                if conn is None:
                    conn = self._sync_conns[node.index] = self._connect(node.index)
                    with conn.cursor() as cursor:
                        cursor.execute("SET SESSION wsrep_sync_wait=1")
                with conn.cursor() as cursor:
                    cursor.execute(f"SELECT 1 FROM {self.database}.credits_idempotency LIMIT 0")
            except pymysql.MySQLError:
                self._sync_conns.pop(node.index, None)
                raise

    def _connect(self, index: int) -> pymysql.Connection[Any]:
        return pymysql.connect(
            host="127.0.0.1",
            port=self.nodes[index].port,
            user="root",
            connect_timeout=5,
            autocommit=True,
        )

    def status(self, index: int) -> dict[str, str]:
        """Node ``index``'s ``wsrep_%`` status variables (empty if it does not answer)."""
        try:
            rows = self.sql(index, "SHOW GLOBAL STATUS LIKE 'wsrep%'")
        except pymysql.MySQLError:
            return {}
        return {str(name): str(value) for name, value in rows}

    def _wait(self, index: int, test: Any, timeout: float) -> dict[str, str]:
        node = self.nodes[index]
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while time.monotonic() < deadline:
            if node.process is not None and node.process.poll() is not None:
                raise GaleraError(f"{node.name} exited:\n{self.log_tail(index)}")
            last = self.status(index)
            if last and test(last):
                return last
            time.sleep(0.2)
        state = {k: last.get(k) for k in ("wsrep_cluster_size", "wsrep_ready")}
        raise GaleraError(f"{node.name} timed out ({state}):\n{self.log_tail(index)}")

    def wait_ready(self, index: int, timeout: float = 120.0) -> None:
        self._wait(
            index,
            lambda s: (
                s.get("wsrep_ready") == "ON" and s.get("wsrep_local_state_comment") == "Synced"
            ),
            timeout,
        )

    def wait_synced(self, timeout: float = 120.0) -> None:
        """Every node is up, in one primary component of all of them, synced."""
        size = str(len(self.nodes))
        for index in range(len(self.nodes)):
            self._wait(
                index,
                lambda s: (
                    s.get("wsrep_cluster_size") == size
                    and s.get("wsrep_ready") == "ON"
                    and s.get("wsrep_local_state_comment") == "Synced"
                ),
                timeout,
            )

    def log_tail(self, index: int, lines: int = 30) -> str:
        try:
            text = self.nodes[index].log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def urls(self) -> list[str]:
        return [node.url() for node in self.nodes]
