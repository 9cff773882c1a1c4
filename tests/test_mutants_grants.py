"""Rules of grants that mutation testing found unpinned.

Each test here guards a rule of the grants API (give, void, list, read,
settle) that a mutant of the core broke while the rest of the suite still
passed: each refusal's field, code and message (the Python API refuses what
the HTTP API refuses), an exact bound, a default, a returned field. The ones
that touch the database run on every engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar

import pytest
from conftest import CLOCK_START as START
from conftest import LIMITS, Clock, Databases, make_app, refusal
from conftest import MAX_AMOUNT_UNITS as MAX

from callora_credits import current_ledger
from callora_credits.core.grants import DueHold, GrantState, due_events, next_due
from callora_credits.core.money import UNITS_PER_USDC
from callora_credits.core.operations import CreateGrant, VoidGrant
from callora_credits.core.records import (
    ALLOCATIONS,
    NEXT_EXPIRY,
    Allocation,
    NextExpiry,
    Record,
    attr,
)
from callora_credits.errors import GrantNotActive, NotFound

U = UNITS_PER_USDC


def _grant_op(**fields: Any) -> CreateGrant:
    return CreateGrant(limits=LIMITS, **{"user_id": "u", "amount_units": U, **fields})


IDENTITY = "Use a string of 1-128 printable characters"
INSTANT = "Use a timezone-aware datetime (ISO 8601 with an offset)"
PRIORITY = {"field": "priority", "message": "Use an integer from 0 to 100", "code": "range"}
LATER = {
    "field": "expires_at",
    "message": "expires_at must be later than effective_at",
    "code": "range",
}
NOON = datetime(2026, 6, 5, 12, 0, tzinfo=timezone.utc)


# --- CreateGrant and VoidGrant: each refusal names its field, code and message --------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"user_id": ""}, {"field": "user_id", "message": IDENTITY, "code": "identity"}),
        (
            {"amount_units": 0},
            {
                "field": "amount_usdc",
                "message": "Amount must be greater than zero.",
                "code": "range",
            },
        ),
        (
            {"amount_units": MAX + 1},
            {
                "field": "amount_usdc",
                "message": "Amount must be at most 1000000000.0000000.",
                "code": "range",
            },
        ),
        (
            {"amount_units": -U},
            {
                "field": "amount_usdc",
                "message": "Amount must be greater than zero.",
                "code": "range",
            },
        ),
        (
            {"category": "gift"},
            {"field": "category", "message": "Use paid or promotional", "code": "enum"},
        ),
        (
            {"category": "Paid"},
            {"field": "category", "message": "Use paid or promotional", "code": "enum"},
        ),
        ({"priority": -1}, PRIORITY),
        ({"priority": 101}, PRIORITY),
        ({"priority": True}, PRIORITY),
        ({"priority": 50.0}, PRIORITY),
        ({"priority": None}, PRIORITY),
        (
            {"effective_at": NOON.replace(tzinfo=None)},
            {"field": "effective_at", "message": INSTANT, "code": "datetime"},
        ),
        (
            {"effective_at": "2026-06-05T12:00:00Z"},
            {"field": "effective_at", "message": INSTANT, "code": "datetime"},
        ),
        (
            {"expires_at": NOON.replace(tzinfo=None)},
            {"field": "expires_at", "message": INSTANT, "code": "datetime"},
        ),
        ({"effective_at": NOON, "expires_at": NOON}, LATER),
        ({"effective_at": NOON, "expires_at": NOON - timedelta(microseconds=1)}, LATER),
        (
            {"effective_at": NOON, "expires_at": NOON.astimezone(timezone(timedelta(hours=-5)))},
            LATER,
        ),
        (
            {"reference": ""},
            {
                "field": "reference",
                "message": "Use a string of 1-255 printable characters",
                "code": "reference",
            },
        ),
        (
            {"description": "d" * 501},
            {
                "field": "description",
                "message": "Use text of 0-500 characters, without NUL",
                "code": "text",
            },
        ),
        (
            {"metadata": {"k": 1}},
            {
                "field": "metadata",
                "message": "Values must be strings of at most 500 printable characters",
                "code": "metadata",
            },
        ),
        (
            {"metadata": None},
            {
                "field": "metadata",
                "message": "Use a flat object of string keys to string values",
                "code": "metadata",
            },
        ),
        ({"actor_id": ""}, {"field": "actor_id", "message": IDENTITY, "code": "identity"}),
        ({"actor_id": 5}, {"field": "actor_id", "message": IDENTITY, "code": "identity"}),
    ],
)
def test_each_grant_refusal_names_its_field_code_and_message(fields, expected):
    assert refusal(lambda: _grant_op(**fields)) == expected


def test_a_grant_accepts_each_bound_and_keeps_what_was_asked():
    for priority in (0, 1, 99, 100):
        assert _grant_op(priority=priority).priority == priority
    assert _grant_op(amount_units=MAX).amount_units == MAX
    assert _grant_op(amount_units=1).amount_units == 1
    later = NOON + timedelta(microseconds=1)
    op = _grant_op(
        category="paid",
        effective_at=NOON,
        expires_at=later,
        reference="r" * 255,
        description="d" * 500,
        metadata={"k": "v"},
        actor_id="ops",
    )
    assert (op.category, op.effective_at, op.expires_at) == ("paid", NOON, later)
    # Only one of the two instants: nothing to compare.
    assert _grant_op(expires_at=NOON).expires_at == NOON
    assert _grant_op(effective_at=NOON).effective_at == NOON
    default = _grant_op()
    assert (default.category, default.priority, default.metadata) == ("promotional", 50, {})
    assert (default.effective_at, default.expires_at, default.reference) == (None, None, None)
    assert default.params() == {
        "actor_id": None,
        "user_id": "u",
        "amount_units": U,
        "category": "promotional",
        "priority": 50,
        "effective_at": None,
        "expires_at": None,
        "reference": None,
        "description": None,
        "metadata": {},
    }


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"grant_id": 5}, {"field": "id", "message": "Use the id as a string", "code": "type"}),
        (
            {"grant_id": "grant_1", "reason": "r" * 501},
            {
                "field": "reason",
                "message": "Use text of 0-500 characters, without NUL",
                "code": "text",
            },
        ),
        (
            {"grant_id": "grant_1", "reason": "a\x00b"},
            {
                "field": "reason",
                "message": "Use text of 0-500 characters, without NUL",
                "code": "text",
            },
        ),
        (
            {"grant_id": "grant_1", "actor_id": ""},
            {"field": "actor_id", "message": IDENTITY, "code": "identity"},
        ),
    ],
)
def test_each_void_refusal_names_its_field_code_and_message(fields, expected):
    assert refusal(lambda: VoidGrant(limits=LIMITS, **fields)) == expected


@pytest.mark.parametrize("grant_id", ["", "g" * 65, "grant_\n", "grant_\x00"])
def test_a_grant_id_that_cannot_exist_is_not_found(grant_id):
    with pytest.raises(NotFound) as caught:
        VoidGrant(limits=LIMITS, grant_id=grant_id)
    assert caught.value.message == "No such grant"


def test_a_void_keeps_its_reason_and_actor():
    op = VoidGrant(limits=LIMITS, grant_id="grant_1", reason="", actor_id="ops")
    assert op.params() == {"actor_id": "ops", "grant_id": "grant_1", "reason": ""}
    assert VoidGrant(limits=LIMITS, grant_id="g" * 64, reason="r" * 500).reason == "r" * 500


# --- records: the allocations and the next expiry, on a record no test has cached --------


def _record_with_grants() -> type[Record]:
    @dataclass(frozen=True)
    class Drawn(Record):
        schema_name: ClassVar[str] = "DrawnOut"

        allocations: tuple[Allocation, ...] = attr(ALLOCATIONS, description="Drawn from.")
        next_expiry: NextExpiry | None = attr(NEXT_EXPIRY, description="Soonest expiry.")  # noqa: RUF009

    return Drawn


def test_allocations_and_the_next_expiry_have_no_column_and_a_wire_form():
    drawn = _record_with_grants()
    at = datetime(2026, 6, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)
    record = drawn(
        allocations=(Allocation("grant_a", 25), Allocation("grant_b", 3 * U)),
        next_expiry=NextExpiry(at, U + 1),
    )
    assert record.as_json() == {
        "allocations": [
            {"grant_id": "grant_a", "amount_usdc": "0.0000025"},
            {"grant_id": "grant_b", "amount_usdc": "3.0000000"},
        ],
        "next_expiry": {"at": "2026-06-01T12:30:45.123456Z", "amount_usdc": "1.0000001"},
    }
    assert record.row_values() == {}
    assert [(spec.wire, spec.column) for spec in drawn.specs()] == [
        ("allocations", None),
        ("next_expiry", None),
    ]
    assert drawn.from_json(record.as_json()) == record
    empty = drawn(allocations=(), next_expiry=None)
    assert empty.as_json() == {"allocations": [], "next_expiry": None}
    assert drawn.from_json(empty.as_json()) == empty


def test_allocations_and_the_next_expiry_document_their_schema():
    drawn = _record_with_grants()
    schema = drawn.response_model().model_json_schema()
    allocations = schema["properties"]["allocations"]
    assert allocations["type"] == "array"
    assert allocations["description"] == "Drawn from."
    assert allocations["items"] == {"$ref": "#/$defs/AllocationOut"}
    assert schema["$defs"]["AllocationOut"] == {
        "properties": {
            "grant_id": {
                "examples": ["grant_5d2c8e1a9b7f4a3c6e0d1f2a"],
                "title": "Grant Id",
                "type": "string",
            },
            "amount_usdc": {
                "pattern": r"^-?[0-9]+\.[0-9]{7}$",
                "title": "Amount Usdc",
                "type": "string",
            },
        },
        "required": ["grant_id", "amount_usdc"],
        "title": "AllocationOut",
        "type": "object",
    }
    expiry = schema["properties"]["next_expiry"]
    assert expiry["anyOf"] == [{"$ref": "#/$defs/NextExpiryOut"}, {"type": "null"}]
    assert expiry["description"] == "Soonest expiry."
    assert schema["$defs"]["NextExpiryOut"] == {
        "properties": {
            "at": {"title": "At", "type": "string"},
            "amount_usdc": {
                "pattern": r"^-?[0-9]+\.[0-9]{7}$",
                "title": "Amount Usdc",
                "type": "string",
            },
        },
        "required": ["at", "amount_usdc"],
        "title": "NextExpiryOut",
        "type": "object",
    }
    assert set(schema["required"]) == {"allocations", "next_expiry"}


# --- the Python API on every engine ----------------------------------------------------


def test_the_python_api_keeps_every_field_of_a_grant(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        given = ledger.grant(
            user_id,
            3 * U,
            category="paid",
            priority=7,
            effective_at=START + timedelta(hours=1),
            expires_at=START + timedelta(days=2),
            reference="campaign-1",
            description="spring campaign",
            metadata={"campaign": "spring"},
            actor_id="ops_1",
            idempotency_key=f"{user_id}-grant",
        )
        assert (given.user_id, given.category, given.amount_units) == (user_id, "paid", 3 * U)
        assert (given.priority, given.status, given.remaining_units) == (7, "scheduled", 3 * U)
        assert given.effective_at == START + timedelta(hours=1)
        assert given.expires_at == START + timedelta(days=2)
        assert (given.reference, given.description) == ("campaign-1", "spring campaign")
        assert given.metadata == {"campaign": "spring"}
        assert given.transaction_id is None  # enters the balance when it takes effect
        again = ledger.grant(
            user_id,
            3 * U,
            category="paid",
            priority=7,
            effective_at=START + timedelta(hours=1),
            expires_at=START + timedelta(days=2),
            reference="campaign-1",
            description="spring campaign",
            metadata={"campaign": "spring"},
            actor_id="ops_1",
            idempotency_key=f"{user_id}-grant",
        )
        assert again == given
        assert len(ledger.grants(user_id, status="all").items) == 1

        default = ledger.grant(user_id, 2 * U)
        assert (default.category, default.priority, default.metadata) == ("promotional", 50, {})
        assert (default.effective_at, default.expires_at) == (START, None)
        assert (default.reference, default.description, default.status) == (None, None, "active")
        (entry,) = ledger.history(user_id).items
        assert (entry.id, entry.type, entry.grant_id) == (
            default.transaction_id,
            "grant",
            default.id,
        )
        assert (entry.amount_units, entry.actor_id) == (2 * U, None)

        clock.advance(hours=1)
        assert ledger.get_grant(given.id).status == "active"
        assert ledger.settle_grants() >= 1
        assert ledger.history(user_id).items[0].grant_id == given.id
        now = ledger.grant(user_id, U, actor_id="ops_1")
        entry = ledger.history(user_id).items[0]
        assert (entry.id, entry.grant_id, entry.actor_id) == (now.transaction_id, now.id, "ops_1")
        assert ledger.find_by_user_id(user_id).balance_units == 6 * U


@pytest.mark.parametrize(
    ("amount", "fields", "expected"),
    [
        (
            0,
            {},
            {
                "field": "amount_usdc",
                "message": "Amount must be greater than zero.",
                "code": "range",
            },
        ),
        (
            MAX + 1,
            {},
            {
                "field": "amount_usdc",
                "message": "Amount must be at most 1000000000.0000000.",
                "code": "range",
            },
        ),
        (
            U,
            {"category": "gift"},
            {"field": "category", "message": "Use paid or promotional", "code": "enum"},
        ),
        (U, {"priority": 101}, PRIORITY),
        (
            U,
            {"effective_at": datetime(2026, 6, 2)},
            {"field": "effective_at", "message": INSTANT, "code": "datetime"},
        ),
        (U, {"effective_at": NOON, "expires_at": NOON}, LATER),
        (
            U,
            {"expires_at": START},
            {
                "field": "expires_at",
                "message": "expires_at must be in the future",
                "code": "range",
            },
        ),
        (
            U,
            {"reference": ""},
            {
                "field": "reference",
                "message": "Use a string of 1-255 printable characters",
                "code": "reference",
            },
        ),
        (
            U,
            {"metadata": {"": "v"}},
            {
                "field": "metadata",
                "message": "Keys must be 1-40 printable characters",
                "code": "metadata",
            },
        ),
        (U, {"actor_id": ""}, {"field": "actor_id", "message": IDENTITY, "code": "identity"}),
    ],
)
def test_the_python_api_refuses_a_bad_grant_and_writes_nothing(
    app, clock, user_id, amount, fields, expected
):
    with app.app_context():
        ledger = current_ledger()
        assert refusal(lambda: ledger.grant(user_id, amount, **fields)) == expected
        assert ledger.find_by_user_id(user_id) is None
        assert ledger.grants(user_id, status="all").items == []


def test_the_python_api_refuses_a_grant_to_a_bad_user_id(app):
    with app.app_context():
        ledger = current_ledger()
        expected = {"field": "user_id", "message": IDENTITY, "code": "identity"}
        assert refusal(lambda: ledger.grant("", U)) == expected
        assert refusal(lambda: ledger.grants("")) == expected
        assert refusal(lambda: ledger.grants("u\x00")) == expected


def test_a_void_takes_what_is_left_with_its_reason_and_actor(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        given = ledger.grant(user_id, 5 * U)
        ledger.charge(user_id, 2 * U)
        voided = ledger.void_grant(
            given.id, reason="withdrawn", actor_id="ops_2", idempotency_key=f"{user_id}-void"
        )
        assert (voided.id, voided.status, voided.remaining_units) == (given.id, "voided", 0)
        assert voided.voided_at == START
        replayed = ledger.void_grant(
            given.id, reason="withdrawn", actor_id="ops_2", idempotency_key=f"{user_id}-void"
        )
        assert replayed == voided
        entry = ledger.history(user_id).items[0]
        assert (entry.type, entry.amount_units, entry.grant_id) == ("void", -3 * U, given.id)
        assert (entry.description, entry.actor_id) == ("withdrawn", "ops_2")
        assert len(ledger.history(user_id).items) == 3
        assert ledger.find_by_user_id(user_id).balance_units == 0
        with pytest.raises(GrantNotActive):
            ledger.void_grant(given.id)
        plain = ledger.void_grant(ledger.grant(user_id, U).id)
        latest = ledger.history(user_id).items[0]
        assert (plain.status, latest.description, latest.actor_id) == ("voided", None, None)
        with pytest.raises(NotFound) as lost:
            ledger.void_grant(f"grant_{'0' * 24}")
        assert lost.value.message == "No such grant"
        refused = refusal(lambda: ledger.void_grant(given.id, reason="r" * 501))
        assert refused == {
            "field": "reason",
            "message": "Use text of 0-500 characters, without NUL",
            "code": "text",
        }


def test_get_grant_reads_one_grant_as_of_now(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        given = ledger.grant(user_id, U, expires_at=START + timedelta(hours=1))
        assert ledger.get_grant(given.id) == given
        clock.advance(hours=1)
        expired = ledger.get_grant(given.id)
        assert (expired.status, expired.remaining_units) == ("expired", 0)
        for bad in (5, None, "", "g" * 65, "grant_\n", "grant_\x00", f"grant_{'0' * 24}"):
            assert ledger.get_grant(bad) is None


STATUS = {
    "field": "status",
    "message": "Use scheduled, active, depleted, expired, voided or all",
    "code": "enum",
}
LIMIT = {"field": "limit", "message": "limit must be a positive int", "code": "range"}


def test_grants_lists_each_status_newest_first(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        depleted = ledger.grant(user_id, U, priority=0)
        ledger.charge(user_id, U)
        expired = ledger.grant(user_id, U, expires_at=START + timedelta(seconds=1))
        voided = ledger.void_grant(ledger.grant(user_id, U).id)
        active = ledger.grant(user_id, U)
        scheduled = ledger.grant(user_id, U, effective_at=START + timedelta(days=1))
        clock.advance(seconds=1)

        def ids(status: str | None) -> list[str]:
            return [grant.id for grant in ledger.grants(user_id, status=status).items]

        assert ids(None) == [scheduled.id, active.id]
        assert ids("all") == [scheduled.id, active.id, voided.id, expired.id, depleted.id]
        assert ids("scheduled") == [scheduled.id]
        assert ids("active") == [active.id]
        assert ids("depleted") == [depleted.id]
        assert ids("expired") == [expired.id]
        assert ids("voided") == [voided.id]
        # Each figure is as of now: the expiry that fell due is read, unwritten.
        (shown,) = ledger.grants(user_id, status="expired").items
        assert (shown.status, shown.remaining_units) == ("expired", 0)
        for status in ("default", "pending", "", "ALL", "Active"):
            assert refusal(lambda status=status: ledger.grants(user_id, status=status)) == STATUS
        for limit in (0, -1, True, 2.0, "2", None):
            assert refusal(lambda limit=limit: ledger.grants(user_id, limit=limit)) == LIMIT
            assert refusal(lambda limit=limit: ledger.history(user_id, limit=limit)) == LIMIT
            assert refusal(lambda limit=limit: ledger.pending_holds(user_id, limit=limit)) == LIMIT


def test_grants_pages_walk_every_grant_once(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        made = [ledger.grant(user_id, U).id for _ in range(5)]
        first = ledger.grants(user_id, limit=2)
        assert [grant.id for grant in first.items] == made[:2:-1]
        assert first.has_more
        second = ledger.grants(user_id, limit=2, cursor=first.next_cursor)
        assert [grant.id for grant in second.items] == made[2:0:-1]
        last = ledger.grants(user_id, limit=2, cursor=second.next_cursor)
        assert [grant.id for grant in last.items] == made[:1]
        assert (last.next_cursor, last.has_more) == (None, False)
        exact = ledger.grants(user_id, limit=5)
        assert len(exact.items) == 5
        assert exact.next_cursor is None
        # An entries cursor is not a grants cursor.
        entries = ledger.history(user_id, limit=1).next_cursor
        assert refusal(lambda: ledger.grants(user_id, cursor=entries)) == {
            "field": "cursor",
            "message": "Use next_cursor from a page",
            "code": "cursor",
        }


def test_grants_default_to_pages_of_twenty(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        for _ in range(21):
            ledger.grant(user_id, U)
        page = ledger.grants(user_id)
        assert len(page.items) == 20
        assert page.has_more
        rest = ledger.grants(user_id, cursor=page.next_cursor)
        assert len(rest.items) == 1
        assert rest.next_cursor is None
        assert len(ledger.grants(user_id, limit=1).items) == 1


# --- settling: every due event of every account, each once ------------------------------


@pytest.fixture
def fresh(engine_name, tmp_path):
    """An app on a migrated database of its own (so settling counts only this
    test's events), with a stopped clock."""
    dbs = Databases(tmp_path / "fresh")
    app = make_app(dbs.url(engine_name))
    clock = Clock()
    app.extensions["callora_credits"].clock = clock
    yield app, clock
    with app.app_context():
        app.extensions["sqlalchemy"].engine.dispose()
    dbs.drop_all()


def test_settling_writes_every_due_event_of_every_account_once(fresh):
    app, clock = fresh
    with app.app_context():
        ledger = current_ledger()
        users = [f"settle-{n}" for n in range(3)]
        for user in users:
            ledger.grant(user, U, expires_at=START + timedelta(minutes=1))
            ledger.grant(user, 2 * U, effective_at=START + timedelta(minutes=1))
        ledger.top_up("settle-idle", U)
        assert ledger.settle_grants() == 0
        clock.advance(minutes=1)
        # One account per batch: the batches go on until none is due.
        assert ledger.settle_grants(batch=1) == 6
        assert ledger.settle_grants(batch=1) == 0
        assert ledger.expire_holds() == 0
        for user in users:
            types = [entry.type for entry in ledger.history(user).items]
            assert sorted(types) == ["expiration", "grant", "grant"]
            assert ledger.find_by_user_id(user).balance_units == 2 * U
        ledger.top_up("settle-hold", 5 * U)
        ledger.hold("settle-hold", 2 * U, expires_in_seconds=60)
        ledger.grant("settle-late", U, expires_at=START + timedelta(minutes=2))
        clock.advance(minutes=1)
        assert ledger.expire_holds() == 2
        assert ledger.settle_grants() == 0
        assert ledger.find_by_user_id("settle-hold").held_units == 0


# --- grants in memory: what falls due, in what order ----------------------------------


def _state(number: int, status: str = "active", **fields: Any) -> GrantState:
    values: dict[str, Any] = {
        "id": f"g{number}",
        "user_id": "u",
        "number": number,
        "category": "promotional",
        "amount_units": 10,
        "remaining_units": 10,
        "held_units": 0,
        "priority": 50,
        "effective_at": T0,
        "expires_at": None,
        "status": status,
        **fields,
    }
    return GrantState(**values)


T0 = datetime(2026, 6, 1, 12, 0)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)


