"""gunicorn settings of the stress host (``-c python:stress.gunicorn_conf``).

Each worker logs the library's retry counts
(``app.extensions["callora_credits"].stats.counts``) when it exits, as one
``credits-retry-stats`` line the harness adds up. A worker killed with
SIGKILL logs nothing; its retries still show as ``credits: retrying`` lines.
"""

from __future__ import annotations

import json
import os
from typing import Any

bind = os.environ.get("STRESS_BIND", "127.0.0.1:0")
workers = int(os.environ.get("STRESS_WORKERS", "4"))
worker_class = "gthread"
threads = int(os.environ.get("STRESS_THREADS", "4"))
# Import the app once in the master and fork it: workers (and the ones that
# replace killed workers) start at once. Nothing has connected before the
# fork (Flask-SQLAlchemy creates its engine lazily-connecting), so no pooled
# connection is shared between processes.
preload_app = os.environ.get("STRESS_PRELOAD", "1") == "1"
keepalive = 30
timeout = 30
graceful_timeout = 5
loglevel = "info"
errorlog = "-"


def worker_exit(server: Any, worker: Any) -> None:
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("callora_credits")
    counts = dict(state.stats.counts) if state is not None else {}
    server.log.info(
        "credits-retry-stats pid=%d %s", os.getpid(), json.dumps(counts, sort_keys=True)
    )
