"""Fault injectors: connections terminated, workers killed, the database gone.

None of them touches the shared database servers themselves:

- :class:`ConnectionKiller` ends the test database's own connections
  (``pg_terminate_backend`` / MariaDB ``KILL``), from an admin connection
  that is not one of them;
- :class:`WorkerKiller` sends SIGKILL to a worker of the harness's own
  gunicorn (gunicorn forks a new one);
- :class:`TcpProxy` sits between the app and the server; :meth:`TcpProxy.pause`
  resets every connection through it and refuses new ones for a moment.

Every loop here is bounded in time and count, and every socket is closed.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

__all__ = ["ConnectionKiller", "FaultInjector", "TcpProxy", "WorkerKiller", "child_pids"]


class ConnectionKiller:
    """Terminates every connection to one database, except its own."""

    def __init__(self, admin_url: URL, database: str) -> None:
        self.database = database
        self.dialect = admin_url.get_backend_name()
        self.engine = sa.create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self.terminated = 0

    def kill_once(self) -> int:
        """End the database's current connections; returns how many."""
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                count = conn.execute(
                    sa.text(
                        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) AS done"
                        " FROM pg_stat_activity WHERE datname = :db"
                        " AND pid <> pg_backend_pid()) AS t WHERE done"
                    ),
                    {"db": self.database},
                ).scalar_one()
            else:
                ids = conn.execute(
                    sa.text(
                        "SELECT id FROM information_schema.processlist"
                        " WHERE db = :db AND id <> CONNECTION_ID()"
                    ),
                    {"db": self.database},
                ).scalars()
                count = 0
                for thread_id in list(ids):
                    try:
                        conn.exec_driver_sql(f"KILL {int(thread_id)}")
                        count += 1
                    except sa.exc.DBAPIError:
                        pass  # 1094: it ended on its own meanwhile
        self.terminated += int(count)
        return int(count)

    def close(self) -> None:
        self.engine.dispose()


def child_pids(parent: int) -> list[int]:
    """The live processes whose parent is ``parent`` (Linux ``/proc``)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, fields[1] the parent pid.
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(name))
    return found


class WorkerKiller:
    """SIGKILLs one worker of a gunicorn master (ours: its pid is given)."""

    def __init__(self, master_pid: int, rng: random.Random) -> None:
        self.master_pid = master_pid
        self.rng = rng
        self.killed: list[int] = []

    def kill_once(self) -> int:
        workers = child_pids(self.master_pid)
        if not workers:
            return 0
        victim = self.rng.choice(workers)
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            return 0
        self.killed.append(victim)
        return 1


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.dead = False

    def abort(self) -> None:
        """Reset both sides now (RST, as a network failure would)."""
        self.dead = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class TcpProxy:
    """A loopback TCP proxy to ``target`` whose traffic can be cut.

    :meth:`pause` resets every proxied connection and closes the listening
    socket (new connections are refused); :meth:`resume` listens again on
    the same port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._listener: socket.socket | None = None
        self._want_listening = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._threads: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None
        self.connections = 0
        self.pauses = 0
        self.reset = 0

    def start(self) -> None:
        self._listen()
        self._want_listening.set()
        self._acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept")
        self._acceptor.start()

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not self._want_listening.is_set():
                if self._listener is not None:
                    self._listener.close()
                    self._listener = None
                time.sleep(0.02)
                continue
            if self._listener is None:
                try:
                    self._listen()
                except OSError:
                    time.sleep(0.05)
                    continue
            assert self._listener is not None
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                continue
            self._connect(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        client.settimeout(10)
        upstream.settimeout(10)
        pair = _Pair(client, upstream)
        with self._lock:
            if not self._want_listening.is_set():
                pair.abort()
            self._pairs.add(pair)
            self.connections += 1
            thread = threading.Thread(target=self._pump, args=(pair,), name="proxy-pump")
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _pump(self, pair: _Pair) -> None:
        peers = {pair.client: pair.upstream, pair.upstream: pair.client}
        try:
            while not pair.dead and not self._stop.is_set():
                readable, _, _ = select.select(list(peers), [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._pairs.discard(pair)
            pair.client.close()
            pair.upstream.close()

    def pause(self) -> int:
        """Cut every connection and refuse new ones; returns how many were cut."""
        self._want_listening.clear()
        with self._lock:
            pairs = list(self._pairs)
            self.pauses += 1
            self.reset += len(pairs)
        for pair in pairs:
            pair.abort()
        # Wait (bounded) until the acceptor has closed the listener.
        deadline = time.monotonic() + 2
        while self._listener is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(pairs)

    def resume(self) -> None:
        self._want_listening.set()
        deadline = time.monotonic() + 2
        while self._listener is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def outage(self, seconds: float) -> int:
        """The database unreachable for ``seconds``; returns connections cut."""
        cut = self.pause()
        time.sleep(seconds)
        self.resume()
        return cut

    def stop(self) -> None:
        self._stop.set()
        self._want_listening.set()
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        if self._acceptor is not None:
            self._acceptor.join(5)
        for thread in list(self._threads):
            thread.join(5)


class FaultInjector(threading.Thread):
    """Runs fault actions on a schedule between ``start_at`` and ``stop_at``.

    ``plan`` maps a fault name to ``(action, (min_gap, max_gap))``; with
    several faults the injector rotates through phases of ``phase_seconds``
    (a quiet phase first), one fault per phase.
    """

    def __init__(
        self,
        plan: dict[str, tuple[Callable[[], int], tuple[float, float]]],
        *,
        start_at: float,
        stop_at: float,
        phase_seconds: float = 15.0,
        rng: random.Random | None = None,
        max_events: int = 10_000,
    ) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.plan = plan
        self.start_at, self.stop_at = start_at, stop_at
        self.phase_seconds = phase_seconds
        self.rng = rng or random.Random(0)
        self.max_events = max_events
        self.events: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()
        self.errors: list[str] = []
        self._halt = threading.Event()

    def _current(self, now: float) -> str | None:
        names = list(self.plan)
        if len(names) == 1:
            return names[0]
        phases: list[str | None] = [None, *names]
        index = int((now - self.start_at) // self.phase_seconds) % len(phases)
        return phases[index]

    def run(self) -> None:
        while time.time() < self.start_at and not self._halt.is_set():
            self._halt.wait(0.05)
        total = 0
        while not self._halt.is_set() and total < self.max_events:
            now = time.time()
            if now >= self.stop_at:
                break
            name = self._current(now)
            if name is None:
                self._halt.wait(0.2)
                continue
            action, (low, high) = self.plan[name]
            self._halt.wait(self.rng.uniform(low, high))
            if self._halt.is_set() or time.time() >= self.stop_at:
                break
            try:
                self.hits[name] += action()
                self.events[name] += 1
            except Exception as exc:  # report, keep the schedule
                self.errors.append(f"{name}: {exc!r}")
            total += 1

    def halt(self) -> None:
        self._halt.set()
        self.join(30)
