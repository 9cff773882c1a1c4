"""gunicorn settings for the example host app with Prometheus metrics.

    PROMETHEUS_MULTIPROC_DIR=/tmp/credits-metrics \\
        gunicorn -c examples/gunicorn.conf.py --chdir examples "host_app:create_app()"

``PROMETHEUS_MULTIPROC_DIR`` must name an empty directory that exists before
gunicorn starts (empty it on each start): every worker writes its metric
values there, and ``/metrics`` adds them up.
"""

from __future__ import annotations

from typing import Any

workers = 2
bind = "127.0.0.1:5000"


def child_exit(server: Any, worker: Any) -> None:
    """Tell prometheus_client a worker is gone (its live gauges stop counting)."""
    try:
        from prometheus_client import multiprocess
    except ImportError:
        return
    multiprocess.mark_process_dead(worker.pid)
