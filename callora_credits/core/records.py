"""What the ledger returns: balances, entries and holds, each field defined once.

Every field of a record says, in one place, what kind of value it is
(:data:`UNITS`, :data:`TIME`, :data:`METADATA`, or :data:`PLAIN`). Its
name on the wire (``amount_units`` is shown as ``amount_usdc``), its column,
its JSON form, how a stored row or a stored response is read back, and its
OpenAPI schema all derive from that declaration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from typing import Any, ClassVar, Literal, TypeVar, get_type_hints

from pydantic import BaseModel, create_model
from pydantic import Field as SchemaField

from .clock import iso, naive, parse_iso, utc
from .money import format_units, parse_units

__all__ = [
    "ALLOCATIONS",
    "METADATA",
    "NEXT_EXPIRY",
    "PLAIN",
    "TIME",
    "UNITS",
    "Allocation",
    "Balance",
    "Entry",
    "EntryType",
    "Grant",
    "Hold",
    "HoldStatus",
    "Kind",
    "NextExpiry",
    "Record",
    "dumps",
]

EntryType = Literal[
    "topup", "charge", "refund", "hold_capture", "adjustment", "grant", "expiration", "void"
]
GrantCategory = Literal["paid", "promotional"]
GrantStatus = Literal["scheduled", "active", "depleted", "expired", "voided"]
HoldStatus = Literal["pending", "captured", "released", "expired"]

#: The pattern of every amount the API prints.
USDC_OUT_PATTERN = r"^-?[0-9]+\.[0-9]{7}$"


def dumps(payload: Any) -> bytes:
    """Serialize JSON the one way the library does (compact, UTF-8).

    Stored idempotent responses are these bytes, so replays are identical.
    """
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


class Kind:
    """How one kind of field is named, stored, shown and read back.

    The base kind is a plain value, the same in Python, in its column and on
    the wire.
    """

    def wire_name(self, name: str) -> str:
        return name

    def column_name(self, name: str) -> str | None:
        """The field's column, or ``None`` for a field kept elsewhere."""
        return name

    def to_wire(self, value: Any) -> Any:
        return value

    def from_wire(self, value: Any) -> Any:
        return value

    def to_column(self, value: Any) -> Any:
        return value

    def from_column(self, value: Any) -> Any:
        return value

    def schema(self, annotation: Any, info: dict[str, Any]) -> tuple[Any, Any]:
        return annotation, SchemaField(**info)


class _Plain(Kind):
    def from_column(self, value: Any) -> Any:
        # Engines return BIGINT as int or Decimal-free int subclasses alike.
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else value


class _Units(Kind):
    """Integer units in Python and in the database; a 7-decimal string on the wire."""

    def wire_name(self, name: str) -> str:
        return name.removesuffix("_units") + "_usdc"

    def to_wire(self, value: Any) -> Any:
        return format_units(value)

    def from_wire(self, value: Any) -> Any:
        return parse_units(value)

    def from_column(self, value: Any) -> Any:
        return int(value)

    def schema(self, annotation: Any, info: dict[str, Any]) -> tuple[Any, Any]:
        return str, SchemaField(pattern=USDC_OUT_PATTERN, **info)


class _Time(Kind):
    """An aware UTC datetime in Python, naive UTC in the database, ISO 8601 on the wire."""

    def to_wire(self, value: Any) -> Any:
        return None if value is None else iso(value)

    def from_wire(self, value: Any) -> Any:
        return None if value is None else parse_iso(value)

    def to_column(self, value: Any) -> Any:
        return None if value is None else naive(value)

    def from_column(self, value: Any) -> Any:
        return None if value is None else utc(value)

    def schema(self, annotation: Any, info: dict[str, Any]) -> tuple[Any, Any]:
        optional = "None" in str(annotation)
        return (str | None) if optional else str, SchemaField(**info)


@dataclass(frozen=True)
class Allocation:
    """What one entry drew from (or gave back to) one grant."""

    grant_id: str
    amount_units: int


@dataclass(frozen=True)
class NextExpiry:
    """The soonest instant unheld credit expires, and how much does then."""

    at: datetime
    amount_units: int


class _Allocations(Kind):
    """A list of allocations, kept in their own table (no column here)."""

    def column_name(self, name: str) -> str | None:
        return None

    def to_wire(self, value: Any) -> Any:
        return [
            {"grant_id": item.grant_id, "amount_usdc": format_units(item.amount_units)}
            for item in value
        ]

    def from_wire(self, value: Any) -> Any:
        return tuple(
            Allocation(item["grant_id"], parse_units(item["amount_usdc"])) for item in value
        )

    def schema(self, annotation: Any, info: dict[str, Any]) -> tuple[Any, Any]:
        item = create_model(
            "AllocationOut",
            grant_id=(str, SchemaField(examples=["grant_5d2c8e1a9b7f4a3c6e0d1f2a"])),
            amount_usdc=(str, SchemaField(pattern=USDC_OUT_PATTERN)),
        )
        return list[item], SchemaField(**info)  # type: ignore[valid-type]


