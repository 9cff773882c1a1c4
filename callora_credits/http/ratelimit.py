"""Rate limits on the credits routes, with Flask-Limiter (``callora-credits[ratelimit]``).

``CREDITS_RATE_LIMIT`` is one budget per caller shared by every route of the
blueprint; ``CREDITS_RATE_LIMIT_WRITE`` is a second one that only POSTs
spend. Both are Flask-Limiter shared limits registered on the blueprint, so
Flask-Limiter counts, stores and writes the ``X-RateLimit-*`` headers; this
module only says whose budget a request spends and how a refusal reads.

The caller is the verified one (the token's identity, or a trusted
``X-User-Id``), never a header nobody checked; a request without an identity
spends its remote address's budget.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import threading
import time
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from flask import Flask, current_app, has_request_context, request

from ..config import CreditsConfig, config
from ..errors import CreditsError, RateLimited
from .auth import request_caller

if TYPE_CHECKING:
    from flask_limiter import Limiter

__all__ = [
    "OUTAGE_LOG_INTERVAL_SECONDS",
    "SCOPE",
    "WRITE_SCOPE",
    "is_credits_request",
    "rate_limit_key",
    "rate_limited",
    "setup_rate_limits",
]

log = logging.getLogger("callora_credits")

#: The Flask-Limiter scopes of the two budgets (part of the storage keys).
SCOPE = "credits"
WRITE_SCOPE = "credits-write"
#: A storage outage is logged at most this often, per process.
OUTAGE_LOG_INTERVAL_SECONDS = 60.0

_LIMITER_KEY = "callora_credits.limiter"


def rate_limit_key() -> str:
    """Whose budget the current request spends: ``user:<id>`` for a verified
    caller, ``addr:<remote address>`` for a request without one.

    The id is percent-encoded, so no identity can spell another's storage key.
    """
    try:
        caller = request_caller(config())
    except CreditsError:
        return "addr:" + (request.remote_addr or "-")
    return "user:" + quote(caller.user_id, safe="")


def _fix(key: str, problem: str) -> RuntimeError:
    return RuntimeError(f"{key} {problem}")


def _check_limit(key: str, value: str) -> None:
    from limits import parse_many

    try:
        parse_many(value)
    except ValueError:
        raise _fix(
            key,
            f"is {value!r}, which is not a Flask-Limiter limit string: use amounts per "
            'period separated by ";", such as "20/second;1000/minute".',
        ) from None


class _OutageLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The library's own Limiter logs through this instead of its logger.

    Flask-Limiter, told to swallow storage errors (so requests pass), logs
    each one with its traceback: one per request while the storage is down.
    This says it once a minute instead, on the ``callora_credits`` logger.
    Flask-Limiter's routine lines (a limit exceeded) go to ``DEBUG``.
    """

    def __init__(self) -> None:
        super().__init__(log, {})
        self._lock = threading.Lock()
        self._next = 0.0
        self.clock = time.monotonic

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level < logging.ERROR:
            log.debug("credits: flask-limiter: " + str(msg), *args)
            return
        now = self.clock()
        with self._lock:
            if now < self._next:
                return
            self._next = now + OUTAGE_LOG_INTERVAL_SECONDS
        failure = sys.exc_info()[1]
        cause = f"{type(failure).__name__}: {failure}" if failure else str(msg) % args
        log.warning(
            "credits: the rate limit storage failed (%s); requests pass without rate "
            "limits until it answers again (logged at most once a minute)",
            cause,
        )


#: Redis URIs (of the library's own Limiter) are served by the one-trip storage.
_ONE_TRIP_SCHEMES = ("redis", "rediss", "redis+unix")
_ONE_TRIP_PREFIX = "callora-credits+"
_ONE_TRIP_ENVIRON_KEY = "callora_credits.rate_limit_counts"
# limits' own script (count up, start the window on the first hit), answering
# with the count and the seconds left in the window: one round trip, not three.
_INCR_EXPIRE_TTL = b"""
local amount = tonumber(ARGV[2])
local current = redis.call("incrby", KEYS[1], amount)
if tonumber(current) == amount then
    redis.call("expire", KEYS[1], ARGV[1])
end
return {current, redis.call("ttl", KEYS[1])}
"""


