"""What can be asked of the ledger: operations that validate themselves.

Each operation checks its own invariants when it is built (amounts, identity,
references, texts, metadata, hold lifetimes) and raises the same
:class:`~callora_credits.errors.ValidationError` whichever door it came
through: the HTTP API, the Python API, the CLI or ``@charge_credits``. An
operation that exists is one the ledger may try; whether the money is there
is decided inside its transaction (:mod:`.posting`).

The limits that come from configuration (``CREDITS_MAX_AMOUNT_USDC``, the
hold lifetimes) are passed as ``limits``: any object with the attributes of
:class:`Limits`, such as the app's ``CreditsConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, ClassVar, Protocol, TypeGuard

from ..errors import NotFound, ValidationError
from .clock import naive
from .money import format_units

__all__ = [
    "Adjust",
    "Capture",
    "Charge",
    "CreateGrant",
    "CreateHold",
    "Limits",
    "Operation",
    "Refund",
    "Release",
    "SetBalance",
    "TopUp",
    "VoidGrant",
    "check_identity",
    "possible_id",
    "valid_identity",
]

MAX_IDENTITY_LENGTH = 128
MAX_REFERENCE_LENGTH = 255
MAX_TEXT_LENGTH = 500
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY_LENGTH = 40
MAX_METADATA_VALUE_LENGTH = 500
# Ids the library hands out are a short prefix and 24 hex digits; anything
# longer or unprintable cannot exist, so it is not looked up.
MAX_ID_LENGTH = 64


class Limits(Protocol):
    """The configured bounds an operation is checked against."""

    @property
    def max_amount_units(self) -> int: ...

    @property
    def hold_ttl_seconds(self) -> int: ...

    @property
    def hold_ttl_max_seconds(self) -> int: ...


def _storable_text(value: str) -> bool:
    # Lone surrogates cannot be encoded for any engine; NUL cannot be stored
    # by PostgreSQL, so no engine gets one and all behave alike.
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(value: str) -> bool:
    return value.isprintable() and not value.isspace() and _storable_text(value)


def valid_identity(value: object) -> TypeGuard[str]:
    """A user or actor id: 1-128 printable characters, not all blank."""
    return isinstance(value, str) and 0 < len(value) <= MAX_IDENTITY_LENGTH and _printable(value)


def check_identity(field_name: str, value: object) -> str:
    """``value`` if it is a valid identity; else a ``ValidationError`` on ``field_name``."""
    if not valid_identity(value):
        raise ValidationError.on(
            field_name, "Use a string of 1-128 printable characters", "identity"
        )
    return value


def _optional_identity(field_name: str, value: object) -> None:
    if value is not None:
        check_identity(field_name, value)


def _units(
    value: object, limits: Limits, *, signed: bool = False, allow_zero: bool = False
) -> int:
    # bool is an int subclass, and no float or Decimal ever is an amount.
    if type(value) is not int:
        raise ValidationError.on(
            "amount_usdc", "Amount must be an int of units (1 USDC = 10000000 units)", "type"
        )
    if value < 0 and not signed:
        raise ValidationError.on("amount_usdc", "Amount must be greater than zero.", "range")
    if value == 0 and not allow_zero:
        raise ValidationError.on("amount_usdc", "Amount must be greater than zero.", "range")
    if abs(value) > limits.max_amount_units:
        raise ValidationError.on(
            "amount_usdc",
            f"Amount must be at most {format_units(limits.max_amount_units)}.",
            "range",
        )
    return value


def _reference(value: object) -> None:
    if value is None:
        return
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_REFERENCE_LENGTH
        or not _printable(value)
    ):
        raise ValidationError.on(
            "reference", "Use a string of 1-255 printable characters", "reference"
        )


def _text(field_name: str, value: object, *, required: bool = False) -> None:
    if value is None and not required:
        return
    if (
        not isinstance(value, str)
        or len(value) > MAX_TEXT_LENGTH
        or not _storable_text(value)
        or (required and not value.strip())
    ):
        least = 1 if required else 0
        raise ValidationError.on(
            field_name, f"Use text of {least}-{MAX_TEXT_LENGTH} characters, without NUL", "text"
        )


def _metadata(value: object) -> None:
    def bad(message: str) -> ValidationError:
        return ValidationError.on("metadata", message, "metadata")

    if not isinstance(value, dict):
        raise bad("Use a flat object of string keys to string values")
    if len(value) > MAX_METADATA_KEYS:
        raise bad(f"Use at most {MAX_METADATA_KEYS} keys")
    for key, item in value.items():
        if (
            not isinstance(key, str)
            or not 0 < len(key) <= MAX_METADATA_KEY_LENGTH
            or not _printable(key)
        ):
            raise bad(f"Keys must be 1-{MAX_METADATA_KEY_LENGTH} printable characters")
        if (
            not isinstance(item, str)
            or len(item) > MAX_METADATA_VALUE_LENGTH
            or not (item == "" or (item.isprintable() and _storable_text(item)))
        ):
            raise bad(
                f"Values must be strings of at most {MAX_METADATA_VALUE_LENGTH} "
                "printable characters"
            )


def possible_id(value: str) -> bool:
    """Whether ``value`` could be an id the library handed out; others are
    never looked up (so a NUL or a megabyte never reaches the database)."""
    return 0 < len(value) <= MAX_ID_LENGTH and _printable(value)


def _ttl(value: object, most: int) -> None:
    # The codes the HTTP request model gives for the same mistakes.
    if type(value) is not int:
        code = "int_type"
    elif value < 1:
        code = "greater_than_equal"
    elif value > most:
        code = "less_than_equal"
    else:
        return
    raise ValidationError.on("expires_in_seconds", f"expires_in_seconds must be 1 to {most}", code)


DEFAULT_PRIORITY = 50
GRANT_CATEGORIES = ("paid", "promotional")


def _priority(value: object) -> None:
    if type(value) is not int or not 0 <= value <= 100:
        raise ValidationError.on("priority", "Use an integer from 0 to 100", "range")


def _instant(field_name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValidationError.on(
            field_name, "Use a timezone-aware datetime (ISO 8601 with an offset)", "datetime"
        )
    try:
        naive(value)
    except (OverflowError, ValueError):  # past the last instant UTC can hold
        raise ValidationError.on(field_name, "Out of range", "datetime") from None


def _object_id(value: object, missing: str) -> None:
    if not isinstance(value, str):
        raise ValidationError.on("id", "Use the id as a string", "type")
    if not possible_id(value):
        raise NotFound(missing)


def _plain_value(value: Any) -> Any:
    return naive(value).isoformat() if isinstance(value, datetime) else value


@dataclass(frozen=True, kw_only=True)
class Operation:
    """Base of the operations. ``limits`` is not part of what was asked."""

    #: The operation's name in the Python API (and its idempotency scope).
    name: ClassVar[str]
    limits: Limits = field(repr=False, compare=False)
    actor_id: str | None = None

    def params(self) -> dict[str, Any]:
        """What was asked, as plain values: the Python API's request fingerprint."""
        return {
            item.name: _plain_value(getattr(self, item.name))
            for item in fields(self)
            if item.name != "limits"
        }

    @property
    def user_id_or_none(self) -> str | None:
        """The account the operation names, if it names one directly."""
        found: str | None = getattr(self, "user_id", None)
        return found


