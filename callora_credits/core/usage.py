"""The usage summary: what a user's ledger did per UTC hour or day, and when
the available balance runs out at the recent pace.

:class:`UsageWindow` is the question, checked when it is built (whichever door
it came through); :class:`Usage` is the answer. The sums come from the
database in one statement (``db/usage.py``); this module lays them out in
buckets and derives the depletion estimate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, create_model

from ..errors import ValidationError
from .clock import naive, utc
from .operations import check_identity
from .records import TIME, UNITS, Record, attr

__all__ = [
    "BURN_WINDOW_DAYS",
    "DEFAULT_SPAN",
    "MAX_BUCKETS",
    "DepletionEstimate",
    "Granularity",
    "Usage",
    "UsageBucket",
    "UsageWindow",
]

Granularity = Literal["hour", "day"]

#: The length of a bucket of each granularity.
BUCKET_SIZES: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
#: More buckets than this in one summary is refused.
MAX_BUCKETS = 400
#: ``since`` when none is given: this long before ``until``.
DEFAULT_SPAN = timedelta(days=30)
#: The daily burn is the debited total of this many days before now, divided by it.
BURN_WINDOW_DAYS = 7

_MICROSECONDS_PER_DAY = 86_400 * 1_000_000


@dataclass(frozen=True)
class UsageBucket(Record):
    """One UTC-aligned hour or day of a user's ledger, in units.

    The amounts are unsigned: ``credited - debited - expired`` is the change of
    the balance over the bucket.
    """

    schema_name: ClassVar[str] = "UsageBucketOut"

    start: datetime = attr(TIME, description="The bucket's first instant (UTC, aligned).")
    debited_units: int = attr(
        UNITS, description="Charges, hold captures and negative adjustments."
    )
    credited_units: int = attr(
        UNITS, description="Top-ups, grants, positive adjustments and refunds."
    )
    expired_units: int = attr(UNITS, description="Expired and voided credit.")
    count: int = attr(description="Ledger entries of any type.")


@dataclass(frozen=True)
class DepletionEstimate(Record):
    """When the available balance runs out if spending goes on at the recent pace."""

    schema_name: ClassVar[str] = "DepletionEstimateOut"

    at: datetime = attr(
        TIME, description="Now plus the available balance divided by the daily burn, in days."
    )
    daily_burn_units: int = attr(
        UNITS,
        description=f"The debited total of the last {BURN_WINDOW_DAYS} days divided by "
        f"{BURN_WINDOW_DAYS}, rounded down to the unit.",
    )


@dataclass(frozen=True)
class Usage:
    """A user's usage summary: every bucket of the window, oldest first
    (empty ones with zeros), and the depletion estimate (``None`` when
    nothing was debited in the last days)."""

    granularity: Granularity
    buckets: list[UsageBucket]
    depletion_estimate: DepletionEstimate | None

    def as_json(self) -> dict[str, Any]:
        """The summary as the HTTP API shows it."""
        estimate = self.depletion_estimate
        return {
            "data": [bucket.as_json() for bucket in self.buckets],
            "granularity": self.granularity,
            "depletion_estimate": None if estimate is None else estimate.as_json(),
        }

    @classmethod
    def response_model(cls) -> type[BaseModel]:
        """The pydantic model of :meth:`as_json` (the OpenAPI schema)."""
        return _usage_model()


@cache
def _usage_model() -> type[BaseModel]:
    bucket = UsageBucket.response_model()
    estimate = DepletionEstimate.response_model()
    model: type[BaseModel] = create_model(
        "UsageOut",
        data=(list[bucket], ...),  # type: ignore[valid-type]
        granularity=(Granularity, ...),
        depletion_estimate=(estimate | None, ...),  # type: ignore[arg-type]
    )
    return model


def _floor(value: datetime, granularity: str) -> datetime:
    if granularity == "day":
        return value.replace(hour=0, minute=0, second=0, microsecond=0)
    return value.replace(minute=0, second=0, microsecond=0)


def _instant(name: str, value: object) -> datetime:
    """``value`` as naive UTC; a naive datetime is taken to be UTC already."""
    if not isinstance(value, datetime):
        raise ValidationError.on(name, "Use a datetime", "datetime_type")
    try:
        return naive(value)
    except OverflowError:
        raise ValidationError.on(name, "Date out of range", "range") from None


@dataclass(frozen=True)
class UsageWindow:
    """Which user's entries to sum, over which range, in which buckets.

    Built with :meth:`resolve`, which fills in the defaults and refuses what
    cannot be summarised. ``since`` and ``until`` are naive UTC; ``since`` is
    inclusive and ``until`` exclusive. ``now`` is the instant the depletion
    estimate starts from.
    """

    user_id: str
    since: datetime
    until: datetime
    granularity: Granularity
    now: datetime

    @classmethod
    def resolve(
        cls,
        user_id: object,
        since: object,
        until: object,
        granularity: object,
        now: datetime,
    ) -> UsageWindow:
        """The window asked for: ``until`` defaults to ``now``, ``since`` to
        30 days before ``until``. A :class:`~callora_credits.errors.ValidationError`
        names the field when the window cannot be summarised."""
        check_identity("user_id", user_id)
        if not isinstance(granularity, str) or granularity not in get_args(Granularity):
            raise ValidationError.on(
                "granularity", "Input should be 'hour' or 'day'", "literal_error"
            )
        end = naive(now) if until is None else _instant("until", until)
        if since is None:
            try:
                start = end - DEFAULT_SPAN
            except OverflowError:
                raise ValidationError.on(
                    "since", "30 days before until is out of range: give since", "range"
                ) from None
        else:
            start = _instant("since", since)
        if start >= end:
            raise ValidationError.on("since", "since must be earlier than until", "range")
        window = cls(user_id, start, end, granularity, naive(now))  # type: ignore[arg-type]
        count = window.bucket_count()
        if count > MAX_BUCKETS:
            raise ValidationError.on(
                "since",
                f"The range spans {count} {granularity}s; a summary has at most {MAX_BUCKETS} "
                "buckets: move since and until closer together"
                + (" or use granularity=day" if granularity == "hour" else ""),
                "too_many_buckets",
            )
        return window

    @property
    def bucket_size(self) -> timedelta:
        return BUCKET_SIZES[self.granularity]

    def bucket_count(self) -> int:
        """How many UTC-aligned buckets overlap ``[since, until)``."""
        first = _floor(self.since, self.granularity)
        last = _floor(self.until - timedelta(microseconds=1), self.granularity)
        return (last - first) // self.bucket_size + 1

    def bucket_starts(self) -> list[datetime]:
        """The start of every bucket that overlaps the window, oldest first."""
        first = _floor(self.since, self.granularity)
        return [first + index * self.bucket_size for index in range(self.bucket_count())]

    @property
    def burn_since(self) -> datetime:
        """The start of the burn window: debits written from here on count."""
        return self.now - timedelta(days=BURN_WINDOW_DAYS)

    def summary(
        self,
        sums: Mapping[datetime, tuple[int, int, int, int]],
        burn_window_debited_units: int,
        available_units: int,
    ) -> Usage:
        """Lay out the database's sums (per bucket start, naive UTC: debited,
        credited and expired units and the entry count) in every bucket, and
        estimate the depletion from the units debited in the burn window and
        ``available_units``."""
        buckets = []
        for start in self.bucket_starts():
            debited, credited, expired, count = sums.get(start, (0, 0, 0, 0))
            buckets.append(UsageBucket(utc(start), debited, credited, expired, count))
        return Usage(
            granularity=self.granularity,
            buckets=buckets,
            depletion_estimate=self.estimate(burn_window_debited_units, available_units),
        )

    def estimate(self, debited_units: int, available_units: int) -> DepletionEstimate | None:
        """The depletion estimate for ``debited_units`` spent in the burn
        window; ``None`` when the daily burn rounds down to zero.

        An instant past the last one a timestamp can hold reads as that one.
        """
        burn = debited_units // BURN_WINDOW_DAYS
        if burn <= 0:
            return None
        microseconds = max(available_units, 0) * _MICROSECONDS_PER_DAY // burn
        room = datetime.max - self.now
        if microseconds >= room // timedelta(microseconds=1):
            return DepletionEstimate(utc(datetime.max), burn)
        return DepletionEstimate(utc(self.now + timedelta(microseconds=microseconds)), burn)
