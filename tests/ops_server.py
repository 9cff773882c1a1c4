"""The example host app under gunicorn, for the rate limit and metrics tests.

``create_app()`` is what gunicorn loads (``ops_server:create_app()``): the
example app (examples/host_app) with the test's settings from the
``OPS_CONFIG`` environment variable (JSON), each response naming the worker
that served it (``X-Worker-Pid``), and the library's log lines on stderr with
the worker's pid. :class:`OpsServer` starts it with two sync workers and
stops it, with the whole process group, however the test ends.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
EXAMPLES_DIR = ROOT / "examples"


def create_app() -> Flask:
    """The example host app with ``OPS_CONFIG`` (the gunicorn entry point)."""
    from host_app import create_app as example_app

    app = example_app(json.loads(os.environ["OPS_CONFIG"]))

    @app.after_request
    def _name_worker(response: Response) -> Response:
        response.headers["X-Worker-Pid"] = str(os.getpid())
        return response

    logger = logging.getLogger("callora_credits")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ops-log pid=%(process)d %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    return app


def bearer(user: str, scopes: str | None = None) -> dict[str, str]:
    """The Authorization header of a token for ``user`` with ``scopes``."""
    from conftest import make_token

    return {"Authorization": f"Bearer {make_token(user, scopes=scopes)}"}


def fresh(prefix: str = "user") -> str:
    """An id no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Reply:
    """One HTTP answer: status, headers, body."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def worker(self) -> int:
        return int(self.headers["X-Worker-Pid"])


class OpsServer:
    """gunicorn with two sync workers serving :func:`create_app` on a free port."""

    def __init__(
        self, config: Mapping[str, Any], log_path: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.port = closed_port()
        self.log_path = log_path
        pythonpath = os.pathsep.join([str(ROOT), str(EXAMPLES_DIR), str(TESTS_DIR)])
        environ = {
            **os.environ,
            "PYTHONPATH": pythonpath,
            "OPS_CONFIG": json.dumps(dict(config)),
            **(env or {}),
        }
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(EXAMPLES_DIR / "gunicorn.conf.py"),
            "--bind",
            f"127.0.0.1:{self.port}",
            "--workers",
            "2",
            "--worker-class",
            "sync",
            "--log-level",
            "info",
            "ops_server:create_app()",
        ]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            command,
            cwd=TESTS_DIR,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited at start-up:\n{self.log_text()[-3000:]}")
            if self.log_text().count("Booting worker with pid") >= 2:
                # A host route (401 without a token): the start-up check spends
                # no rate limit budget and shows in no credits metric.
                with contextlib.suppress(OSError):
                    if self.request("GET", "/api/projects").status == 401:
                        return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not become ready:\n{self.log_text()[-3000:]}")

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> Reply:
        """One request on a new connection (so either worker may take it)."""
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=sent)
            response = conn.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, pattern: str) -> list[re.Match[str]]:
        return list(re.finditer(pattern, self.log_text()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._log.close()
