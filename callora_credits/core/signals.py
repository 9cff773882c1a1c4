"""Blinker signals, sent after the change they announce has committed.

Best-effort: a crash between commit and send loses the signal; the ledger is
the record. Receivers get the app as sender and keyword arguments:
``entry`` (an :class:`~callora_credits.core.ledger.Entry`) for ledger changes,
``hold`` for hold events, ``user_id`` and ``balance_units`` for balance events.
"""

from __future__ import annotations

from blinker import Namespace

__all__ = [
    "balance_depleted",
    "balance_low",
    "capture_failed",
    "credits_adjusted",
    "credits_charged",
    "credits_refunded",
    "credits_topped_up",
    "grant_created",
    "grant_expired",
    "grant_voided",
    "hold_captured",
    "hold_created",
    "hold_released",
]

_signals = Namespace()

credits_topped_up = _signals.signal("credits-topped-up")
credits_charged = _signals.signal("credits-charged")
credits_refunded = _signals.signal("credits-refunded")
credits_adjusted = _signals.signal("credits-adjusted")
hold_created = _signals.signal("hold-created")
hold_captured = _signals.signal("hold-captured")
hold_released = _signals.signal("hold-released")
capture_failed = _signals.signal("capture-failed")
#: A grant was created (``grant``: a :class:`~callora_credits.core.records.Grant`).
grant_created = _signals.signal("grant-created")
#: A grant's unheld remaining left the balance at its expiry (``grant``, ``entry``:
#: the ``expiration`` entry, ``None`` when nothing was left).
grant_expired = _signals.signal("grant-expired")
#: A grant was voided (``grant``; ``entry``: the ``void`` entry, or ``None``).
grant_voided = _signals.signal("grant-voided")
#: The balance crossed ``CREDITS_LOW_BALANCE_USDC`` downwards.
balance_low = _signals.signal("balance-low")
#: The balance reached zero.
balance_depleted = _signals.signal("balance-depleted")