def _counts_seen() -> dict[str, tuple[int, float]] | None:
    """This request's ``{key: (count, window end)}`` as its hits left them;
    ``None`` outside a request."""
    if not has_request_context():
        return None
    seen: dict[str, tuple[int, float]] = request.environ.setdefault(_ONE_TRIP_ENVIRON_KEY, {})
    return seen


@functools.cache
def _register_one_trip_storage() -> bool:
    """Register limits' Redis storage under the library's schemes, answering
    a request's counts from its own hit.

    Flask-Limiter counts a request with one ``incr`` and then, for the
    ``X-RateLimit-*`` headers, reads the count and the window's end back with
    a ``GET`` and a ``TTL``: three round trips to Redis per request. Here the
    ``incr`` answers both in its one script, and the reads of the same key in
    the same request are answered from it, so a request costs one round trip.
    The headers then say what the request's own hit left (a concurrent
    request's hit after it is in that request's headers, not this one's).
    Outside a request (a host's ``limiter.reset()``, a test) every read goes
    to Redis as before. Returns whether it is registered: not with a limits
    release older than the Redis storage's ``prefixed_key`` (limits' own
    storage is used then).
    """
    from limits.storage import RedisStorage

    if not hasattr(RedisStorage, "prefixed_key"):
        return False

    class _OneTripRedisStorage(RedisStorage):
        # limits registers a storage class by this attribute when the class is made.
        STORAGE_SCHEME = [_ONE_TRIP_PREFIX + s for s in _ONE_TRIP_SCHEMES]  # noqa: RUF012

        def __init__(self, uri: str, **options: Any) -> None:
            super().__init__(uri.removeprefix(_ONE_TRIP_PREFIX), **options)

        def initialize_storage(self, uri: str) -> None:
            super().initialize_storage(uri)
            self._incr_expire_ttl = self.get_connection().register_script(_INCR_EXPIRE_TTL)

        def incr(self, key: str, expiry: int, amount: int = 1) -> int:
            count, ttl = self._incr_expire_ttl([self.prefixed_key(key)], [expiry, amount])
            seen = _counts_seen()
            if seen is not None:
                seen[key] = (int(count), max(int(ttl), 0) + time.time())
            return int(count)

        def get(self, key: str) -> int:
            seen = _counts_seen()
            if seen is not None and key in seen:
                return seen[key][0]
            return super().get(key)

        def get_expiry(self, key: str) -> float:
            seen = _counts_seen()
            if seen is not None and key in seen:
                return seen[key][1]
            return super().get_expiry(key)

    return True


def _storage_uri(uri: str) -> str:
    """The URI the library's own Limiter is given: a Redis one names the
    one-trip storage; any other is limits' own."""
    if uri.partition("://")[0] in _ONE_TRIP_SCHEMES and _register_one_trip_storage():
        return _ONE_TRIP_PREFIX + uri
    return uri


