"""``GET /metrics``: the process's Prometheus metrics, the library's included.

The library registers its ``credits_*`` metrics on ``prometheus_client``'s
default registry. Under gunicorn, each worker is a process of its own: with
``PROMETHEUS_MULTIPROC_DIR`` set (an empty directory, before gunicorn starts)
every worker writes its values there, and this endpoint adds up all of them.
Without ``prometheus_client`` installed there is no endpoint, and the library
collects nothing.

In production, serve this on an address only Prometheus reaches (or behind
your own auth): it shows traffic and money volumes.
"""

from __future__ import annotations

import os

from flask import Flask, Response

__all__ = ["add_metrics_endpoint"]


def add_metrics_endpoint(app: Flask) -> None:
    """Add ``GET /metrics`` to ``app`` when ``prometheus_client`` is installed."""
    try:
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            REGISTRY,
            CollectorRegistry,
            generate_latest,
            multiprocess,
        )
    except ImportError:
        return

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # A fresh registry per scrape that reads every worker's files.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
