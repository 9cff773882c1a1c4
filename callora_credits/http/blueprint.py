"""``credits_bp``: registration, request ids, error rendering, routing errors.

Everything here is registered on the blueprint, never app-wide, so the host's
own error pages and hooks are untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from flask import Blueprint, Flask, Response, current_app, request
from flask.blueprints import BlueprintSetupState
from pydantic import BaseModel
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException
from werkzeug.exceptions import MethodNotAllowed as WerkzeugMethodNotAllowed
from werkzeug.exceptions import NotFound as WerkzeugNotFound
from werkzeug.routing import Map, PathConverter, Rule

from ..config import DEFAULTS
from ..core.records import dumps
from ..errors import (
    CreditsError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    ValidationError,
)
from ..extension import EXTENSION_KEY, CreditsState, check_engine
from .conditional import apply_conditional
from .responses import error_body, new_request_id, sanitize_request_id, status_of

__all__ = [
    "UNAUTHORIZED_CODES",
    "Route",
    "Scope",
    "credits_bp",
    "error_codes",
    "error_statuses",
    "json_response",
    "operation",
    "request_id",
]

log = logging.getLogger("callora_credits")

credits_bp = Blueprint("credits", __name__, cli_group="credits")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class AnyPathConverter(PathConverter):
    regex = r"[^/][\s\S]*?"


#: Who may call an operation; the OpenAPI document names the configured
#: scope strings for each.
Scope = Literal["self", "owner", "service", "admin", "anyone"]

#: The codes of a 401; :class:`~callora_credits.errors.Unauthorized` stands
#: for all of them in an operation's ``errors``.
UNAUTHORIZED_CODES = (
    "UNAUTHORIZED",
    "INVALID_AUTH_HEADER",
    "MISSING_TOKEN",
    "TOKEN_EXPIRED",
    "TOKEN_NOT_ACTIVE",
    "INVALID_TOKEN",
    "MISSING_CLAIMS",
)


def _error_classes(cls: type[CreditsError]) -> list[type[CreditsError]]:
    found = [cls]
    for sub in cls.__subclasses__():
        found.extend(_error_classes(sub))
    return found


def error_statuses() -> dict[str, int]:
    """Every error code the library answers with, and its HTTP status."""
    statuses = {cls.code: status_of(cls) for cls in _error_classes(CreditsError)}
    statuses.update(dict.fromkeys(UNAUTHORIZED_CODES, status_of(Unauthorized)))
    return statuses


ErrorSpec = type[CreditsError] | str


def error_codes(errors: tuple[ErrorSpec, ...]) -> tuple[str, ...]:
    """The codes ``errors`` names: an error class stands for its code
    (``Unauthorized`` for every 401 code), a string for itself. Every route may
    answer ``INTERNAL_SERVER_ERROR``, so it is always included."""
    known = error_statuses()
    codes: list[str] = []
    for item in (*errors, InternalError):
        if isinstance(item, str):
            named: tuple[str, ...] = (item,)
        elif item is Unauthorized:
            named = UNAUTHORIZED_CODES
        else:
            named = (item.code,)
        for code in named:
            if code not in known:
                raise ValueError(f"unknown error code {code!r}: add it to callora_credits.errors")
            if code not in codes:
                codes.append(code)
    return tuple(codes)


@dataclass(frozen=True)
class Route:
    """One documented route: what the OpenAPI document is built from.

    ``errors`` holds the codes the operation can answer with; their statuses
    come from the error classes, so the document's responses derive from this
    one list.
    """

    method: str
    rule: str
    endpoint: str
    summary: str
    scope: Scope
    success: int
    response: type[BaseModel] | None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    errors: tuple[str, ...] = ()
    idempotent_post: bool = False
    description: str = ""
    tags: tuple[str, ...] = field(default=("credits",))

    def errors_by_status(self) -> dict[int, tuple[str, ...]]:
        """The operation's error codes grouped by status, statuses ascending."""
        statuses = error_statuses()
        grouped: dict[int, list[str]] = {}
        for code in self.errors:
            grouped.setdefault(statuses[code], []).append(code)
        return {status: tuple(grouped[status]) for status in sorted(grouped)}


#: Every route of the blueprint, in registration order.
OPERATIONS: list[Route] = []
# The /credits routes alone, to tell a 404 from a 405 in the catch-all.
_CREDITS_MAP = Map()


