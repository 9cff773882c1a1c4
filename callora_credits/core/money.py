"""Amounts: integer units in the database, 7-decimal strings on the wire.

1 USDC = 10,000,000 units (Stellar's seven decimals). This module is the only
place that turns text into units or units into text; no float is involved.
"""

from __future__ import annotations

import re

__all__ = [
    "DECIMALS",
    "UNITS_PER_USDC",
    "AmountError",
    "format_units",
    "parse_amount",
    "parse_limit",
    "parse_units",
]

DECIMALS = 7
UNITS_PER_USDC = 10**DECIMALS

# ASCII digits only: str.isdigit() and \d accept other scripts' digits.
_AMOUNT = re.compile(r"(-?)([0-9]+)(?:\.([0-9]{1,7}))?", re.ASCII)
# Far longer than any allowed amount; stops huge strings before int().
_MAX_TEXT = 40

EXPECTED_FORM = 'a JSON string of digits with at most 7 decimals, such as "12.5000000"'


class AmountError(ValueError):
    """An amount that is not of the accepted form or range.

    ``reason`` is a short machine code (``type``, ``format``, ``precision``,
    ``range``) and ``str(error)`` a sentence saying what to send instead.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _to_units(text: str, *, signed: bool) -> int:
    if len(text) > _MAX_TEXT:
        raise AmountError(f"Amount is too long; send {EXPECTED_FORM}.", "format")
    match = _AMOUNT.fullmatch(text)
    if match is None:
        if re.fullmatch(r"-?[0-9]+\.[0-9]{8,}", text, re.ASCII):
            raise AmountError("Amount has more than 7 decimals; USDC has 7.", "precision")
        raise AmountError(f"Amount must be {EXPECTED_FORM}.", "format")
    sign, whole, fraction = match.groups()
    if sign and not signed:
        raise AmountError(f"Amount must be positive: {EXPECTED_FORM}.", "format")
    units = int(whole) * UNITS_PER_USDC + int((fraction or "").ljust(DECIMALS, "0"))
    return -units if sign else units  # type: ignore[no-any-return]


def parse_limit(text: str) -> int:
    """Parse a configured limit (``CREDITS_MAX_AMOUNT_USDC`` …) into units."""
    try:
        units = _to_units(str(text), signed=False)
    except AmountError as exc:
        raise ValueError(f"Invalid USDC limit {text!r}: {exc}") from None
    return units


def parse_amount(
    value: object, *, max_units: int, signed: bool = False, allow_zero: bool = False
) -> int:
    """Parse an amount from a request into units.

    ``value`` must be a ``str`` fully matching ``[0-9]+(\\.[0-9]{1,7})?``
    (with an optional leading ``-`` when ``signed``). Zero is refused unless
    ``allow_zero``, as is anything whose magnitude exceeds ``max_units``.
    """
    # bool is an int subclass; neither it nor any number is accepted.
    if not isinstance(value, str):
        raise AmountError(f"Amount must be a string, not a JSON number: {EXPECTED_FORM}.", "type")
    units = _to_units(value, signed=signed)
    if units == 0 and not allow_zero:
        raise AmountError("Amount must be greater than zero.", "range")
    if abs(units) > max_units:
        raise AmountError(f"Amount must be at most {format_units(max_units)}.", "range")
    return units


def format_units(units: int) -> str:
    """Format units as a decimal string with exactly 7 decimals."""
    sign = "-" if units < 0 else ""
    whole, fraction = divmod(abs(units), UNITS_PER_USDC)
    return f"{sign}{whole}.{fraction:07d}"


def parse_units(text: str) -> int:
    """The exact inverse of :func:`format_units` (signed, no range check)."""
    return _to_units(text, signed=True)
