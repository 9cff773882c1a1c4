"""How the HTTP API answers: one table of statuses, the error body, and the
codec that stores a response under its idempotency key.

The domain reports what happened (an entry, a hold, a
:class:`~callora_credits.errors.CreditsError`); this module alone decides
which status and which bytes say it over HTTP.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..core.idempotency import Result
from ..core.operations import Capture, Operation, Release, VoidGrant
from ..core.records import dumps
from ..errors import (
    BalanceLimitExceeded,
    CreditsError,
    Detail,
    DuplicateReference,
    Forbidden,
    GrantNotActive,
    HoldAmountExceeded,
    HoldNotPending,
    IdempotencyConflict,
    IdempotencyInProgress,
    IdempotencyKeyRequired,
    InsufficientCredits,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RefundExceedsCharge,
    ServiceUnavailable,
    Unauthorized,
    ValidationError,
)

__all__ = [
    "STATUS",
    "HttpCodec",
    "error_body",
    "new_request_id",
    "sanitize_request_id",
    "status_of",
]

#: The HTTP status of every error the library reports.
STATUS: dict[type[CreditsError], int] = {
    ValidationError: 400,
    IdempotencyKeyRequired: 400,
    Unauthorized: 401,
    InsufficientCredits: 402,
    Forbidden: 403,
    NotFound: 404,
    MethodNotAllowed: 405,
    IdempotencyInProgress: 409,
    HoldNotPending: 409,
    GrantNotActive: 409,
    DuplicateReference: 409,
    PayloadTooLarge: 413,
    IdempotencyConflict: 422,
    HoldAmountExceeded: 422,
    RefundExceedsCharge: 422,
    BalanceLimitExceeded: 422,
    RateLimited: 429,
    ServiceUnavailable: 503,
}


def status_of(error: CreditsError | type[CreditsError]) -> int:
    """The status that answers ``error`` or its class (500 for anything unexpected)."""
    kind = error if isinstance(error, type) else type(error)
    for cls in kind.__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_body(
    code: str, message: str, request_id: str, details: list[Detail] | None = None
) -> dict[str, Any]:
    """The error body of every failure: ``code``, ``message``, ``requestId``, ``details``."""
    return {"code": code, "message": message, "requestId": request_id, "details": details or []}


_MAX_REQUEST_ID = 128


def sanitize_request_id(raw: str | None) -> str | None:
    """Strip control characters, trim, and cut to 128 characters.

    Returns ``None`` when nothing usable is left.
    """
    if not raw:
        return None
    cleaned = "".join(ch for ch in raw if ch.isprintable()).strip()
    return cleaned[:_MAX_REQUEST_ID] or None


def new_request_id() -> str:
    """A fresh request id, ``req_`` and 24 hex digits."""
    return "req_" + secrets.token_hex(12)


class HttpCodec:
    """Stores the HTTP response of a money-moving request under its key:
    201 with the new entry, hold or grant (200 with the hold or grant a
    capture, release or void changed), or the storable error's status and
    body with this request's id."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id

    def encode(self, op: Operation, result: Result | CreditsError) -> tuple[int, bytes]:
        if isinstance(result, CreditsError):
            body = error_body(result.code, result.message, self.request_id, result.details)
            return status_of(result), dumps(body)
        assert result is not None  # no HTTP operation leaves nothing to show
        status = 200 if isinstance(op, Capture | Release | VoidGrant) else 201
        return status, dumps(result.as_json())
