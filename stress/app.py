"""A host app for the load harness, written the way the README says to.

Flask + Flask-SQLAlchemy + a ``JWTManager`` + ``credits_bp``; the database
comes from ``DATABASE_URL``. ``stress.app:app`` is what gunicorn and
``flask credits …`` load; it is built on first access, so importing
:func:`create_app` needs no environment.

Host settings a production deployment would also want, and why:

- ``pool_pre_ping``: a pooled connection the server has closed (a restart, a
  failover, ``pg_terminate_backend``, an idle timeout) is replaced at checkout
  instead of failing the first statement. The library retries a lost
  connection inside its own transactions anyway; pre-ping keeps
  those retries for connections that die mid-request.
- ``connect_args`` connect timeout: a database that does not answer fails a
  connection attempt in seconds, never hangs a worker.
- A small pool per worker (``STRESS_POOL_SIZE``, default the thread count):
  many workers share one server's connection limit.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from flask import Flask
from flask_jwt_extended import JWTManager
from flask_sqlalchemy import SQLAlchemy

from callora_credits import credits_bp

__all__ = ["DEFAULT_JWT_SECRET", "create_app", "engine_options"]

DEFAULT_JWT_SECRET = "stress-secret-key-that-is-long-enough-for-hs256"  # noqa: S105 - a test key


def engine_options(database_url: str) -> dict[str, Any]:
    """The SQLAlchemy engine options this host uses (see the module doc)."""
    if database_url.startswith("sqlite"):
        return {}
    pool_size = int(os.environ.get("STRESS_POOL_SIZE", "4"))
    options: dict[str, Any] = {
        "pool_pre_ping": os.environ.get("STRESS_POOL_PRE_PING", "1") != "0",
        "pool_size": pool_size,
        "max_overflow": 2,
        "pool_timeout": 10,
    }
    if database_url.startswith("mysql"):
        # PyMySQL: bound a read on a connection whose server went away.
        options["connect_args"] = {"connect_timeout": 5, "read_timeout": 30, "write_timeout": 30}
    else:
        options["connect_args"] = {"connect_timeout": 5}
    return options


class _RetriesAndErrors(logging.Filter):
    """Pass the library's retry notices and its warnings and errors only
    (not the per-request access lines), with a request id on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = "-"
        return record.levelno >= logging.WARNING or record.getMessage().startswith(
            "credits: retrying"
        )


def _log_to_stderr() -> None:
    logger = logging.getLogger("callora_credits")
    if any(getattr(h, "_stress", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._stress = True  # type: ignore[attr-defined]
    handler.addFilter(_RetriesAndErrors())
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s [%(process)d] %(levelname)s %(name)s request_id=%(request_id)s "
            "%(message)s"
        )
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def create_app(database_url: str | None = None) -> Flask:
    """The stress host app on ``database_url`` (default: ``$DATABASE_URL``)."""
    url = database_url or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("stress.app needs a database: set DATABASE_URL (a SQLAlchemy URL).")
    app = Flask("callora_stress_host")
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(url),
        JWT_SECRET_KEY=os.environ.get("STRESS_JWT_SECRET", DEFAULT_JWT_SECRET),
    )
    if os.environ.get("STRESS_DB_RETRY_SECONDS"):
        app.config["CREDITS_DB_RETRY_SECONDS"] = float(os.environ["STRESS_DB_RETRY_SECONDS"])
    db = SQLAlchemy()
    db.init_app(app)
    JWTManager(app)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")
    if os.environ.get("STRESS_LOG") == "1":
        _log_to_stderr()
        print(f"stress-app-ready pid={os.getpid()}", file=sys.stderr, flush=True)
    return app


def __getattr__(name: str) -> Any:
    # `stress.app:app` for gunicorn and `flask`, built on first access only.
    if name == "app":
        built = create_app()
        globals()["app"] = built
        return built
    raise AttributeError(name)
