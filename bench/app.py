"""A minimal host app for the benchmark: the README's way of mounting the blueprint.

Flask + Flask-SQLAlchemy + Flask-JWT-Extended + ``credits_bp``, configured
from the environment. Served by gunicorn with ``app:create_app()``.

- ``BENCH_DATABASE_URL``: SQLAlchemy URL (``postgresql+psycopg://…``)
- ``BENCH_JWT_SECRET``: the HS256 key tokens are signed with
- ``BENCH_POOL_SIZE``: connections per process (default 4)
- ``BENCH_FAST_PATH=off``: the library's hot statements go through
  ``Connection.execute`` instead of the DBAPI cursor (what the cursor call
  saves; see docs/decisions.md)
- ``BENCH_RATE_LIMIT`` / ``BENCH_RATE_LIMIT_STORAGE_URI``: ``CREDITS_RATE_LIMIT``
  and its storage (default: no rate limits); ``BENCH_RATELIMIT_KEY_PREFIX``:
  the run's own prefix in a shared Redis
- ``BENCH_METRICS=on``: Prometheus metrics (``CREDITS_METRICS``; off by
  default, so the other sections measure the library without them)
"""

from __future__ import annotations

import os

from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy

from callora_credits import credits_bp

DEFAULT_SECRET = "bench-secret-key-long-enough-for-hs256"


def fast_path() -> bool:
    """Whether hot statements use the DBAPI cursor (``BENCH_FAST_PATH``, default on)."""
    return os.environ.get("BENCH_FAST_PATH", "on") != "off"


def create_app(database_url: str | None = None, pool_size: int | None = None) -> Flask:
    """The host app; arguments override the environment (used in process)."""
    if not fast_path():
        from callora_credits.db import prepared

        # As if Connection.execute would do more than the cursor call, always.
        prepared._plain = lambda conn, neutral: False  # type: ignore[assignment]
    url = database_url or os.environ["BENCH_DATABASE_URL"]
    size = pool_size or int(os.environ.get("BENCH_POOL_SIZE", "4"))
    app = Flask("callora_bench_host")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": size, "max_overflow": size},
        JWT_SECRET_KEY=os.environ.get(
            "BENCH_JWT_SECRET", "bench-secret-key-long-enough-for-hs256"
        ),
    )
    app.config["CREDITS_METRICS"] = os.environ.get("BENCH_METRICS", "off") == "on"
    if os.environ.get("BENCH_RATE_LIMIT"):
        app.config.update(
            CREDITS_RATE_LIMIT=os.environ["BENCH_RATE_LIMIT"],
            CREDITS_RATE_LIMIT_STORAGE_URI=os.environ.get(
                "BENCH_RATE_LIMIT_STORAGE_URI", "memory://"
            ),
            RATELIMIT_KEY_PREFIX=os.environ.get("BENCH_RATELIMIT_KEY_PREFIX", ""),
        )
    db = SQLAlchemy()
    db.init_app(app)
    JWTManager(app)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")
    return app
