"""One page class and one cursor codec for every list of the ledger.

Cursors are opaque, URL-safe (``[A-Za-z0-9_-]``) and validated in full before
any SQL runs: a cursor that this module did not write is a
:class:`~callora_credits.errors.ValidationError`, never a database error.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from ..errors import ValidationError
from .clock import naive

__all__ = [
    "Page",
    "decode_hold_cursor",
    "decode_seq_cursor",
    "encode_cursor",
    "hold_cursor",
    "seq_cursor",
]

T = TypeVar("T")

#: Keyset positions are BIGINT: nothing above this exists.
MAX_SEQ = 2**63 - 1
_ALPHABET = re.compile(r"[A-Za-z0-9_-]{1,160}")
# Library ids: a short prefix and hex digits.
_ID = re.compile(r"[a-z]{1,8}_[0-9a-f]{1,56}")
_STAMP_FORMAT = "%Y%m%d%H%M%S%f"


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, newest first, and the cursor of the next one."""

    items: list[T]
    next_cursor: str | None

    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


def _bad_cursor() -> ValidationError:
    return ValidationError(
        details=[{"field": "cursor", "message": "Use next_cursor from a page", "code": "cursor"}]
    )


def encode_cursor(*parts: str) -> str:
    """Encode a keyset position (its parts joined by ``:``) as an opaque cursor."""
    return base64.urlsafe_b64encode(":".join(parts).encode()).decode().rstrip("=")


def _decode(cursor: str, prefix: str, count: int) -> list[str]:
    if not _ALPHABET.fullmatch(cursor):
        raise _bad_cursor()
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise _bad_cursor() from None
    parts = text.split(":")
    if len(parts) != count + 1 or parts[0] != prefix or encode_cursor(*parts) != cursor:
        raise _bad_cursor()
    return parts[1:]


def seq_cursor(seq: int, prefix: str = "s") -> str:
    """The cursor of entries before ``seq`` (of grants before a grant
    ``number``, with ``prefix`` ``"g"``)."""
    return encode_cursor(prefix, str(seq))


def decode_seq_cursor(cursor: str, prefix: str = "s") -> int:
    """The ``seq`` of an entries cursor (the ``number`` of a grants cursor)."""
    (number,) = _decode(cursor, prefix, 1)
    if not number.isascii() or not number.isdigit() or len(number) > 19:
        raise _bad_cursor()
    seq = int(number)
    if not 1 <= seq <= MAX_SEQ:
        raise _bad_cursor()
    return seq


def hold_cursor(created_at: datetime, hold_id: str) -> str:
    """The cursor of holds older than (``created_at``, ``hold_id``)."""
    return encode_cursor("h", naive(created_at).strftime(_STAMP_FORMAT), hold_id)


def decode_hold_cursor(cursor: str) -> tuple[datetime, str]:
    """The position of a holds cursor."""
    stamp, hold_id = _decode(cursor, "h", 2)
    if not _ID.fullmatch(hold_id) or not stamp.isascii() or not stamp.isdigit():
        raise _bad_cursor()
    try:
        created = datetime.strptime(stamp, _STAMP_FORMAT)
    except ValueError:
        raise _bad_cursor() from None
    return created, hold_id
