"""Request and response models: the validation of every view and the source
of the OpenAPI document.

Request models forbid unknown fields and coerce nothing (a JSON number is not
an amount). Amounts are plain strings here; :mod:`.money` parses them, so
there is one parser. Responses are built as dicts by the ``*_json`` functions
beside their models, and a test checks each against its model.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from .errors import Detail, ValidationError
from .ledger import Balance
from .money import format_units

__all__ = [
    "BalanceOut",
    "BalanceQuery",
    "ErrorDetail",
    "ErrorOut",
    "balance_json",
    "iso",
    "parse_model",
]

USDC_PATTERN = r"^[0-9]+(\.[0-9]{1,7})?$"
USDC_OUT_PATTERN = r"^-?[0-9]+\.[0-9]{7}$"


class Strict(BaseModel):
    """Base of request models: unknown keys are errors, nothing is coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


def iso(value: Any) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``."""
    return str(value.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


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


class ErrorOut(BaseModel):
    """The error body of every failure (SPEC §4)."""

    code: str = Field(examples=["VALIDATION_ERROR"])
    message: str
    requestId: str
    details: list[ErrorDetail]


# --- balance ----------------------------------------------------------------


class BalanceQuery(Strict):
    user_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Another user's id; requires the admin scope.",
    )


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