@dataclass(frozen=True, kw_only=True)
class _Transfer(Operation):
    """The fields of a top-up and of a charge."""

    user_id: str
    amount_units: int
    reference: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_identity("user_id", self.user_id)
        _units(self.amount_units, self.limits)
        _reference(self.reference)
        _text("description", self.description)
        _metadata(self.metadata)
        _optional_identity("actor_id", self.actor_id)


@dataclass(frozen=True, kw_only=True)
class TopUp(_Transfer):
    """Credit money received (a payment) to a user's balance: a ``paid``
    grant, without expiry unless ``expires_at`` is given."""

    name: ClassVar[str] = "top_up"
    expires_at: datetime | None = None
    priority: int = DEFAULT_PRIORITY

    def __post_init__(self) -> None:
        super().__post_init__()
        _instant("expires_at", self.expires_at)
        _priority(self.priority)


@dataclass(frozen=True, kw_only=True)
class CreateGrant(Operation):
    """Give a user credit: ``promotional`` by default, used in consumption
    order, entering the balance at ``effective_at`` (default: now) and leaving
    it at ``expires_at`` (default: never)."""

    name: ClassVar[str] = "grant"
    user_id: str
    amount_units: int
    category: str = "promotional"
    priority: int = DEFAULT_PRIORITY
    effective_at: datetime | None = None
    expires_at: datetime | None = None
    reference: str | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_identity("user_id", self.user_id)
        _units(self.amount_units, self.limits)
        if self.category not in GRANT_CATEGORIES:
            raise ValidationError.on("category", "Use paid or promotional", "enum")
        _priority(self.priority)
        _instant("effective_at", self.effective_at)
        _instant("expires_at", self.expires_at)
        if (
            self.effective_at is not None
            and self.expires_at is not None
            and self.expires_at <= self.effective_at
        ):
            raise ValidationError.on(
                "expires_at", "expires_at must be later than effective_at", "range"
            )
        _reference(self.reference)
        _text("description", self.description)
        _metadata(self.metadata)
        _optional_identity("actor_id", self.actor_id)


