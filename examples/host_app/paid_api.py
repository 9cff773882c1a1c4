"""The host's paid endpoints: ordinary Flask views made paid with one decorator.

``@charge_credits(price)`` holds the price before the view runs, captures it
when the view answers 2xx and releases it otherwise; a caller who cannot pay
gets a 402 ``INSUFFICIENT_CREDITS`` and the view never runs.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from flask import Blueprint, jsonify, request

from callora_credits import charge_credits, set_final_price

__all__ = ["ECHO_PRICE_USDC", "ECHO_SHORT_PRICE_USDC", "QUOTE_PRICE_USDC", "bp"]

QUOTE_PRICE_USDC = "0.0100000"
ECHO_PRICE_USDC = "0.0100000"
#: What an echo of at most ``ECHO_SHORT_LENGTH`` characters finally costs.
ECHO_SHORT_PRICE_USDC = "0.0040000"
ECHO_SHORT_LENGTH = 32
ECHO_MAX_LENGTH = 500

QUOTES = (
    "Simple is better than complex.",
    "Errors should never pass silently.",
    "In the face of ambiguity, refuse the temptation to guess.",
    "Now is better than never.",
    "Readability counts.",
)

bp = Blueprint("paid_api", __name__)


@bp.get("/api/quote")
@charge_credits(QUOTE_PRICE_USDC)
def quote() -> Any:
    """A quote of the day: a stand-in for the host's real paid API."""
    today = date.today()
    return jsonify(quote=QUOTES[today.toordinal() % len(QUOTES)], date=today.isoformat())


@bp.get("/api/echo")
@charge_credits(ECHO_PRICE_USDC)
def echo() -> Any:
    """Echo ``?text=``: priced at the most it can cost, lowered for short texts.

    The hold covers the dearest case; once the view knows the work was small,
    ``set_final_price`` charges less. An empty or overlong text is a 400, and
    a non-2xx answer releases the hold: the caller pays nothing.
    """
    text = request.args.get("text", "")
    if not 0 < len(text) <= ECHO_MAX_LENGTH:
        return jsonify(
            code="VALIDATION_ERROR",
            message=f"Send ?text= with 1 to {ECHO_MAX_LENGTH} characters",
        ), 400
    if len(text) <= ECHO_SHORT_LENGTH:
        set_final_price(ECHO_SHORT_PRICE_USDC)
    return jsonify(text=text)