def test_at_one_instant_hold_expiries_come_before_grant_expiries():
    grant = _state(1, remaining_units=6, held_units=4, expires_at=T1)
    hold = DueHold("h1", T0, T1, [("g1", 4)])
    events = due_events([grant], [hold], T1)
    assert [(event.at, event.kind) for event in events] == [
        (T1, "hold_expiry"),
        (T1, "expiry"),
    ]
    assert events[0].movements == []
    assert events[1].movements == [("expiration", grant, -10)]
    assert (grant.status, grant.remaining_units, grant.held_units) == ("expired", 0, 0)


def test_an_activation_comes_before_an_expiry_and_each_is_due_at_its_instant():
    scheduled = _state(1, "scheduled", effective_at=T1, expires_at=T2)
    assert due_events([scheduled], [], T1 - timedelta(microseconds=1)) == []
    (activation,) = due_events([scheduled], [], T1)
    assert (activation.at, activation.kind, activation.grant) == (T1, "activation", scheduled)
    assert activation.movements == [("grant", scheduled, 10)]
    assert scheduled.status == "active"
    again = _state(2, "scheduled", effective_at=T1, expires_at=T2)
    kinds = [(e.at, e.kind, e.movements) for e in due_events([again], [], T2)]
    assert kinds == [
        (T1, "activation", [("grant", again, 10)]),
        (T2, "expiry", [("expiration", again, -10)]),
    ]


