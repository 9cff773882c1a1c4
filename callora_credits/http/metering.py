"""``@charge_credits``: make any host route a paid endpoint.

The caller is resolved as the blueprint does it; the price is held before the
view runs, captured when the view answers 2xx, and released otherwise
(an error response or an exception). A view can lower its final price with
:func:`set_final_price`. If the capture still fails after the ledger's
retries, the view's response is returned, the hold is left to expire (so the
caller is never charged twice), an error is logged and ``capture_failed`` is
sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

from flask import Request, Response, current_app, make_response, request

from ..config import config
from ..core import signals
from ..core.money import format_units, parse_amount
from ..errors import CreditsError, ServiceUnavailable
from ..extension import current_ledger
from .auth import authenticate
from .blueprint import error_response, printable, request_id

__all__ = ["charge_credits", "set_final_price"]

log = logging.getLogger("callora_credits")

F = TypeVar("F", bound=Callable[..., Any])
Price = str | Callable[[Request], str]

_HELD = "callora_credits.held_units"
_FINAL = "callora_credits.final_units"


def set_final_price(amount_usdc: str) -> None:
    """Lower the price of the current metered request (e.g. ``"0.0040000"``).

    Call it from a view decorated with :func:`charge_credits`. The amount may
    be zero (nothing is charged) but never above the held price: that raises
    :class:`ValueError`, which releases the hold like any view error.
    """
    held = request.environ.get(_HELD)
    if held is None:
        raise RuntimeError("set_final_price() is only for views decorated with @charge_credits")
    units = parse_amount(amount_usdc, max_units=held, allow_zero=True)
    request.environ[_FINAL] = units


def charge_credits(price: Price) -> Callable[[F], F]:
    """Charge the caller ``price`` USDC for each successful call of the view.

    ``price`` is a string such as ``"0.0100000"``, or a callable taking the
    request and returning one. Responses gain ``X-Credits-Charged`` and
    ``X-Credits-Balance``. A caller who cannot pay gets a 402 in the library's
    error shape and the view does not run; so does one who cannot be served
    because the database is unavailable (503 ``SERVICE_UNAVAILABLE`` with
    ``Retry-After``).
    """

    def decorator(view: F) -> F:
        @wraps(view)
        def metered(*args: Any, **kwargs: Any) -> Response:
            cfg = config()
            try:
                caller = authenticate(request.headers, cfg)
                quoted = price(request) if callable(price) else price
                units = parse_amount(quoted, max_units=cfg.max_amount_units)
                ledger = current_ledger()
                hold = ledger.hold(
                    caller.user_id,
                    units,
                    actor_id=caller.user_id,
                    metadata={"path": printable(request.path)[:500], "request_id": request_id()},
                )
            except CreditsError as error:
                return error_response(error)
            request.environ[_HELD] = units
            try:
                response = make_response(view(*args, **kwargs))
            except BaseException:
                _release(hold.id)
                raise
            if not 200 <= response.status_code < 300:
                _release(hold.id)
                response.headers["X-Credits-Charged"] = format_units(0)
                return response
            final = request.environ.get(_FINAL, units)
            try:
                captured = ledger.capture(
                    hold.id, final, actor_id=caller.user_id, idempotency_key=f"meter:{hold.id}"
                )
            except Exception as exc:
                log.error(
                    "credits: capture of hold %s failed; it will expire uncharged",
                    hold.id,
                    exc_info=exc,
                    extra={"request_id": request_id()},
                )
                try:
                    signals.capture_failed.send(
                        cast(Any, current_app)._get_current_object(), hold=hold, error=exc
                    )
                except Exception:
                    log.exception("credits: a capture_failed receiver failed")
                return response
            response.headers["X-Credits-Charged"] = format_units(captured.captured_units)
            try:
                balance = ledger.find_by_user_id(caller.user_id)
            except ServiceUnavailable:
                # The charge is made; only the header is left out.
                balance = None
            if balance is not None:
                response.headers["X-Credits-Balance"] = format_units(balance.balance_units)
            return response

        return cast(F, metered)

    return decorator


def _release(hold_id: str) -> None:
    try:
        current_ledger().release(hold_id, idempotency_key=f"meter-release:{hold_id}")
    except ServiceUnavailable:
        log.warning("credits: release of hold %s failed; it will expire", hold_id)
    except CreditsError:
        pass  # already resolved or expired: nothing is held any more
    except Exception:
        log.exception("credits: release of hold %s failed; it will expire", hold_id)
