"""Request and response models: the validation of every view and the source
of the OpenAPI document.

Request models forbid unknown fields and coerce nothing (a JSON number is not
an amount). Amounts are plain strings here; :mod:`.money` parses them, so
there is one parser. Responses are built as dicts by the ``*_json`` functions
beside their models, and a test checks each against its model.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic import ValidationError as PydanticValidationError

from ..core.ledger import Balance, HoldPage, Page, iso
from ..core.money import format_units
from ..errors import Detail, ValidationError

__all__ = [
    "AdjustmentIn",
    "BalanceOut",
    "BalanceQuery",
    "CaptureIn",
    "ChargeIn",
    "EntryOut",
    "EntryPageOut",
    "ErrorDetail",
    "ErrorOut",
    "HoldIn",
    "HoldOut",
    "HoldPageOut",
    "HoldsQuery",
    "RefundIn",
    "ReleaseIn",
    "TopUpIn",
    "TransactionsQuery",
    "balance_json",
    "hold_page_json",
    "page_json",
    "parse_model",
]

USDC_PATTERN = r"^[0-9]+(\.[0-9]{1,7})?$"
USDC_OUT_PATTERN = r"^-?[0-9]+\.[0-9]{7}$"


class Strict(BaseModel):
    """Base of request models: unknown keys are errors, nothing is coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


def _details(exc: PydanticValidationError) -> list[Detail]:
    details = []
    for error in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in error["loc"]) or "body"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "Unknown field"
        details.append({"field": field, "message": message, "code": error["type"]})
    return details


