"""Prometheus metrics, when ``prometheus_client`` is installed (``callora-credits[metrics]``).

Registered once per registry (the host's, ``prometheus_client.REGISTRY`` by
default), so several apps in one process share them; under gunicorn with
``PROMETHEUS_MULTIPROC_DIR`` set, ``prometheus_client`` keeps every value in
per-process files that its ``MultiProcessCollector`` adds up.

No label carries a user id: routes are URL rules, never concrete paths.
Without ``prometheus_client`` nothing is collected and nothing else changes.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from flask import Flask

from .core import signals
from .core.idempotency import IdempotencyScope, Outcome, OutcomeCodec
from .core.ledger import Ledger
from .core.operations import Operation
from .db.unit_of_work import HostSession
from .errors import CreditsError

if TYPE_CHECKING:
    from .config import CreditsConfig
    from .extension import CreditsState

__all__ = ["METRIC_NAMES", "MeteredLedger", "Metrics", "setup_metrics"]

#: Every series the library exports (counters with their ``_total`` suffix).
METRIC_NAMES = (
    "credits_http_requests_total",
    "credits_http_request_duration_seconds",
    "credits_operations_total",
    "credits_units_total",
    "credits_db_retries_total",
    "credits_idempotent_replays_total",
)


class Metrics:
    """The library's metrics on one ``prometheus_client`` registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.http_requests = Counter(
            "credits_http_requests",
            "Responses of the credits routes, by URL rule, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "credits_http_request_duration_seconds",
            "Time to answer a credits request, by URL rule and method.",
            ["route", "method"],
            registry=registry,
        )
        self.operations = Counter(
            "credits_operations",
            "Money-moving operations run (not replayed), by operation and outcome: "
            "ok, or the error code in lower case.",
            ["operation", "outcome"],
            registry=registry,
        )
        self.units = Counter(
            "credits_units",
            "Units moved by committed ledger entries, by entry type (1 USDC = 10^7 units).",
            ["type"],
            registry=registry,
        )
        self.db_retries = Counter(
            "credits_db_retries",
            "Transactions run again after a transient failure, by reason.",
            ["reason"],
            registry=registry,
        )
        self.idempotent_replays = Counter(
            "credits_idempotent_replays",
            "Requests answered with the stored outcome of their idempotency key.",
            registry=registry,
        )

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one response of a credits route and its duration."""
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_duration.labels(route, method).observe(seconds)

    def operation(self, name: str, outcome: str) -> None:
        """Count one operation that ran: ``ok`` or its error code."""
        self.operations.labels(name, outcome.lower()).inc()

    def retry(self, reason: str) -> None:
        """Count one retried transaction (a :class:`RetryStats` listener)."""
        self.db_retries.labels(reason).inc()

    def entry_written(self, sender: Any, **kwargs: Any) -> None:
        """Count the units of a committed entry (a receiver of the ledger's signals)."""
        entry = kwargs.get("entry")
        if entry is not None:
            self.units.labels(str(entry.type)).inc(abs(entry.amount_units))


_LOCK = threading.Lock()
_BY_REGISTRY: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()


def metrics_for(registry: Any) -> Metrics:
    """The library's metrics on ``registry``, registered on first use."""
    with _LOCK:
        found = _BY_REGISTRY.get(registry)
        if found is None:
            try:
                found = Metrics(registry)
            except ValueError as exc:  # "Duplicated timeseries in CollectorRegistry"
                raise RuntimeError(
                    f"callora_credits cannot register its metrics ({exc}): another "
                    "collector on this registry uses a credits_* name. Give the library "
                    "its own registry with CREDITS_METRICS_REGISTRY, or set "
                    "CREDITS_METRICS = False."
                ) from None
            _BY_REGISTRY[registry] = found
        return found


class MeteredLedger(Ledger):
    """A :class:`~callora_credits.core.ledger.Ledger` that counts each operation
    by outcome, and each replay, on :class:`Metrics`."""

    def __init__(self, *args: Any, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    def execute(
        self,
        op: Operation,
        scope: IdempotencyScope,
        codec: OutcomeCodec,
        *,
        session: HostSession | None = None,
    ) -> Outcome:
        try:
            outcome = super().execute(op, scope, codec, session=session)
        except CreditsError as error:
            self.metrics.operation(op.name, error.code)
            raise
        except Exception:
            self.metrics.operation(op.name, "error")
            raise
        if outcome.replayed:
            self.metrics.idempotent_replays.inc()
        elif isinstance(outcome.result, CreditsError):
            self.metrics.operation(op.name, outcome.result.code)
        else:
            self.metrics.operation(op.name, "ok")
        return outcome


def setup_metrics(app: Flask, cfg: CreditsConfig, state: CreditsState) -> None:
    """Collect on ``CREDITS_METRICS_REGISTRY`` when ``prometheus_client`` is
    installed and ``CREDITS_METRICS`` is on; otherwise do nothing."""
    if not cfg.metrics:
        return
    try:
        import prometheus_client
    except ImportError:
        return
    registry = cfg.metrics_registry
    metrics = metrics_for(prometheus_client.REGISTRY if registry is None else registry)
    state.metrics = metrics
    state.stats.listeners.append(metrics.retry)
    for name in signals.__all__:
        # Every signal that carries an entry is sent once it has committed,
        # with the app as sender: units count what the ledger kept.
        getattr(signals, name).connect(metrics.entry_written, sender=app)
