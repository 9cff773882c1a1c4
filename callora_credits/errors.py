"""One exception hierarchy, the error body, and request ids.

Every error the library reports derives from :class:`CreditsError`, which
carries its HTTP status and SPEC code, so the domain core can raise it without
knowing about HTTP and the blueprint can render it without a lookup table.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, ClassVar

__all__ = [
    "BalanceLimitExceeded",
    "CreditsError",
    "DuplicateReference",
    "Forbidden",
    "HoldAmountExceeded",
    "HoldNotPending",
    "IdempotencyConflict",
    "IdempotencyInProgress",
    "IdempotencyKeyRequired",
    "InsufficientCredits",
    "InternalError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RefundExceedsCharge",
    "Unauthorized",
    "ValidationError",
    "error_body",
    "new_request_id",
    "sanitize_request_id",
]

Detail = dict[str, Any]


class CreditsError(Exception):
    """Base of every error the library reports.

    ``storable`` errors are outcomes of a money-moving request that an
    idempotent replay must return again (SPEC §6); the others (bad input,
    auth, transient conflicts) are never stored, so a corrected retry works.
    """

    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_SERVER_ERROR"
    default_message: ClassVar[str] = "Internal server error"
    storable: ClassVar[bool] = False

    def __init__(self, message: str | None = None, details: list[Detail] | None = None) -> None:
        self.message = message or self.default_message
        self.details = details or []
        super().__init__(self.message)

    def body(self, request_id: str) -> dict[str, Any]:
        """The JSON error body of SPEC §4."""
        return error_body(self.code, self.message, request_id, self.details)


class InternalError(CreditsError):
    """An unexpected failure; the body never says more than this."""


class ValidationError(CreditsError):
    status = 400
    code = "VALIDATION_ERROR"
    default_message = "Request validation failed"


class IdempotencyKeyRequired(CreditsError):
    status = 400
    code = "IDEMPOTENCY_KEY_REQUIRED"
    default_message = "An Idempotency-Key header (1-255 printable ASCII characters) is required"


class Unauthorized(CreditsError):
    """A 401; ``code`` varies with the reason (SPEC §3)."""

    status = 401
    code = "UNAUTHORIZED"
    default_message = "Authentication required"

    def __init__(self, message: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]


class Forbidden(CreditsError):
    status = 403
    code = "FORBIDDEN"
    default_message = "You do not have permission for this operation"


class InsufficientCredits(CreditsError):
    status = 402
    code = "INSUFFICIENT_CREDITS"
    default_message = "Insufficient credits"
    storable = True


class NotFound(CreditsError):
    status = 404
    code = "NOT_FOUND"
    default_message = "Not found"
    storable = True


class MethodNotAllowed(CreditsError):
    status = 405
    code = "METHOD_NOT_ALLOWED"
    default_message = "Method not allowed"


class IdempotencyInProgress(CreditsError):
    status = 409
    code = "IDEMPOTENCY_IN_PROGRESS"
    default_message = "A request with this Idempotency-Key is still being processed; retry later"


class HoldNotPending(CreditsError):
    status = 409
    code = "HOLD_NOT_PENDING"
    default_message = "The hold is no longer pending"
    storable = True


class DuplicateReference(CreditsError):
    status = 409
    code = "DUPLICATE_REFERENCE"
    default_message = "An entry with this reference already exists"
    storable = True


class PayloadTooLarge(CreditsError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    default_message = "Request body is too large"


class IdempotencyConflict(CreditsError):
    status = 422
    code = "IDEMPOTENCY_CONFLICT"
    default_message = "This Idempotency-Key was already used with a different request"


class HoldAmountExceeded(CreditsError):
    status = 422
    code = "HOLD_AMOUNT_EXCEEDED"
    default_message = "The amount exceeds what the hold reserves"
    storable = True


class RefundExceedsCharge(CreditsError):
    status = 422
    code = "REFUND_EXCEEDS_CHARGE"
    default_message = "The refund exceeds what is left of the charge"
    storable = True


class BalanceLimitExceeded(CreditsError):
    status = 422
    code = "BALANCE_LIMIT_EXCEEDED"
    default_message = "The balance would exceed its limit"
    storable = True


def error_body(
    code: str, message: str, request_id: str, details: list[Detail] | None = None
) -> dict[str, Any]:
    """The error shape of SPEC §4."""
    return {
        "code": code,
        "message": message,
        "requestId": request_id,
        "details": details or [],
    }


def dumps(payload: Any) -> bytes:
    """Serialize a response body the one way the library does it.

    Stored idempotent responses are these bytes, so replays are identical.
    """
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


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


def _subclasses(cls: type[CreditsError]) -> list[type[CreditsError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def error_from_body(status: int, body: dict[str, Any]) -> CreditsError:
    """Rebuild the error a stored response describes (Python API replays)."""
    code = body.get("code")
    for cls in _subclasses(CreditsError):
        if cls.code == code and cls.status == status:
            return cls(body.get("message"), body.get("details"))
    return InternalError(body.get("message"))