def parse_model(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` against ``model``; a 400 ``VALIDATION_ERROR`` if not."""
    try:
        return model.model_validate(data)
    except PydanticValidationError as exc:
        raise ValidationError(details=_details(exc)) from None


# --- errors -----------------------------------------------------------------


class ErrorDetail(BaseModel):
    field: str | None = None
    message: str
    code: str | None = None
    transaction_id: str | None = Field(
        default=None, description="DUPLICATE_REFERENCE: the entry that has the reference."
    )


class ErrorOut(BaseModel):
    """The body of every error response."""

    code: str = Field(examples=["VALIDATION_ERROR"])
    message: str
    requestId: str
    details: list[ErrorDetail]


# --- balance ----------------------------------------------------------------


class BalanceOut(BaseModel):
    user_id: str
    balance_usdc: str = Field(pattern=USDC_OUT_PATTERN, examples=["100.5000000"])
    held_usdc: str = Field(pattern=USDC_OUT_PATTERN, examples=["2.0000000"])
    available_usdc: str = Field(pattern=USDC_OUT_PATTERN, examples=["98.5000000"])
    created_at: str
    updated_at: str


def balance_json(balance: Balance) -> dict[str, Any]:
    return {
        "user_id": balance.user_id,
        "balance_usdc": format_units(balance.balance_units),
        "held_usdc": format_units(balance.held_units),
        "available_usdc": format_units(balance.available_units),
        "created_at": iso(balance.created_at),
        "updated_at": iso(balance.updated_at),
    }


# --- shared field types -------------------------------------------------------


def _printable(value: str) -> str:
    if not value.isprintable() or value.isspace():
        raise ValueError("must be printable characters, not all blank")
    return value


def _flat_metadata(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not 1 <= len(key) <= 40:
            raise ValueError("metadata keys must be 1-40 characters")
    return value


UserId = Annotated[
    str, Field(min_length=1, max_length=128, examples=["user_123"]), AfterValidator(_printable)
]
Reference = Annotated[
    str,
    Field(
        min_length=1,
        max_length=255,
        description="Unique per user and entry type: an external payment id.",
    ),
    AfterValidator(_printable),
]


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; no engine gets one, so all behave alike.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Text = Annotated[str, Field(max_length=500), AfterValidator(_no_nul)]
Metadata = Annotated[
    dict[str, Annotated[str, Field(max_length=500)]],
    Field(max_length=50, description="Flat string to string, at most 50 keys."),
    AfterValidator(_flat_metadata),
]
# Amounts are validated by money.parse_amount in the view (one parser, with a
# message that says what to send); the schema documents their form.
AmountIn = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": USDC_PATTERN,
            "examples": ["10.0000000"],
            "description": "USDC as a string with at most 7 decimals, greater than zero.",
        }
    ),
]
SignedAmountIn = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "string",
            "pattern": r"^-?[0-9]+(\.[0-9]{1,7})?$",
            "examples": ["-5.0000000"],
            "description": "Signed USDC, at most 7 decimals; negative takes credits away.",
        }
    ),
]
EntryType = Literal["topup", "charge", "refund", "hold_capture", "adjustment"]


class BalanceQuery(Strict):
    user_id: UserId | None = Field(
        default=None, description="Another user's id; requires the admin scope."
    )


# --- ledger requests ------------------------------------------------------------


class TopUpIn(Strict):
    user_id: UserId
    amount_usdc: AmountIn
    reference: Reference | None = None
    description: Text | None = None
    metadata: Metadata = Field(default_factory=dict)


class ChargeIn(TopUpIn):
    pass


class AdjustmentIn(Strict):
    user_id: UserId
    amount_usdc: SignedAmountIn
    reason: Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_no_nul)]


class RefundIn(Strict):
    amount_usdc: AmountIn | None = Field(
        default=None, description="Default: what is left of the charge."
    )
    reason: Text | None = None


class TransactionsQuery(BaseModel):
    """Query of the history (strings from the URL, converted)."""

    model_config = ConfigDict(extra="forbid")

    user_id: UserId | None = Field(default=None, description="Requires the admin scope.")
    limit: int | None = Field(
        default=None, ge=1, description="1 to CREDITS_PAGE_SIZE_MAX (100); default 20."
    )
    cursor: str | None = Field(default=None, max_length=64, description="next_cursor of a page.")
    type: EntryType | None = None
    since: datetime | None = Field(default=None, description="Inclusive, ISO 8601.")
    until: datetime | None = Field(default=None, description="Exclusive, ISO 8601.")


# --- ledger responses -----------------------------------------------------------


class EntryOut(BaseModel):
    id: str = Field(examples=["ctx_3f9c2a7e5b1d4c6a8e0f1b2c"])
    user_id: str
    seq: int = Field(description="The user's own gapless sequence: 1, 2, 3...")
    type: EntryType
    amount_usdc: str = Field(pattern=USDC_OUT_PATTERN, examples=["-1.2500000"])
    balance_after_usdc: str = Field(pattern=USDC_OUT_PATTERN)
    reference: str | None
    description: str | None
    metadata: dict[str, str]
    hold_id: str | None
    refund_of: str | None
    refunded_usdc: str = Field(pattern=USDC_OUT_PATTERN)
    actor_id: str | None
    created_at: str


class EntryPageOut(BaseModel):
    data: list[EntryOut]
    next_cursor: str | None
    has_more: bool


def page_json(page: Page) -> dict[str, Any]:
    return {
        "data": [entry.as_json() for entry in page.entries],
        "next_cursor": page.next_cursor,
        "has_more": page.has_more,
    }


# --- holds ----------------------------------------------------------------------


class HoldIn(Strict):
    user_id: UserId
    amount_usdc: AmountIn
    expires_in_seconds: int | None = Field(
        default=None,
        ge=1,
        description="1 to CREDITS_HOLD_TTL_MAX_SECONDS; default CREDITS_HOLD_TTL_SECONDS.",
    )
    reference: Reference | None = None
    metadata: Metadata = Field(default_factory=dict)


class CaptureIn(Strict):
    amount_usdc: AmountIn | None = Field(
        default=None, description="At most the held amount; default all of it; 0 releases."
    )


class ReleaseIn(Strict):
    """An empty body."""


class HoldsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId | None = Field(default=None, description="Requires the admin scope.")
    limit: int | None = Field(
        default=None, ge=1, description="1 to CREDITS_PAGE_SIZE_MAX (100); default 20."
    )
    cursor: str | None = Field(default=None, max_length=128)


class HoldOut(BaseModel):
    id: str = Field(examples=["hold_9a1b2c3d4e5f6a7b8c9d0e1f"])
    user_id: str
    status: Literal["pending", "captured", "released", "expired"]
    amount_usdc: str = Field(pattern=USDC_OUT_PATTERN)
    captured_usdc: str = Field(pattern=USDC_OUT_PATTERN)
    expires_at: str
    created_at: str
    resolved_at: str | None
    transaction_id: str | None
    reference: str | None
    metadata: dict[str, str]


class HoldPageOut(BaseModel):
    data: list[HoldOut]
    next_cursor: str | None
    has_more: bool


def hold_page_json(page: HoldPage) -> dict[str, Any]:
    return {
        "data": [hold.as_json() for hold in page.holds],
        "next_cursor": page.next_cursor,
        "has_more": page.has_more,
    }
