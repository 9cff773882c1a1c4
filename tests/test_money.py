"""Amount parsing and formatting, with property tests."""

from __future__ import annotations

import pytest
from conftest import MAX_AMOUNT_UNITS as MAX
from hypothesis import given
from hypothesis import strategies as st

from callora_credits.core.money import (
    UNITS_PER_USDC,
    AmountError,
    format_units,
    parse_amount,
    parse_units,
)


@given(st.integers(min_value=1, max_value=MAX))
def test_format_then_parse_is_identity(units):
    text = format_units(units)
    assert len(text.split(".")[1]) == 7
    assert parse_amount(text, max_units=MAX) == units


@given(st.integers(min_value=-(10**18), max_value=10**18))
def test_signed_format_round_trips(units):
    assert parse_units(format_units(units)) == units


@given(
    st.integers(min_value=0, max_value=10**9),
    st.text(alphabet="0123456789", min_size=1, max_size=7),
)
def test_short_fractions_scale_exactly(whole, fraction):
    units = parse_amount(f"{whole}.{fraction}", max_units=10**20, allow_zero=True)
    assert units == whole * UNITS_PER_USDC + int(fraction.ljust(7, "0"))


@given(st.text(max_size=20))
def test_anything_else_is_refused_or_exact(text):
    try:
        units = parse_amount(text, max_units=MAX)
    except AmountError as exc:
        reason, message = exc.reason, str(exc)
        assert message
        assert reason in {"type", "format", "precision", "range"}
    else:
        assert format_units(units) == format_units(parse_units(text))
        assert text.isascii()
        assert text.strip() == text


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (1, "type"),
        (1.5, "type"),
        (True, "type"),
        (None, "type"),
        ("1e3", "format"),
        ("+1", "format"),
        ("-1", "format"),
        ("\u0661", "format"),  # ARABIC-INDIC DIGIT ONE
        ("1.12345678", "precision"),
        ("1\n", "format"),
        ("1.", "format"),
        (".5", "format"),
        ("", "format"),
        ("0", "range"),
        ("1000000000.0000001", "range"),
        ("9" * 41, "format"),
    ],
)
def test_bad_forms_say_why(value, reason):
    with pytest.raises(AmountError) as caught:
        parse_amount(value, max_units=MAX)
    assert caught.value.reason == reason


def test_signed_amounts():
    assert parse_amount("-5", max_units=MAX, signed=True) == -5 * UNITS_PER_USDC
    assert format_units(-12_500_000) == "-1.2500000"
    assert format_units(0) == "0.0000000"
