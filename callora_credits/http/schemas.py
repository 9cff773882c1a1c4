"""Request and response models: the validation of every view and the source
of the OpenAPI document.

Request models forbid unknown fields and coerce nothing (a JSON number is not
an amount). Amounts are plain strings here; :mod:`.money` parses them, so
there is one parser. Responses are built as dicts by the ``*_json`` functions
beside their models, and a test checks each against its model.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from ..core.pagination import Page
from ..core.records import Balance, Entry, EntryType, Grant, Hold, Record
from ..core.usage import MAX_BUCKETS, Usage
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
    "GrantIn",
    "GrantOut",
    "GrantPageOut",
    "GrantsQuery",
    "HoldIn",
    "HoldOut",
    "HoldPageOut",
    "HoldsQuery",
    "RefundIn",
    "ReleaseIn",
    "TopUpIn",
    "TransactionsQuery",
    "UsageOut",
    "UsageQuery",
    "VoidGrantIn",
    "balance_json",
    "page_json",
    "parse_model",
]

USDC_PATTERN = r"^[0-9]+(\.[0-9]{1,7})?$"


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
        default=None,
        description="DUPLICATE_REFERENCE: the entry that has the reference (for a grant, "
        "the entry that brought it in; null while it is scheduled).",
    )
    grant_id: str | None = Field(
        default=None, description="DUPLICATE_REFERENCE of a grant: the grant that has it."
    )


class ErrorOut(BaseModel):
    """The body of every error response."""

    code: str = Field(examples=["VALIDATION_ERROR"])
    message: str
    requestId: str
    details: list[ErrorDetail]


# --- balance ----------------------------------------------------------------


BalanceOut = Balance.response_model()


def balance_json(balance: Balance) -> dict[str, Any]:
    return balance.as_json()


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


# RFC 3339's date-time (a space or lowercase letters allowed, seconds
# optional); datetime.fromisoformat alone would also take week dates, the
# basic format and any separator.
_INSTANT = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _instant(value: Any) -> Any:
    """An ISO 8601 string with an offset as an aware datetime; the same error
    code as the operations give for a datetime they cannot take."""
    if not isinstance(value, str):
        return value  # refused by the strict datetime check after this
    message = "Use an ISO 8601 date and time with an offset, such as 2026-12-31T23:59:59Z"
    if not _INSTANT.fullmatch(value):
        raise PydanticCustomError("datetime", message)
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError:
        raise PydanticCustomError("datetime", message) from None


Instant = Annotated[
    datetime,
    BeforeValidator(_instant),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "maxLength": 40,
            "examples": ["2026-12-31T23:59:59Z"],
        }
    ),
]
Priority = Annotated[
    int,
    Field(ge=0, le=100, description="A JSON integer, 0-100; lower is used first. Default 50."),
]


class BalanceQuery(Strict):
    user_id: UserId | None = Field(
        default=None, description="Another user's id; requires the admin scope."
    )


# --- ledger requests ------------------------------------------------------------


class _TransferIn(Strict):
    user_id: UserId
    amount_usdc: AmountIn
    reference: Reference | None = None
    description: Text | None = None
    metadata: Metadata = Field(default_factory=dict)


class TopUpIn(_TransferIn):
    expires_at: Instant | None = Field(
        default=None,
        description="When what is left of this credit leaves the balance; default never.",
    )
    priority: Priority = 50


class ChargeIn(_TransferIn):
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


EntryOut = Entry.response_model()


def _page_model(name: str, item: type[BaseModel]) -> type[BaseModel]:
    page: type[BaseModel] = create_model(
        name,
        data=(list[item], ...),  # type: ignore[valid-type]
        next_cursor=(str | None, ...),
        has_more=(bool, ...),
    )
    return page


EntryPageOut = _page_model("EntryPageOut", EntryOut)


def page_json(page: Page[Entry] | Page[Hold] | Page[Grant]) -> dict[str, Any]:
    """A page of records as the API lists them."""
    items: list[Record] = list(page.items)
    return {
        "data": [item.as_json() for item in items],
        "next_cursor": page.next_cursor,
        "has_more": page.has_more,
    }


# --- grants ---------------------------------------------------------------------


class GrantIn(Strict):
    user_id: UserId
    amount_usdc: AmountIn
    category: Literal["paid", "promotional"] = "promotional"
    priority: Priority = 50
    effective_at: Instant | None = Field(
        default=None, description="When it enters the balance; default (and if past) now."
    )
    expires_at: Instant | None = Field(
        default=None,
        description="When what is left of it leaves the balance; later than effective_at "
        "and than now. Default never.",
    )
    reference: Reference | None = Field(
        default=None, description="Unique per user among grants made by this endpoint."
    )
    description: Text | None = None
    metadata: Metadata = Field(default_factory=dict)


class VoidGrantIn(Strict):
    reason: Text | None = Field(default=None, description="Kept on the `void` entry.")


GrantStatusFilter = Literal["scheduled", "active", "depleted", "expired", "voided", "all"]


class GrantsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId | None = Field(default=None, description="Requires the admin scope.")
    status: GrantStatusFilter | None = Field(
        default=None, description="Default: the active and the scheduled grants."
    )
    limit: int | None = Field(
        default=None, ge=1, description="1 to CREDITS_PAGE_SIZE_MAX (100); default 20."
    )
    cursor: str | None = Field(default=None, max_length=64, description="next_cursor of a page.")


GrantOut = Grant.response_model()


GrantPageOut = _page_model("GrantPageOut", GrantOut)


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


HoldOut = Hold.response_model()


HoldPageOut = _page_model("HoldPageOut", HoldOut)


# --- usage ----------------------------------------------------------------------

# Checked by the ledger (the same check from every door); the schema documents it.
GranularityIn = Annotated[
    str,
    WithJsonSchema({"type": "string", "enum": ["hour", "day"]}),
]


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: UserId | None = Field(default=None, description="Requires the admin scope.")
    since: datetime | None = Field(
        default=None, description="Inclusive, ISO 8601; default 30 days before `until`."
    )
    until: datetime | None = Field(default=None, description="Exclusive, ISO 8601; default now.")
    granularity: GranularityIn | None = Field(
        default=None,
        description=f"UTC hours or days; default `day`. At most {MAX_BUCKETS} buckets.",
    )


UsageOut = Usage.response_model()
