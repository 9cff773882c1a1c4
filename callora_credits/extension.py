"""Per-app state, kept in ``app.extensions["callora_credits"]``."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from flask import Flask, current_app
from flask.sansio.app import App
from sqlalchemy.engine import Engine

from .config import CreditsConfig, config
from .core.clock import Clock, utcnow
from .core.ledger import Ledger
from .db.connections import configure_engine
from .db.unit_of_work import RetryStats

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["CreditsState", "check_engine", "current_ledger", "engine_for", "ledger_for", "state"]

EXTENSION_KEY = "callora_credits"


class CreditsState:
    """What the library keeps per app: the clock, retry counts, the ledger,
    and the metrics when they are collected.

    ``clock`` is the one clock hold expiry is compared against (the app's, in
    UTC); tests replace it to move time.
    """

    def __init__(self) -> None:
        self.clock: Clock = utcnow
        self.stats = RetryStats()
        self.metrics: Metrics | None = None
        self._ledger: Ledger | None = None

    def ledger(self, engine: Engine, config: CreditsConfig, sender: Any = None) -> Ledger:
        """The ledger on ``engine`` with ``config``; rebuilt when either changes."""
        cached = self._ledger
        if (
            cached is not None
            and cached.engine is engine
            and cached.config is config
            and cached.sender is sender
        ):
            return cached
        if self.metrics is None:
            self._ledger = Ledger(engine, config, clock=self._now, stats=self.stats, sender=sender)
        else:
            from .metrics import MeteredLedger

            self._ledger = MeteredLedger(
                engine,
                config,
                clock=self._now,
                stats=self.stats,
                sender=sender,
                metrics=self.metrics,
            )
        return self._ledger

    def _now(self) -> datetime:
        # Late-bound so a clock replaced after start-up is used at once.
        return self.clock()


def state() -> CreditsState:
    """The current app's state; explains the fix when the blueprint is missing."""
    try:
        found: CreditsState = current_app.extensions[EXTENSION_KEY]
    except KeyError:
        raise RuntimeError(
            "callora_credits is not set up on this app. Did you forget to call "
            'app.register_blueprint(credits_bp, url_prefix="/api/billing")?'
        ) from None
    return found


def current_ledger() -> Ledger:
    """The :class:`~callora_credits.core.ledger.Ledger` of the current app.

    Runs on the Flask-SQLAlchemy engine that ``CREDITS_BIND_KEY`` names (the
    default database unless set) with the app's ``CREDITS_*`` configuration.
    """
    return ledger_for(config())


def ledger_for(cfg: CreditsConfig) -> Ledger:
    """:func:`current_ledger` with the configuration the caller has already read."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    return state().ledger(engine_for(cfg), cfg, sender=app)


def engine_for(cfg: CreditsConfig) -> Engine:
    """The engine the credits tables live on, for the current app.

    Picked as Flask-SQLAlchemy picks a model's engine, by bind key from
    ``db.engines``: ``CREDITS_BIND_KEY`` names one of ``SQLALCHEMY_BINDS``, and
    ``None`` (the default) is the default database. Every door uses it: the
    routes, the Python API, ``@charge_credits`` and ``flask credits``,
    migrations included.
    """
    engines: Mapping[str | None, Engine] = current_app.extensions["sqlalchemy"].engines
    try:
        return engines[cfg.bind_key]
    except KeyError:
        raise RuntimeError(_no_such_bind(cfg.bind_key, engines)) from None


def check_engine(app: App, cfg: CreditsConfig) -> None:
    """Raise at registration, with the fix, when :func:`engine_for` would fail;
    otherwise set up the engine's connections for the library
    (:func:`~callora_credits.db.connections.configure_engine`)."""
    # A blueprint's setup state types the app as Flask's sans-io base.
    with cast(Flask, app).app_context():
        engine = engine_for(cfg)
    configure_engine(engine, prepared_statements=cfg.pg_prepared_statements)


def _no_such_bind(bind_key: str | None, engines: Mapping[str | None, Engine]) -> str:
    configured = ", ".join(repr(key) for key in engines if key is not None) or "none"
    if bind_key is None:
        return (
            "callora_credits keeps its tables on the app's default database, and this app "
            "has none: set SQLALCHEMY_DATABASE_URI, or set CREDITS_BIND_KEY to one of "
            f"SQLALCHEMY_BINDS (configured: {configured})."
        )
    return (
        f"CREDITS_BIND_KEY is {bind_key!r}, but SQLALCHEMY_BINDS has no such key "
        f"(configured: {configured}): add SQLALCHEMY_BINDS[{bind_key!r}] = <database URL> "
        "before db.init_app(app), or set CREDITS_BIND_KEY to a configured key "
        "(None for the default database)."
    )
