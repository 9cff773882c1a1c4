"""The library's one clock, and the conversions of its timestamps.

Timestamps are stored as naive UTC (every engine alike) and handled in Python
as aware UTC datetimes; on the wire they are ISO 8601 with microseconds and
a ``Z``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

__all__ = ["Clock", "iso", "naive", "parse_iso", "utc", "utcnow"]

#: A callable returning the current time as an aware UTC datetime.
Clock = Callable[[], datetime]

_ISO_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def utcnow() -> datetime:
    """The default clock: the app server's, in UTC (see docs/decisions.md)."""
    return datetime.now(timezone.utc)


def utc(value: datetime) -> datetime:
    """A stored (naive UTC) timestamp as an aware UTC datetime."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def naive(value: datetime) -> datetime:
    """Naive UTC, as stored; a naive input is taken to be UTC already."""
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def iso(value: datetime) -> str:
    """ISO 8601 UTC with microseconds and a ``Z``."""
    return utc(value).strftime(_ISO_FORMAT)


def parse_iso(text: str) -> datetime:
    """The inverse of :func:`iso`."""
    return datetime.strptime(text, _ISO_FORMAT).replace(tzinfo=timezone.utc)
