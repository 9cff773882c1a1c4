"""One exception hierarchy for everything the library reports.

Every error derives from :class:`CreditsError` and carries a stable ``code``
(``INSUFFICIENT_CREDITS``, ``VALIDATION_ERROR``…), a message and optional
``details``. The errors say what went wrong, not how to answer it: the HTTP
layer maps each to its status (``callora_credits.http.responses``), so the
same error raised by the Python API, the CLI or a view means the same thing.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BalanceLimitExceeded",
    "CreditsError",
    "Detail",
    "DuplicateReference",
    "Forbidden",
    "GrantNotActive",
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
    "RateLimited",
    "RefundExceedsCharge",
    "ServiceUnavailable",
    "Unauthorized",
    "ValidationError",
    "error_for_code",
]

Detail = dict[str, Any]


class CreditsError(Exception):
    """Base of every error the library reports.

    ``storable`` errors are definitive outcomes of a money-moving operation:
    a retry under the same idempotency key gets them again. The others (bad
    input, authentication, transient conflicts) are never stored, so a
    corrected retry works.
    """

    code: ClassVar[str] = "INTERNAL_SERVER_ERROR"
    default_message: ClassVar[str] = "Internal server error"
    storable: ClassVar[bool] = False

    def __init__(self, message: str | None = None, details: list[Detail] | None = None) -> None:
        self.message = message or self.default_message
        self.details = details or []
        super().__init__(self.message)


class InternalError(CreditsError):
    """An unexpected failure; never says more than this."""


class ValidationError(CreditsError):
    """Input that cannot be accepted; ``details`` name each field and say what to send."""

    code = "VALIDATION_ERROR"
    default_message = "Request validation failed"

    @classmethod
    def on(cls, field: str, message: str, code: str) -> ValidationError:
        """A validation error about one field."""
        return cls(details=[{"field": field, "message": message, "code": code}])


class IdempotencyKeyRequired(CreditsError):
    code = "IDEMPOTENCY_KEY_REQUIRED"
    default_message = "An Idempotency-Key header (1-255 printable ASCII characters) is required"


class Unauthorized(CreditsError):
    """No acceptable identity; ``code`` says why (``UNAUTHORIZED``, ``INVALID_TOKEN``…)."""

    code = "UNAUTHORIZED"
    default_message = "Authentication required"

    def __init__(self, message: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code  # type: ignore[misc]


class Forbidden(CreditsError):
    code = "FORBIDDEN"
    default_message = "You do not have permission for this operation"


class InsufficientCredits(CreditsError):
    code = "INSUFFICIENT_CREDITS"
    default_message = "Insufficient credits"
    storable = True


class NotFound(CreditsError):
    code = "NOT_FOUND"
    default_message = "Not found"
    storable = True


class MethodNotAllowed(CreditsError):
    code = "METHOD_NOT_ALLOWED"
    default_message = "Method not allowed"


class IdempotencyInProgress(CreditsError):
    code = "IDEMPOTENCY_IN_PROGRESS"
    default_message = "A request with this Idempotency-Key is still being processed; retry later"


class HoldNotPending(CreditsError):
    code = "HOLD_NOT_PENDING"
    default_message = "The hold is no longer pending"
    storable = True


class GrantNotActive(CreditsError):
    code = "GRANT_NOT_ACTIVE"
    default_message = "The grant is no longer active"
    storable = True


class DuplicateReference(CreditsError):
    """The reference was already used; ``details[0]["transaction_id"]`` names the
    entry (or hold) that has it."""

    code = "DUPLICATE_REFERENCE"
    default_message = "An entry with this reference already exists"
    storable = True


class PayloadTooLarge(CreditsError):
    code = "PAYLOAD_TOO_LARGE"
    default_message = "Request body is too large"


class RateLimited(CreditsError):
    """The caller has used up a rate limit (``CREDITS_RATE_LIMIT``); never stored
    under an idempotency key, so the same request may be sent again later."""

    code = "RATE_LIMITED"
    default_message = "Too many requests; retry after the time in Retry-After"


class ServiceUnavailable(CreditsError):
    """The database could not answer in time: unreachable, not accepting writes
    (a Galera node outside the primary component), or a transient failure
    (deadlock, certification failure, lock wait timeout) that outlasted the
    bounded retries.

    Never stored under an idempotency key: the same request may be sent again,
    with the same key, after ``retry_after`` seconds. Nothing was applied,
    unless the connection was lost during ``COMMIT``, when it may have been
    applied once; the retry then replays it. ``reason`` names the last
    transient failure (``deadlock``, ``lock_timeout``, ``unavailable``,
    ``connect``, ``disconnect``…), for logs and operators; it is not sent to
    clients.
    """

    code = "SERVICE_UNAVAILABLE"
    default_message = (
        "The service is temporarily unavailable; retry the same request, with the same "
        "Idempotency-Key, after the time in Retry-After"
    )

    def __init__(
        self,
        message: str | None = None,
        details: list[Detail] | None = None,
        *,
        reason: str = "unavailable",
        retry_after: int = 1,
    ) -> None:
        super().__init__(message, details)
        self.reason = reason
        self.retry_after = retry_after


class IdempotencyConflict(CreditsError):
    code = "IDEMPOTENCY_CONFLICT"
    default_message = "This Idempotency-Key was already used with a different request"


class HoldAmountExceeded(CreditsError):
    code = "HOLD_AMOUNT_EXCEEDED"
    default_message = "The amount exceeds what the hold reserves"
    storable = True


class RefundExceedsCharge(CreditsError):
    code = "REFUND_EXCEEDS_CHARGE"
    default_message = "The refund exceeds what is left of the charge"
    storable = True


class BalanceLimitExceeded(CreditsError):
    code = "BALANCE_LIMIT_EXCEEDED"
    default_message = "The balance would exceed its limit"
    storable = True


def _subclasses(cls: type[CreditsError]) -> list[type[CreditsError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def error_for_code(
    code: str, message: str | None = None, details: list[Detail] | None = None
) -> CreditsError:
    """The error a stored outcome names by ``code`` (an idempotent replay)."""
    for cls in _subclasses(CreditsError):
        if cls.code == code:
            return cls(message, details)
    return InternalError(message)
