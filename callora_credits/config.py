"""Configuration keys, their defaults, and a typed read-only view of them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import current_app

from .core.money import parse_limit

__all__ = ["DEFAULTS", "CreditsConfig", "config"]

#: Every key the library reads, with its default. Set on the host
#: app with ``setdefault`` when the blueprint is registered.
DEFAULTS: Mapping[str, Any] = {
    "CREDITS_TRUST_USER_ID_HEADER": False,
    "CREDITS_SCOPE_CLAIM": "scope",
    "CREDITS_ADMIN_SCOPE": "credits:admin",
    "CREDITS_SERVICE_SCOPE": "credits:charge",
    "CREDITS_MAX_AMOUNT_USDC": "1000000000",
    "CREDITS_MAX_BALANCE_USDC": "100000000000",
    "CREDITS_MAX_BODY_BYTES": 65536,
    "CREDITS_HOLD_TTL_SECONDS": 900,
    "CREDITS_HOLD_TTL_MAX_SECONDS": 86400,
    "CREDITS_IDEMPOTENCY_TTL_SECONDS": 86400,
    "CREDITS_IDEMPOTENCY_WAIT_SECONDS": 5,
    "CREDITS_LOW_BALANCE_USDC": None,
    "CREDITS_PAGE_SIZE_MAX": 100,
    "CREDITS_DB_RETRIES": 10,
    "CREDITS_DB_RETRY_SECONDS": 5,
    "CREDITS_BIND_KEY": None,
    "CREDITS_RATE_LIMIT": None,
    "CREDITS_RATE_LIMIT_WRITE": None,
    "CREDITS_RATE_LIMIT_STORAGE_URI": "memory://",
    "CREDITS_RATE_LIMITER": None,
    "CREDITS_METRICS": True,
    "CREDITS_METRICS_REGISTRY": None,
    "CREDITS_PG_PREPARED_STATEMENTS": False,
    "CREDITS_GALERA_CAUSAL_READS": False,
}


class CreditsConfig:
    """A typed view of the ``CREDITS_*`` keys of one app's config.

    Amount limits are parsed into units once, when the view is built.
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        def get(key: str) -> Any:
            return values[key] if key in values else DEFAULTS[key]

        self.trust_user_id_header = bool(get("CREDITS_TRUST_USER_ID_HEADER"))
        self.scope_claim = str(get("CREDITS_SCOPE_CLAIM"))
        self.admin_scope = str(get("CREDITS_ADMIN_SCOPE"))
        self.service_scope = str(get("CREDITS_SERVICE_SCOPE"))
        self.max_amount_units = parse_limit(get("CREDITS_MAX_AMOUNT_USDC"))
        self.max_balance_units = parse_limit(get("CREDITS_MAX_BALANCE_USDC"))
        self.max_body_bytes = int(get("CREDITS_MAX_BODY_BYTES"))
        self.hold_ttl_seconds = int(get("CREDITS_HOLD_TTL_SECONDS"))
        self.hold_ttl_max_seconds = int(get("CREDITS_HOLD_TTL_MAX_SECONDS"))
        self.idempotency_ttl_seconds = int(get("CREDITS_IDEMPOTENCY_TTL_SECONDS"))
        self.idempotency_wait_seconds = float(get("CREDITS_IDEMPOTENCY_WAIT_SECONDS"))
        low = get("CREDITS_LOW_BALANCE_USDC")
        self.low_balance_units = None if low is None else parse_limit(low)
        self.page_size_max = int(get("CREDITS_PAGE_SIZE_MAX"))
        self.db_retries = int(get("CREDITS_DB_RETRIES"))
        self.db_retry_seconds = float(get("CREDITS_DB_RETRY_SECONDS"))
        bind_key = get("CREDITS_BIND_KEY")
        if bind_key is not None and not isinstance(bind_key, str):
            raise ValueError(
                f"CREDITS_BIND_KEY must be None (the default database) or the name of one "
                f"of SQLALCHEMY_BINDS, not {bind_key!r}"
            )
        #: The Flask-SQLAlchemy bind the ledger's tables live on; ``None`` is
        #: the default database.
        self.bind_key: str | None = bind_key
        #: One budget per caller across every credits route, and one more for
        #: POSTs (Flask-Limiter strings such as ``"20/second;1000/minute"``).
        self.rate_limit = _limit_string("CREDITS_RATE_LIMIT", get("CREDITS_RATE_LIMIT"))
        self.rate_limit_write = _limit_string(
            "CREDITS_RATE_LIMIT_WRITE", get("CREDITS_RATE_LIMIT_WRITE")
        )
        self.rate_limit_storage_uri = str(get("CREDITS_RATE_LIMIT_STORAGE_URI"))
        #: A host's own ``flask_limiter.Limiter`` to register the limits on.
        self.rate_limiter: Any = get("CREDITS_RATE_LIMITER")
        #: Collect Prometheus metrics (when ``prometheus_client`` is installed).
        self.metrics = bool(get("CREDITS_METRICS"))
        #: The ``prometheus_client`` registry; ``None`` is its default ``REGISTRY``.
        self.metrics_registry: Any = get("CREDITS_METRICS_REGISTRY")
        #: Let psycopg prepare server-side statements on PostgreSQL. Off by
        #: default: a transaction pooler (PgBouncer) cannot keep them.
        self.pg_prepared_statements = bool(get("CREDITS_PG_PREPARED_STATEMENTS"))
        #: Make the library's own reads on a Galera node wait until the node
        #: has applied every write committed anywhere in the cluster.
        self.galera_causal_reads = bool(get("CREDITS_GALERA_CAUSAL_READS"))


def _limit_string(key: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(
            f"{key} must be None (off) or a Flask-Limiter limit string such as "
            f'"20/second;1000/minute", not {value!r}'
        )
    return value


_CACHE_KEY = "callora_credits.config"


def config() -> CreditsConfig:
    """The current app's credits configuration.

    Parsed once and kept on the app; rebuilt when any ``CREDITS_*`` value
    changes, so a key changed at run time takes effect at once.
    """
    app_config = current_app.config
    values = tuple(app_config.get(key) for key in DEFAULTS)
    cached = current_app.extensions.get(_CACHE_KEY)
    if cached is not None and cached[0] == values:
        view: CreditsConfig = cached[1]
        return view
    view = CreditsConfig(app_config)
    current_app.extensions[_CACHE_KEY] = (values, view)
    return view