def operation(
    rule: str,
    method: str,
    *,
    summary: str,
    scope: Scope,
    success: int = 200,
    response: type[BaseModel] | None = None,
    query: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    errors: tuple[ErrorSpec, ...] = (),
    description: str = "",
) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Register a view on ``credits_bp`` and record it for the OpenAPI document.

    ``errors`` lists what the operation can answer besides success, as error
    classes or codes; ``description`` is the prose of the document (the
    view's docstring when empty).
    """
    codes = error_codes(errors)

    def decorator(view: Callable[..., Response]) -> Callable[..., Response]:
        endpoint = view.__name__
        OPERATIONS.append(
            Route(
                method=method,
                rule=rule,
                endpoint=endpoint,
                summary=summary,
                scope=scope,
                success=success,
                response=response,
                query=query,
                body=body,
                errors=codes,
                idempotent_post=method == "POST",
                description=description or (view.__doc__ or ""),
            )
        )
        if rule.startswith("/credits"):
            _CREDITS_MAP.add(Rule(rule, methods=[method], endpoint=endpoint))
        credits_bp.add_url_rule(rule, endpoint, view, methods=[method])
        return view

    return decorator


@credits_bp.record_once
def _setup(setup_state: BlueprintSetupState) -> None:
    app = setup_state.app
    # Like <path:>, but also matching newlines, so no path under /credits
    # escapes the JSON 404.
    app.url_map.converters.setdefault("credits_any", AnyPathConverter)
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)
    if "sqlalchemy" not in app.extensions:
        raise RuntimeError(
            "callora_credits needs Flask-SQLAlchemy on the app: create "
            "`db = SQLAlchemy(app)` (or call `db.init_app(app)`) before "
            "registering credits_bp."
        )
    if (
        "flask-jwt-extended" not in app.extensions
        and not app.config["CREDITS_TRUST_USER_ID_HEADER"]
    ):
        raise RuntimeError(
            "callora_credits needs an identity for each request: create "
            "`JWTManager(app)` before registering credits_bp, or, behind an "
            "authenticating gateway, set CREDITS_TRUST_USER_ID_HEADER = True "
            "to accept X-User-Id."
        )
    from ..config import CreditsConfig
    from ..metrics import setup_metrics
    from .ratelimit import setup_rate_limits

    # Fail now, not on the first request, on a bad limit or a missing bind.
    cfg = CreditsConfig(app.config)
    check_engine(app, cfg)
    credits_state = CreditsState()
    # A blueprint's setup state types the app as Flask's sans-io base.
    setup_metrics(cast(Flask, app), cfg, credits_state)
    setup_rate_limits(cast(Flask, app), cfg, app.extensions)
    app.extensions[EXTENSION_KEY] = credits_state


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a log line stays one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)


def request_id() -> str:
    """This request's id: the sanitized ``X-Request-Id`` or a new one."""
    # Kept in the WSGI environ, which is per request even when a test or a
    # host shares one app context (and so one ``g``) across requests.
    environ = request.environ
    rid: str | None = environ.get("callora_credits.request_id")
    if rid is None:
        rid = sanitize_request_id(request.headers.get("X-Request-Id")) or new_request_id()
        environ["callora_credits.request_id"] = rid
    return rid


def json_response(payload: Any, status: int = 200) -> Response:
    """A JSON response the library's way (compact, UTF-8)."""
    return Response(dumps(payload), status=status, mimetype="application/json")


def error_response(error: CreditsError) -> Response:
    """``error`` as the credits routes answer it: its status, the JSON error
    body and this request's ``X-Request-Id`` (and ``Retry-After`` for a
    :class:`~callora_credits.errors.ServiceUnavailable`).

    For host routes that call the library, e.g. after
    :func:`~callora_credits.current_caller` raised
    :class:`~callora_credits.errors.Unauthorized`.
    """
    rid = request_id()
    body = dumps(error_body(error.code, error.message, rid, error.details))
    if isinstance(error, ServiceUnavailable):
        response: Response = _retry_after_response(body, status_of(error), error.retry_after)
    else:
        response = Response(body, status=status_of(error), mimetype="application/json")
    response.headers["X-Request-Id"] = rid
    return response


class _RetryAfterResponse(Response):
    """A 429 or 503 whose ``Retry-After`` is settled as it is sent.

    Flask-Limiter's own after-request hook is the app's, so it runs after the
    blueprint's and writes ``Retry-After`` on every response it sees (the
    truncated seconds left in the window, which can be 0); the header sent is
    the one this response was made with, whole seconds, at least 1.
    """

    retry_after_seconds = 1

    def get_wsgi_headers(self, environ: Any) -> Headers:
        headers = super().get_wsgi_headers(environ)
        headers["Retry-After"] = str(self.retry_after_seconds)
        return headers


def _retry_after_response(body: bytes, status: int, seconds: int) -> Response:
    response = _RetryAfterResponse(body, status=status, mimetype="application/json")
    response.retry_after_seconds = max(1, seconds)
    response.headers["Retry-After"] = str(response.retry_after_seconds)
    return response


def _rate_limited_response() -> Response:
    from .ratelimit import rate_limited

    error, seconds = rate_limited()
    rid = request_id()
    response = _retry_after_response(
        dumps(error_body(error.code, error.message, rid)), status_of(RateLimited), seconds
    )
    response.headers["X-Request-Id"] = rid
    return response


@credits_bp.url_value_preprocessor
def _mark_start(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # URL value preprocessors run before every before_request hook, the app's
    # too: a request a rate limiter refuses there is still timed.
    request.environ["callora_credits.started"] = time.perf_counter()


@credits_bp.before_request
def _start() -> None:
    request_id()


@credits_bp.after_request
def _finish(response: Response) -> Response:
    rid = request_id()
    headers = response.headers
    headers["X-Request-Id"] = rid
    # Balances and ledgers are financial data: no cache keeps them, and no
    # browser sniffs a JSON body into something else.
    headers["Cache-Control"] = "no-store"
    headers["X-Content-Type-Options"] = "nosniff"
    response = apply_conditional(response)
    metrics = current_app.extensions[EXTENSION_KEY].metrics
    logging_on = log.isEnabledFor(logging.INFO)
    if metrics is None and not logging_on:
        return response
    started = request.environ.get("callora_credits.started")
    elapsed = time.perf_counter() - started if started else 0.0
    if metrics is not None:
        rule = request.url_rule
        route = rule.rule if rule is not None else "<unrouted>"
        metrics.request(route, request.method, response.status_code, elapsed)
    if not logging_on:
        return response
    elapsed_ms = elapsed * 1000
    path = printable(request.path)
    log.info(
        "%s %s %s %.1fms",
        request.method,
        path,
        response.status_code,
        elapsed_ms,
        extra={
            "request_id": rid,
            "method": request.method,
            "path": path,
            "status": response.status_code,
            "duration_ms": round(elapsed_ms, 1),
            "user_id": request.environ.get("callora_credits.user_id"),
        },
    )
    return response


@credits_bp.errorhandler(CreditsError)
def _credits_error(error: CreditsError) -> Response:
    if isinstance(error, ServiceUnavailable):
        # Expected in an outage, and answered for the client to retry: the
        # database's own error (the cause) goes to the log, never the body.
        log.warning(
            "credits: service unavailable (%s); answered 503 with Retry-After",
            error.reason,
            exc_info=error,
            extra={"request_id": request_id()},
        )
    elif status_of(error) >= 500:
        log.error("credits: %s", error.message, extra={"request_id": request_id()})
    return error_response(error)


_HTTP_ERRORS: dict[int, type[CreditsError]] = {
    400: ValidationError,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}


@credits_bp.errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Response:
    if error.code == 429:  # Flask-Limiter's refusal (ours, or the host's Limiter's)
        return _rate_limited_response()
    mapped = _HTTP_ERRORS.get(error.code or 500)
    if mapped is None:
        return _unexpected(error)
    return error_response(mapped())


@credits_bp.errorhandler(Exception)
def _unexpected(error: Exception) -> Response:
    # The detail goes to the log with the request id, never to the client.
    log.error(
        "credits: unhandled error",
        exc_info=error,
        extra={"request_id": request_id()},
    )
    return error_response(InternalError())


def _routing_error(rest: str = "") -> Response:
    """The catch-all under /credits: a JSON 404 or 405 in the library's error shape.

    Routing errors are raised before a blueprint is chosen, so blueprint error
    handlers never see them; these rules catch what no real route matched.
    Flask passes the ``<path:rest>`` part as an argument.
    """
    path = "/credits/" + rest if rest or request.path.endswith("/") else "/credits"
    adapter = _CREDITS_MAP.bind("credits.invalid")
    try:
        adapter.match(path, method=request.method)
    except WerkzeugMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.valid_methods or []))
        if request.method == "OPTIONS":
            response = Response(status=204)
        else:
            response = error_response(
                MethodNotAllowed(f"Method {request.method} is not allowed; use {allowed}")
            )
        response.headers["Allow"] = allowed
        return response
    except WerkzeugNotFound:
        pass
    return error_response(NotFound(f"No such endpoint: {request.path}"))


def register_routing_fallbacks() -> None:
    """Add the catch-all rules; called once, after every real route exists,
    so that the real routes are matched first."""
    for rule in ("/credits", "/credits/", "/credits/<credits_any:rest>"):
        credits_bp.add_url_rule(rule, "routing_error", _routing_error, methods=ALL_METHODS)
