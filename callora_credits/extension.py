"""Per-app state, kept in ``app.extensions["callora_credits"]``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import current_app
from sqlalchemy.engine import Engine

from .config import CreditsConfig, config
from .core.clock import Clock, utcnow
from .core.ledger import Ledger
from .db.unit_of_work import RetryStats

__all__ = ["CreditsState", "current_ledger", "ledger_for", "state"]

EXTENSION_KEY = "callora_credits"


class CreditsState:
    """What the library keeps per app: the clock, retry counts, the ledger.

    ``clock`` is the one clock hold expiry is compared against (the app's, in
    UTC); tests replace it to move time.
    """

    def __init__(self) -> None:
        self.clock: Clock = utcnow
        self.stats = RetryStats()
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
        self._ledger = Ledger(engine, config, clock=self._now, stats=self.stats, sender=sender)
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

    Runs on the host's Flask-SQLAlchemy default engine with the app's
    ``CREDITS_*`` configuration.
    """
    return ledger_for(config())


def ledger_for(cfg: CreditsConfig) -> Ledger:
    """:func:`current_ledger` with the configuration the caller has already read."""
    db = current_app.extensions["sqlalchemy"]
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    return state().ledger(db.engine, cfg, sender=app)
