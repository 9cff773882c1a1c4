"""The README quickstart, from a built wheel, in a fresh virtualenv.

No access to the source tree: the wheel is installed into a new virtualenv,
the host app is the README's quickstart block verbatim, migrations are
applied with the documented command, and the documented calls are made
against a real server on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quickstart_source() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(# quickstart: app\.py\n.*?)```", readme, re.S)
    assert len(blocks) == 1, "README must hold exactly one '# quickstart: app.py' block"
    return blocks[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(method: str, url: str, token: str, body: dict | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
        headers["Idempotency-Key"] = uuid.uuid4().hex
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_wheel_into_fresh_virtualenv_runs_the_quickstart(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.sqlite3", "site"
        ),
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
    )
    wheel = next(dist.glob("callora_credits-*.whl"))

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True
    )

    host = tmp_path / "host"
    host.mkdir()
    (host / "app.py").write_text(quickstart_source(), encoding="utf-8")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "VIRTUAL_ENV") and not key.startswith("CREDITS_")
    }
    env.update(
        DATABASE_URL=f"sqlite:///{host / 'credits.sqlite3'}",
        JWT_SECRET_KEY="clean-install-secret-" + "0" * 32,
        PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
    )
    flask = str(venv / "bin" / "flask")
    upgrade = subprocess.run(
        [flask, "--app", "app", "credits", "db", "upgrade"],
        cwd=host, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    where = subprocess.run(
        [str(python), "-c", "import callora_credits; print(callora_credits.__file__)"],
        cwd=host, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert str(venv) in where.stdout  # the installed copy, not the source tree

    mint = (
        "from app import app\n"
        "from flask_jwt_extended import create_access_token\n"
        "with app.app_context():\n"
        "    print(create_access_token('user_123'))\n"
        "    print(create_access_token('ops', additional_claims={'scope': 'credits:admin'}))\n"
        "    print(create_access_token('gw', additional_claims={'scope': 'credits:charge'}))\n"
    )
    tokens = subprocess.run(
        [str(python), "-c", mint], cwd=host, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    user, admin, service = tokens

    port = free_port()
    server = subprocess.Popen(
        [flask, "--app", "app", "run", "--port", str(port)],
        cwd=host, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/api/billing"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, balance = call("GET", f"{base}/credits", user)
                break
            except (ConnectionError, urllib.error.URLError):
                assert time.monotonic() < deadline, "the quickstart server did not start"
                time.sleep(0.2)
        assert (status, balance["balance_usdc"]) == (200, "0.0000000")
        status, entry = call(
            "POST", f"{base}/credits/topup", admin, {"user_id": "user_123", "amount_usdc": "10"}
        )
        assert (status, entry["balance_after_usdc"]) == (201, "10.0000000")
        status, entry = call(
            "POST",
            f"{base}/credits/charge",
            service,
            {"user_id": "user_123", "amount_usdc": "2.5"},
        )
        assert (status, entry["balance_after_usdc"]) == (201, "7.5000000")
        status, history = call("GET", f"{base}/credits/transactions", user)
        assert status == 200
        assert [e["type"] for e in history["data"]] == ["charge", "topup"]
    finally:
        server.terminate()
        server.wait(timeout=10)
        server.stderr.close()