def test_a_hold_expiry_gives_back_to_a_live_grant_and_out_of_a_dead_one():
    live = _state(1, remaining_units=2, held_units=3)
    voided = _state(2, "voided", remaining_units=0, held_units=5)
    spent = _state(3, remaining_units=0, held_units=0, expires_at=T1)
    early = DueHold("h1", T0, T1, [("g1", 3), ("g2", 5)])
    late = DueHold("h2", T0, T2, [("g1", 1)])
    events = due_events([live, voided, spent], [late, early], T1)
    assert [event.kind for event in events] == ["hold_expiry", "expiry"]
    assert events[0].hold is early
    assert events[0].movements == [("void", voided, -5)]
    assert events[1].grant is spent
    assert events[1].movements == []  # nothing was left to expire
    assert (live.remaining_units, live.held_units) == (5, 0)
    assert (voided.remaining_units, voided.held_units) == (0, 0)
    # Ties at one instant go in creation order.
    first = _state(1, expires_at=T1)
    second = _state(2, expires_at=T1)
    held = DueHold("h3", T0 - timedelta(seconds=1), T1, [])
    held_later = DueHold("h4", T0, T1, [])
    order = due_events([second, first], [held_later, held], T1)
    assert [(e.hold, e.grant) for e in order] == [
        (held, None),
        (held_later, None),
        (None, first),
        (None, second),
    ]


def test_the_next_due_instant_is_the_soonest_of_what_can_fall_due():
    assert next_due([], []) is None
    assert next_due([_state(1, expires_at=None)], []) is None
    dead = [_state(1, "expired", expires_at=T0), _state(2, "voided", expires_at=T0)]
    assert next_due(dead, []) is None
    assert next_due([*dead, _state(3, expires_at=T2)], [T1 + timedelta(minutes=5)]) == T2
    assert next_due([*dead, _state(4, "scheduled", effective_at=T1, expires_at=T2)], []) == T1
    assert next_due([_state(5, expires_at=T2)], [T1]) == T1


@pytest.mark.parametrize(
    ("status", "remaining", "held", "shown"),
    [
        ("voided", 0, 0, "voided"),
        ("voided", 5, 0, "voided"),
        ("scheduled", 10, 0, "scheduled"),
        ("expired", 0, 0, "expired"),
        ("active", 0, 0, "depleted"),
        ("active", 0, 1, "active"),
        ("active", 1, 0, "active"),
    ],
)
def test_a_grant_reads_as_its_status(status, remaining, held, shown):
    state = _state(1, status, remaining_units=remaining, held_units=held)
    assert state.status_at() == shown