@dataclass(frozen=True, kw_only=True)
class VoidGrant(Operation):
    """Take a grant's unheld remaining out of the balance now (its held part
    when its holds resolve); a scheduled grant never enters."""

    name: ClassVar[str] = "void_grant"
    grant_id: str
    #: Kept as the ``void`` entry's description.
    reason: str | None = None

    def __post_init__(self) -> None:
        _object_id(self.grant_id, "No such grant")
        _text("reason", self.reason)
        _optional_identity("actor_id", self.actor_id)


@dataclass(frozen=True, kw_only=True)
class Charge(_Transfer):
    """Debit a user's available balance."""

    name: ClassVar[str] = "charge"


@dataclass(frozen=True, kw_only=True)
class Adjust(Operation):
    """A signed correction (chargeback, fix); never takes the balance below zero."""

    name: ClassVar[str] = "adjust"
    user_id: str
    amount_units: int
    reason: str

    def __post_init__(self) -> None:
        check_identity("user_id", self.user_id)
        _units(self.amount_units, self.limits, signed=True)
        _text("reason", self.reason, required=True)
        _optional_identity("actor_id", self.actor_id)


@dataclass(frozen=True, kw_only=True)
class SetBalance(Operation):
    """Set a balance to ``balance_units`` through a recorded adjustment of the
    difference, read under the account's lock."""

    name: ClassVar[str] = "update_balance"
    user_id: str
    balance_units: int
    reason: str = "balance set"

    def __post_init__(self) -> None:
        check_identity("user_id", self.user_id)
        if type(self.balance_units) is not int or self.balance_units < 0:
            raise ValidationError.on(
                "balance_usdc", "A balance is a non-negative int of units", "range"
            )
        _text("reason", self.reason, required=True)
        _optional_identity("actor_id", self.actor_id)


@dataclass(frozen=True, kw_only=True)
class Refund(Operation):
    """Give back all or part of a ``charge`` or ``hold_capture`` entry."""

    name: ClassVar[str] = "refund"
    transaction_id: str
    amount_units: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        _object_id(self.transaction_id, "No such transaction")
        if self.amount_units is not None:
            _units(self.amount_units, self.limits)
        _text("reason", self.reason)
        _optional_identity("actor_id", self.actor_id)


@dataclass(frozen=True, kw_only=True)
class CreateHold(Operation):
    """Reserve part of a user's available balance. ``expires_in_seconds``
    defaults to the configured hold lifetime."""

    name: ClassVar[str] = "hold"
    user_id: str
    amount_units: int
    expires_in_seconds: int | None = None
    reference: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_identity("user_id", self.user_id)
        _units(self.amount_units, self.limits)
        ttl = self.expires_in_seconds
        if ttl is None:
            object.__setattr__(self, "expires_in_seconds", self.limits.hold_ttl_seconds)
        else:
            _ttl(ttl, self.limits.hold_ttl_max_seconds)
        _reference(self.reference)
        _metadata(self.metadata)
        _optional_identity("actor_id", self.actor_id)

    @property
    def ttl_seconds(self) -> int:
        """The hold's lifetime, default applied."""
        assert self.expires_in_seconds is not None  # set in __post_init__
        return self.expires_in_seconds


@dataclass(frozen=True, kw_only=True)
class Capture(Operation):
    """Spend up to the held amount (default: all of it) and release the rest."""

    name: ClassVar[str] = "capture"
    hold_id: str
    amount_units: int | None = None

    def __post_init__(self) -> None:
        _object_id(self.hold_id, "No such hold")
        if self.amount_units is not None:
            _units(self.amount_units, self.limits, allow_zero=True)
        _optional_identity("actor_id", self.actor_id)


@dataclass(frozen=True, kw_only=True)
class Release(Operation):
    """Give a hold's whole reservation back."""

    name: ClassVar[str] = "release"
    hold_id: str

    def __post_init__(self) -> None:
        _object_id(self.hold_id, "No such hold")
        _optional_identity("actor_id", self.actor_id)