def _own_limiter(app: Flask, cfg: CreditsConfig) -> Limiter:
    """A Limiter for the credits routes only, on ``CREDITS_RATE_LIMIT_STORAGE_URI``.

    Every setting that decides what is limited is given here, so the host's
    ``RATELIMIT_DEFAULT`` and ``RATELIMIT_APPLICATION`` never reach the
    credits routes, and a request outside the blueprint is never counted by it.
    """
    from flask_limiter import ExemptionScope, HeaderNames, Limiter
    from limits.errors import ConfigurationError

    from .blueprint import credits_bp

    limiter = Limiter(
        rate_limit_key,
        storage_uri=_storage_uri(cfg.rate_limit_storage_uri),
        strategy="fixed-window",
        headers_enabled=True,
        header_name_mapping={
            HeaderNames.LIMIT: HeaderNames.LIMIT.value,
            HeaderNames.REMAINING: HeaderNames.REMAINING.value,
            HeaderNames.RESET: HeaderNames.RESET.value,
            HeaderNames.RETRY_AFTER: HeaderNames.RETRY_AFTER.value,
        },
        retry_after="delta-seconds",
        # Fail open: a storage outage lets requests through (logged by _OutageLog).
        swallow_errors=True,
        in_memory_fallback_enabled=False,
        fail_on_first_breach=True,
    )
    limiter.logger = _OutageLog()  # type: ignore[assignment]

    @limiter.request_filter
    def _outside_credits() -> bool:
        return not is_credits_request()

    # Only the host's defaults and application limits: an exemption with any
    # other flag would switch off the blueprint's own limits too.
    limiter.exempt(credits_bp, flags=ExemptionScope.DEFAULT | ExemptionScope.APPLICATION)
    try:
        limiter.init_app(app)
    except ConfigurationError as exc:
        raise _fix(
            "CREDITS_RATE_LIMIT_STORAGE_URI",
            f"is {cfg.rate_limit_storage_uri!r}, which Flask-Limiter cannot use ({exc}): use "
            '"memory://" (one process) or "redis://host:6379" (shared across workers and '
            "hosts, with pip install 'callora-credits[ratelimit]').",
        ) from None
    return limiter


def is_credits_request() -> bool:
    """Whether the current request was routed to the credits blueprint (under
    any name it was registered with)."""
    from .blueprint import credits_bp

    name = request.blueprint
    return name is not None and current_app.blueprints.get(name) is credits_bp


def setup_rate_limits(
    app: Flask, cfg: CreditsConfig, extensions: MutableMapping[str, Any]
) -> None:
    """Register the configured limits at blueprint registration; nothing when off.

    Raises a ``RuntimeError`` that says how to fix it when a limit is set but
    Flask-Limiter is missing, or a setting is not usable.
    """
    if cfg.rate_limit is None and cfg.rate_limit_write is None:
        return
    which = "CREDITS_RATE_LIMIT" if cfg.rate_limit is not None else "CREDITS_RATE_LIMIT_WRITE"
    try:
        import flask_limiter
    except ImportError:
        raise _fix(
            which,
            "is set, but Flask-Limiter is not installed: pip install 'callora-credits[ratelimit]'",
        ) from None
    for key, value in (
        ("CREDITS_RATE_LIMIT", cfg.rate_limit),
        ("CREDITS_RATE_LIMIT_WRITE", cfg.rate_limit_write),
    ):
        if value is not None:
            _check_limit(key, value)
    limiter = cfg.rate_limiter
    if limiter is None:
        limiter = _own_limiter(app, cfg)
    elif not isinstance(limiter, flask_limiter.Limiter):
        raise _fix(
            "CREDITS_RATE_LIMITER",
            f"must be a flask_limiter.Limiter (or None for the library's own), not {limiter!r}",
        )
    from .blueprint import credits_bp

    if cfg.rate_limit is not None:
        limiter.shared_limit(cfg.rate_limit, SCOPE, key_func=rate_limit_key)(credits_bp)
    if cfg.rate_limit_write is not None:
        limiter.shared_limit(
            cfg.rate_limit_write, WRITE_SCOPE, key_func=rate_limit_key, methods=["POST"]
        )(credits_bp)
    extensions[_LIMITER_KEY] = limiter


def _retry_after_seconds(extensions: Mapping[str, Any]) -> int:
    """Whole seconds until the breached window resets, at least 1."""
    limiter = extensions.get(_LIMITER_KEY)
    current = getattr(limiter, "current_limit", None)
    if current is None:
        return 1
    try:
        reset_at = float(current.window[0])
    except Exception:  # the storage failed between the refusal and now
        return 1
    return max(1, math.ceil(reset_at - time.time()))


def rate_limited() -> tuple[RateLimited, int]:
    """The error of a refused request and its ``Retry-After`` in seconds."""
    return RateLimited(), _retry_after_seconds(current_app.extensions)