class _NextExpiry(Kind):
    """The balance's next expiry (computed, no column)."""

    def column_name(self, name: str) -> str | None:
        return None

    def to_wire(self, value: Any) -> Any:
        if value is None:
            return None
        return {"at": iso(value.at), "amount_usdc": format_units(value.amount_units)}

    def from_wire(self, value: Any) -> Any:
        if value is None:
            return None
        return NextExpiry(parse_iso(value["at"]), parse_units(value["amount_usdc"]))

    def schema(self, annotation: Any, info: dict[str, Any]) -> tuple[Any, Any]:
        item = create_model(
            "NextExpiryOut",
            at=(str, SchemaField()),
            amount_usdc=(str, SchemaField(pattern=USDC_OUT_PATTERN)),
        )
        return item | None, SchemaField(**info)


class _Metadata(Kind):
    """A flat ``str -> str`` mapping, stored as a JSON document."""

    def column_name(self, name: str) -> str:
        return name + "_json"

    def to_column(self, value: Any) -> Any:
        return dumps(value).decode()

    def from_column(self, value: Any) -> Any:
        return json.loads(value)


PLAIN: Kind = _Plain()
UNITS: Kind = _Units()
TIME: Kind = _Time()
METADATA: Kind = _Metadata()
ALLOCATIONS: Kind = _Allocations()
NEXT_EXPIRY: Kind = _NextExpiry()


def attr(
    kind: Kind = PLAIN,
    *,
    description: str | None = None,
    examples: list[Any] | None = None,
    derived: bool = False,
) -> Any:
    """Declare a record field: its kind, and what its schema documents.

    A ``derived`` field is computed by the record (in ``__post_init__``) and
    never read from a row or a stored response.
    """
    info = {k: v for k, v in (("description", description), ("examples", examples)) if v}
    return field(init=not derived, metadata={"kind": kind, "info": info, "derived": derived})


@dataclass(frozen=True)
class _Spec:
    name: str
    wire: str
    column: str | None
    kind: Kind
    annotation: Any
    info: dict[str, Any]
    derived: bool


R = TypeVar("R", bound="Record")


class Record:
    """Base of the records: the conversions every field of theirs derives."""

    #: Name of the generated response model in the OpenAPI document.
    schema_name: ClassVar[str]

    @classmethod
    def specs(cls) -> tuple[_Spec, ...]:
        return _specs(cls)

    def as_json(self) -> dict[str, Any]:
        """The record as the HTTP API shows it."""
        return {spec.wire: spec.kind.to_wire(getattr(self, spec.name)) for spec in self.specs()}

    def row_values(self) -> dict[str, Any]:
        """The record's columns, as inserted."""
        return {
            spec.column: spec.kind.to_column(getattr(self, spec.name))
            for spec in self.specs()
            if not spec.derived and spec.column is not None
        }

    @classmethod
    def from_row(cls: type[R], row: Any, **elsewhere: Any) -> R:
        """Read a record from a database row (any object with the columns as
        attributes); ``elsewhere`` gives the fields kept in other tables."""
        return cls(
            **{
                spec.name: spec.kind.from_column(getattr(row, spec.column))
                for spec in cls.specs()
                if not spec.derived and spec.column is not None
            },
            **elsewhere,
        )

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        """Rebuild a record from :meth:`as_json` (a stored response, replayed)."""
        return cls(
            **{
                spec.name: spec.kind.from_wire(data[spec.wire])
                for spec in cls.specs()
                if not spec.derived
            }
        )

    @classmethod
    def response_model(cls) -> type[BaseModel]:
        """The pydantic model of :meth:`as_json` (the OpenAPI schema)."""
        return _response_model(cls)


_SPECS: dict[type[Record], tuple[_Spec, ...]] = {}
_MODELS: dict[type[Record], type[BaseModel]] = {}


def _specs(cls: type[Record]) -> tuple[_Spec, ...]:
    cached = _SPECS.get(cls)
    if cached is not None:
        return cached
    hints = get_type_hints(cls)
    found = []
    for item in fields(cls):  # type: ignore[arg-type]
        kind: Kind = item.metadata["kind"]
        found.append(
            _Spec(
                name=item.name,
                wire=kind.wire_name(item.name),
                column=kind.column_name(item.name),
                kind=kind,
                annotation=hints[item.name],
                info=dict(item.metadata["info"]),
                derived=item.metadata["derived"],
            )
        )
    specs = _SPECS[cls] = tuple(found)
    return specs


def _response_model(cls: type[Record]) -> type[BaseModel]:
    model = _MODELS.get(cls)
    if model is None:
        definitions = {
            spec.wire: spec.kind.schema(spec.annotation, spec.info) for spec in cls.specs()
        }
        model = _MODELS[cls] = create_model(cls.schema_name, **definitions)  # type: ignore[call-overload]
    return model


@dataclass(frozen=True)
class Balance(Record):
    """A user's balance at one moment, in units."""

    schema_name: ClassVar[str] = "BalanceOut"

    user_id: str = attr(examples=["user_123"])
    balance_units: int = attr(UNITS, examples=["100.5000000"])
    held_units: int = attr(UNITS, description="Reserved by pending holds.")
    available_units: int = attr(
        UNITS, description="What a new charge or hold may spend.", derived=True
    )
    paid_units: int = attr(UNITS, description="The part of the balance from paid grants.")
    promotional_units: int = attr(
        UNITS, description="The part of the balance from promotional grants."
    )
    next_expiry: NextExpiry | None = attr(
        NEXT_EXPIRY,
        description="The soonest expiry of unheld credit, and the amount expiring then.",
    )
    created_at: datetime = attr(TIME)
    updated_at: datetime = attr(TIME)

    def __post_init__(self) -> None:
        object.__setattr__(self, "available_units", self.balance_units - self.held_units)


@dataclass(frozen=True)
class Entry(Record):
    """One ledger entry. ``amount_units`` is signed: credits positive."""

    schema_name: ClassVar[str] = "EntryOut"

    id: str = attr(examples=["ctx_3f9c2a7e5b1d4c6a8e0f1b2c"])
    user_id: str = attr()
    seq: int = attr(description="The user's own gapless sequence: 1, 2, 3...")
    type: EntryType = attr()
    amount_units: int = attr(UNITS, description="Signed: credits positive, debits negative.")
    balance_after_units: int = attr(UNITS)
    reference: str | None = attr()
    description: str | None = attr()
    metadata: dict[str, str] = attr(METADATA)
    hold_id: str | None = attr()
    refund_of: str | None = attr()
    refunded_units: int = attr(UNITS)
    grant_id: str | None = attr(
        description="The grant a topup, grant, positive adjustment, expiration or void is about."
    )
    allocations: tuple[Allocation, ...] = attr(
        ALLOCATIONS,
        description="The grants a debit drew from (or a refund gave back to), in order.",
    )
    actor_id: str | None = attr()
    created_at: datetime = attr(TIME)


@dataclass(frozen=True)
class Grant(Record):
    """Credit that entered (or will enter) a balance, and what is left of it,
    as of when it was read."""

    schema_name: ClassVar[str] = "GrantOut"

    id: str = attr(examples=["grant_5d2c8e1a9b7f4a3c6e0d1f2a"])
    user_id: str = attr()
    category: GrantCategory = attr()
    amount_units: int = attr(UNITS)
    remaining_units: int = attr(UNITS, description="What the grant can still give (unheld).")
    held_units: int = attr(UNITS, description="Pinned by pending holds.")
    priority: int = attr(description="0-100; lower is used first.")
    effective_at: datetime = attr(TIME)
    expires_at: datetime | None = attr(TIME)
    voided_at: datetime | None = attr(TIME)
    status: GrantStatus = attr()
    reference: str | None = attr()
    description: str | None = attr()
    metadata: dict[str, str] = attr(METADATA)
    transaction_id: str | None = attr(description="The entry that brought the grant in.")
    created_at: datetime = attr(TIME)


@dataclass(frozen=True)
class Hold(Record):
    """A two-phase reservation. ``status`` is as of when it was read: a
    pending hold past ``expires_at`` reads as ``expired``."""

    schema_name: ClassVar[str] = "HoldOut"

    id: str = attr(examples=["hold_9a1b2c3d4e5f6a7b8c9d0e1f"])
    user_id: str = attr()
    status: HoldStatus = attr()
    amount_units: int = attr(UNITS)
    captured_units: int = attr(UNITS)
    expires_at: datetime = attr(TIME)
    created_at: datetime = attr(TIME)
    resolved_at: datetime | None = attr(TIME)
    transaction_id: str | None = attr()
    reference: str | None = attr()
    metadata: dict[str, str] = attr(METADATA)

    def as_of(self, now: datetime) -> Hold:
        """The hold as read at ``now``: pending past its expiry reads ``expired``
        (resolved at its expiry), as it is once the expiry is written."""
        if self.status == "pending" and self.expires_at <= utc(now):
            return replace(self, status="expired", resolved_at=self.expires_at)
        return self
