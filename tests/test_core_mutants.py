"""Behaviour of the money core that mutation testing found unpinned.

Each test here guards a rule that a mutant of the core (``make mutation``)
broke while the rest of the suite still passed: an exact boundary, the
message a refusal shows, a field of a stored entry, a branch of a replay. The
ones that move money run on every engine.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from conftest import LIMITS, SERVICE_SCOPE, assert_only_debits_refundable, make_token, refusal
from conftest import MAX_AMOUNT_UNITS as MAX
from sqlalchemy.dialects import postgresql, sqlite

from callora_credits import current_ledger, signals
from callora_credits.core.idempotency import CallCodec, IdempotencyScope, valid_key
from callora_credits.core.money import (
    UNITS_PER_USDC,
    AmountError,
    format_units,
    parse_amount,
    parse_limit,
)
from callora_credits.core.operations import (
    Adjust,
    Capture,
    Charge,
    CreateHold,
    Refund,
    Release,
    SetBalance,
    TopUp,
)
from callora_credits.core.pagination import (
    MAX_SEQ,
    decode_hold_cursor,
    decode_seq_cursor,
    encode_cursor,
    seq_cursor,
)
from callora_credits.core.records import METADATA, TIME, UNITS, Hold, Record, attr
from callora_credits.db import constraints, entry_rows, hold_rows, store
from callora_credits.db.models import IdempotencyRecord
from callora_credits.errors import (
    DuplicateReference,
    HoldAmountExceeded,
    HoldNotPending,
    InsufficientCredits,
    NotFound,
    RefundExceedsCharge,
    ValidationError,
)

U = UNITS_PER_USDC

FORM = 'a JSON string of digits with at most 7 decimals, such as "12.5000000"'


# --- money: the messages docs/errors.md shows, and the exact bounds ------------------


@pytest.mark.parametrize(
    ("value", "reason", "message"),
    [
        (1.5, "type", f"Amount must be a string, not a JSON number: {FORM}."),
        ("0.12345678", "precision", "Amount has more than 7 decimals; USDC has 7."),
        ("1e3", "format", f"Amount must be {FORM}."),
        ("-1", "format", f"Amount must be positive: {FORM}."),
        ("9" * 41, "format", f"Amount is too long; send {FORM}."),
        ("0", "range", "Amount must be greater than zero."),
        ("1000000001", "range", "Amount must be at most 1000000000.0000000."),
    ],
)
def test_each_refusal_shows_the_documented_message(value, reason, message):
    with pytest.raises(AmountError) as caught:
        parse_amount(value, max_units=MAX)
    assert caught.value.reason == reason
    assert str(caught.value) == message


def test_the_maximum_itself_is_accepted():
    assert parse_amount("1000000000", max_units=MAX) == MAX
    assert parse_amount("-1000000000", max_units=MAX, signed=True) == -MAX
    assert parse_amount("0.0000001", max_units=1) == 1


def test_forty_characters_is_still_an_amount():
    # Leading zeros are digits like any other; 40 characters is the longest text read.
    text = "1.5".rjust(40, "0")
    assert len(text) == 40
    assert parse_amount(text, max_units=MAX) == 15 * U // 10
    with pytest.raises(AmountError) as caught:
        parse_amount("0" + text, max_units=MAX)
    assert caught.value.reason == "format"
    assert "too long" in str(caught.value)


def test_a_limit_is_never_negative_and_says_which_was_refused():
    assert parse_limit("1000") == 1000 * U
    assert parse_limit("0") == 0
    with pytest.raises(ValueError, match=r"^Invalid USDC limit '-1': Amount must be positive: "):
        parse_limit("-1")
    with pytest.raises(ValueError, match=r"^Invalid USDC limit '1e9': Amount must be a JSON"):
        parse_limit("1e9")


def test_format_units_pads_seven_decimals_and_keeps_the_sign():
    assert format_units(1) == "0.0000001"
    assert format_units(-1) == "-0.0000001"
    assert format_units(U) == "1.0000000"
    assert format_units(-(10 * U + 5)) == "-10.0000005"


# --- operations: each refusal names its field, code and message -----------------------


TTL_MESSAGE = "expires_in_seconds must be 1 to 86400"


@pytest.mark.parametrize(
    ("ttl", "code"),
    [
        ("60", "int_type"),
        (True, "int_type"),
        (0, "greater_than_equal"),
        (-1, "greater_than_equal"),
        (86_401, "less_than_equal"),
    ],
)
def test_a_hold_lifetime_is_refused_with_the_request_models_code(ttl, code):
    detail = refusal(
        lambda: CreateHold(limits=LIMITS, user_id="u", amount_units=1, expires_in_seconds=ttl)
    )
    assert detail == {"field": "expires_in_seconds", "message": TTL_MESSAGE, "code": code}


def test_a_hold_lifetime_of_one_second_or_the_maximum_is_accepted():
    for ttl in (1, 2, 86_399, 86_400):
        hold = CreateHold(limits=LIMITS, user_id="u", amount_units=1, expires_in_seconds=ttl)
        assert hold.ttl_seconds == ttl
    assert CreateHold(limits=LIMITS, user_id="u", amount_units=1).ttl_seconds == 300


TEXT_REQUIRED = {"field": "reason", "message": "Use text of 1-500 characters, without NUL"}
TEXT_OPTIONAL = {"field": "reason", "message": "Use text of 0-500 characters, without NUL"}
BAD_ACTOR = {
    "field": "actor_id",
    "message": "Use a string of 1-128 printable characters",
    "code": "identity",
}


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (
            lambda: Adjust(limits=LIMITS, user_id="u", amount_units=1, reason="  "),
            {**TEXT_REQUIRED, "code": "text"},
        ),
        (
            lambda: Adjust(limits=LIMITS, user_id="u", amount_units=-1, reason=""),
            {**TEXT_REQUIRED, "code": "text"},
        ),
        (
            lambda: SetBalance(limits=LIMITS, user_id="u", balance_units=1, reason=" "),
            {**TEXT_REQUIRED, "code": "text"},
        ),
        (
            lambda: Refund(limits=LIMITS, transaction_id="ctx_1", reason="r" * 501),
            {**TEXT_OPTIONAL, "code": "text"},
        ),
        (
            lambda: Refund(limits=LIMITS, transaction_id="ctx_1", reason="a\x00b"),
            {**TEXT_OPTIONAL, "code": "text"},
        ),
    ],
)
def test_reasons_are_checked_where_they_are_written(build, expected):
    assert refusal(build) == expected


def test_descriptions_and_hold_references_are_checked():
    description = refusal(
        lambda: TopUp(limits=LIMITS, user_id="u", amount_units=1, description="d" * 501)
    )
    assert (description["field"], description["code"]) == ("description", "text")
    reference = refusal(
        lambda: CreateHold(limits=LIMITS, user_id="u", amount_units=1, reference="")
    )
    assert reference == {
        "field": "reference",
        "message": "Use a string of 1-255 printable characters",
        "code": "reference",
    }


def test_an_optional_reason_may_be_empty_or_absent_and_a_required_one_any_text():
    assert Refund(limits=LIMITS, transaction_id="ctx_1", reason="").reason == ""
    assert Refund(limits=LIMITS, transaction_id="ctx_1").reason is None
    assert Adjust(limits=LIMITS, user_id="u", amount_units=1, reason="r" * 500).amount_units == 1


OPERATIONS = {
    "top_up": lambda actor: TopUp(limits=LIMITS, user_id="u", amount_units=1, actor_id=actor),
    "charge": lambda actor: Charge(limits=LIMITS, user_id="u", amount_units=1, actor_id=actor),
    "adjust": lambda actor: Adjust(
        limits=LIMITS, user_id="u", amount_units=1, reason="r", actor_id=actor
    ),
    "update_balance": lambda actor: SetBalance(
        limits=LIMITS, user_id="u", balance_units=1, actor_id=actor
    ),
    "refund": lambda actor: Refund(limits=LIMITS, transaction_id="ctx_1", actor_id=actor),
    "hold": lambda actor: CreateHold(limits=LIMITS, user_id="u", amount_units=1, actor_id=actor),
    "capture": lambda actor: Capture(limits=LIMITS, hold_id="hold_1", actor_id=actor),
    "release": lambda actor: Release(limits=LIMITS, hold_id="hold_1", actor_id=actor),
}


@pytest.mark.parametrize("name", list(OPERATIONS))
@pytest.mark.parametrize("actor", ["", "a\x00b", "x" * 129, 5])
def test_every_operation_checks_its_actor(name, actor):
    assert refusal(lambda: OPERATIONS[name](actor)) == BAD_ACTOR


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_every_operation_records_its_actor(name):
    op = OPERATIONS[name]("ops admin")
    assert op.actor_id == "ops admin"
    assert op.params()["actor_id"] == "ops admin"
    assert "limits" not in op.params()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Refund(limits=LIMITS, transaction_id="c" * 65), "No such transaction"),
        (lambda: Refund(limits=LIMITS, transaction_id="ctx_\n"), "No such transaction"),
        (lambda: Capture(limits=LIMITS, hold_id="h" * 65), "No such hold"),
        (lambda: Release(limits=LIMITS, hold_id="h" * 65), "No such hold"),
        (lambda: Release(limits=LIMITS, hold_id=""), "No such hold"),
    ],
)
def test_an_id_that_cannot_exist_is_not_found_without_a_look_up(build, message):
    with pytest.raises(NotFound) as caught:
        build()
    assert caught.value.message == message


def test_an_id_that_is_not_a_string_is_a_type_error_of_field_id():
    expected = {"field": "id", "message": "Use the id as a string", "code": "type"}
    assert refusal(lambda: Release(limits=LIMITS, hold_id=5)) == expected
    assert refusal(lambda: Refund(limits=LIMITS, transaction_id=None)) == expected


# --- records: one declaration per field, on a record no other test has cached ----------
# Balance, Entry and Hold derive their specs and schemas once per process, so a
# record class made inside the test is what shows each derivation working.


def _sample_record() -> type[Record]:
    @dataclass(frozen=True)
    class Sample(Record):
        schema_name: ClassVar[str] = "SampleOut"

        id: str = attr(examples=["smp_1"])
        amount_units: int = attr(UNITS, description="An amount.")
        half_units: int = attr(UNITS, derived=True)
        flag: bool = attr()
        at: datetime = attr(TIME)
        until: datetime | None = attr(TIME)
        metadata: dict[str, str] = attr(METADATA)

        def __post_init__(self) -> None:
            object.__setattr__(self, "half_units", self.amount_units // 2)

    return Sample


AT = datetime(2026, 6, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)


def test_a_record_derives_its_wire_names_columns_and_forms_from_one_declaration():
    sample = _sample_record()
    record = sample(id="smp_1", amount_units=25, flag=True, at=AT, until=None, metadata={"k": "v"})
    assert record.as_json() == {
        "id": "smp_1",
        "amount_usdc": "0.0000025",
        "half_usdc": "0.0000012",
        "flag": True,
        "at": "2026-06-01T12:30:45.123456Z",
        "until": None,
        "metadata": {"k": "v"},
    }
    assert record.row_values() == {
        "id": "smp_1",
        "amount_units": 25,
        "flag": True,
        "at": datetime(2026, 6, 1, 12, 30, 45, 123456),
        "until": None,
        "metadata_json": '{"k":"v"}',
    }
    assert [spec.derived for spec in sample.specs()] == [
        False,
        False,
        True,
        False,
        False,
        False,
        False,
    ]


def test_a_record_reads_back_from_its_row_and_from_its_json():
    sample = _sample_record()
    record = sample(id="smp_2", amount_units=7, flag=False, at=AT, until=AT, metadata={})
    row = SimpleNamespace(
        id="smp_2",
        amount_units=7,
        flag=False,
        at=AT.replace(tzinfo=None),
        until=AT.replace(tzinfo=None),
        metadata_json="{}",
    )
    from_row = sample.from_row(row)
    assert from_row == record
    assert from_row.flag is False
    assert from_row.at.tzinfo is timezone.utc
    assert sample.from_json(record.as_json()) == record
    assert sample.from_json({**record.as_json(), "until": None}).until is None


def test_a_records_response_model_is_its_json_schema():
    sample = _sample_record()
    model = sample.response_model()
    assert model.__name__ == "SampleOut"
    assert sample.response_model() is model
    schema = model.model_json_schema()
    assert list(schema["properties"]) == [
        "id",
        "amount_usdc",
        "half_usdc",
        "flag",
        "at",
        "until",
        "metadata",
    ]
    amount = schema["properties"]["amount_usdc"]
    assert amount["type"] == "string"
    assert amount["pattern"] == r"^-?[0-9]+\.[0-9]{7}$"
    assert amount["description"] == "An amount."
    assert schema["properties"]["id"]["examples"] == ["smp_1"]
    assert schema["properties"]["at"]["type"] == "string"
    assert {"type": "null"} in schema["properties"]["until"]["anyOf"]
    assert "description" not in schema["properties"]["flag"]
    assert set(schema["required"]) == set(schema["properties"])
    model.model_validate(
        sample(id="s", amount_units=1, flag=True, at=AT, until=None, metadata={}).as_json()
    )


# --- pagination: a cursor the library did not write ------------------------------------


@pytest.mark.parametrize(
    "decode", [decode_seq_cursor, decode_hold_cursor], ids=["entries", "holds"]
)
def test_a_foreign_cursor_names_the_cursor_field(decode):
    detail = refusal(lambda: decode("bm90LWEtY3Vyc29y"))
    assert detail == {
        "field": "cursor",
        "message": "Use next_cursor from a page",
        "code": "cursor",
    }


# --- the Python API on every engine ----------------------------------------------------


def _key_records(app: Any, user_id: str) -> int:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.select(sa.func.count()).where(IdempotencyRecord.user_id == user_id)
                ).scalar_one()
            )


def test_a_replayed_hold_is_the_same_hold(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        first = ledger.hold(user_id, 4 * U, idempotency_key=f"{user_id}-hold-once")
        again = ledger.hold(user_id, 4 * U, idempotency_key=f"{user_id}-hold-once")
        assert isinstance(again, Hold)
        assert again == first
        assert ledger.find_by_user_id(user_id).held_units == 4 * U
        captured = ledger.capture(first.id, U, idempotency_key=f"{user_id}-capture-once")
        replayed = ledger.capture(first.id, U, idempotency_key=f"{user_id}-capture-once")
        assert isinstance(replayed, Hold)
        assert replayed == captured
        assert (replayed.status, replayed.captured_units) == ("captured", U)


def test_a_replayed_error_keeps_its_message_and_details(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, U, reference="pay_1")
        errors = []
        for _ in range(2):
            with pytest.raises(DuplicateReference) as caught:
                ledger.top_up(user_id, U, reference="pay_1", idempotency_key=f"{user_id}-dup")
            errors.append(caught.value)
        stored, replayed = errors
        assert replayed is not stored
        assert replayed.message == stored.message
        assert replayed.details == stored.details
        assert replayed.details[0]["transaction_id"] == first.id
        with pytest.raises(InsufficientCredits) as short:
            ledger.charge(user_id, 2 * U, idempotency_key=f"{user_id}-short")
        with pytest.raises(InsufficientCredits) as short_again:
            ledger.charge(user_id, 2 * U, idempotency_key=f"{user_id}-short")
        assert short_again.value.message == short.value.message
        charge = ledger.charge(user_id, U)
        messages = []
        for _ in range(2):
            with pytest.raises(RefundExceedsCharge) as exceeded:
                ledger.refund(charge.id, 2 * U, idempotency_key=f"{user_id}-too-much")
            messages.append(exceeded.value.message)
        assert messages == ["At most 1.0000000 USDC of this charge can be refunded"] * 2


def test_ids_that_cannot_exist_are_none_without_a_look_up(app):
    with app.app_context():
        ledger = current_ledger()
        for bad in (5, None, "", "h" * 65, "hold_\n"):
            assert ledger.get_hold(bad) is None
            assert ledger.get_entry(bad) is None


def test_pending_holds_pages_walk_every_hold_once(app, clock, user_id):
    # The clock is stopped: every hold has the same created_at, so the pages
    # hold together only by the id that breaks the tie.
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 100 * U)
        made = [ledger.hold(user_id, U).id for _ in range(7)]
        seen, cursor, sizes = [], None, []
        while True:
            page = ledger.pending_holds(user_id, limit=3, cursor=cursor)
            sizes.append(len(page.items))
            seen += [hold.id for hold in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sizes == [3, 3, 1]
        assert sorted(seen) == sorted(made)
        exact = ledger.pending_holds(user_id, limit=7)
        assert len(exact.items) == 7
        assert exact.next_cursor is None
        assert not exact.has_more


def test_pending_holds_default_to_pages_of_twenty(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 100 * U)
        for _ in range(21):
            ledger.hold(user_id, U)
        page = ledger.pending_holds(user_id)
        assert len(page.items) == 20
        assert page.has_more
        rest = ledger.pending_holds(user_id, cursor=page.next_cursor)
        assert len(rest.items) == 1
        assert rest.next_cursor is None


def test_adjust_and_refund_record_who_asked_and_why(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        fix = ledger.adjust(user_id, -U, "chargeback", actor_id="ops_1")
        assert (fix.type, fix.description, fix.actor_id) == ("adjustment", "chargeback", "ops_1")
        charge = ledger.charge(user_id, 4 * U)
        refund = ledger.refund(
            charge.id,
            U,
            reason="goodwill",
            actor_id="ops_2",
            idempotency_key=f"{user_id}-refund-once",
        )
        assert (refund.description, refund.actor_id, refund.refund_of) == (
            "goodwill",
            "ops_2",
            charge.id,
        )
        again = ledger.refund(
            charge.id,
            U,
            reason="goodwill",
            actor_id="ops_2",
            idempotency_key=f"{user_id}-refund-once",
        )
        assert again == refund
        assert ledger.get_entry(charge.id).refunded_units == U
        assert ledger.find_by_user_id(user_id).balance_units == 6 * U
        adjusted = ledger.adjust(user_id, U, "fix", idempotency_key=f"{user_id}-adjust-once")
        assert (
            ledger.adjust(user_id, U, "fix", idempotency_key=f"{user_id}-adjust-once") == adjusted
        )
        assert ledger.find_by_user_id(user_id).balance_units == 7 * U


def test_pruning_removes_expired_keys_only(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, U, idempotency_key=f"{user_id}-kept")
        app.config["CREDITS_IDEMPOTENCY_TTL_SECONDS"] = 0
        ledger = current_ledger()
        ledger.top_up(user_id, U, idempotency_key=f"{user_id}-expired")
        assert _key_records(app, user_id) == 2
        assert ledger.prune_idempotency_keys() >= 1
        assert _key_records(app, user_id) == 1


# --- store: the SQL, on every engine, and the shapes of the drivers' errors ------------


def test_the_reference_constraints_are_found_by_their_columns():
    assert (
        constraints.unique_constraint(store.entries, "user_id", "type", "reference")
        is entry_rows.ENTRY_REFERENCE
    )
    assert (
        constraints.unique_constraint(store.holds, "user_id", "reference")
        is hold_rows.HOLD_REFERENCE
    )
    with pytest.raises(LookupError, match=r"^credits_transactions has no unique constraint on"):
        constraints.unique_constraint(store.entries, "user_id", "reference", "type")
    assert (
        constraints._constraint_name(entry_rows.ENTRY_REFERENCE)
        == "uq_credits_transactions_user_id_type_reference"
    )
    assert (
        constraints._constraint_name(hold_rows.HOLD_REFERENCE)
        == "uq_credits_holds_user_id_reference"
    )


def _integrity_error(orig: BaseException) -> sa.exc.IntegrityError:
    return sa.exc.IntegrityError("INSERT …", {}, orig)


class _PsycopgError(Exception):
    def __init__(self, constraint_name: str | None) -> None:
        super().__init__("duplicate key value violates unique constraint")
        self.diag = SimpleNamespace(constraint_name=constraint_name)


ENTRY_NAME = "uq_credits_transactions_user_id_type_reference"


@pytest.mark.parametrize(
    ("orig", "expected"),
    [
        (_PsycopgError(ENTRY_NAME), True),
        (_PsycopgError("uq_credits_transactions_user_id_seq"), False),
        (_PsycopgError(None), False),
        (Exception(1062, f"Duplicate entry 'u-topup-r' for key '{ENTRY_NAME}'"), True),
        (
            Exception(1062, "Duplicate entry 'u-1' for key 'uq_credits_transactions_user_id_seq'"),
            False,
        ),
        (Exception(1062), False),
        (Exception(1048, f"Column 'x' cannot be null '{ENTRY_NAME}'"), False),
        (
            Exception(
                "UNIQUE constraint failed: credits_transactions.user_id, "
                "credits_transactions.type, credits_transactions.reference"
            ),
            True,
        ),
        (
            Exception(
                "UNIQUE constraint failed: credits_transactions.user_id, credits_transactions.seq"
            ),
            False,
        ),
        (Exception("NOT NULL constraint failed: credits_transactions.metadata_json"), False),
    ],
    ids=[
        "psycopg",
        "psycopg-other",
        "psycopg-unnamed",
        "pymysql",
        "pymysql-other",
        "pymysql-no-message",
        "pymysql-not-a-duplicate",
        "sqlite",
        "sqlite-other",
        "sqlite-not-null",
    ],
)
def test_each_drivers_duplicate_is_told_apart(orig, expected):
    assert constraints.violates(_integrity_error(orig), entry_rows.ENTRY_REFERENCE) is expected
    assert constraints.violates(_integrity_error(orig), hold_rows.HOLD_REFERENCE) is False


NOW = datetime(2026, 6, 1, 12, 0)


def test_a_credit_creates_adds_and_stops_at_the_limit(app, user_id):
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.begin() as conn:
            assert store.credit(conn, user_id, 5, 10, NOW, grants=1) == (5, 1, 1)
            assert store.credit(conn, user_id, 4, 10, NOW, grants=1) == (9, 2, 2)
            assert store.credit(conn, user_id, 2, 10, NOW) is None
            assert store.credit(conn, user_id, 1, 10, NOW) == (10, 3, 2)
            assert store.debit(conn, user_id, 11, NOW) is None
            assert store.debit(conn, user_id, 10, NOW) == (0, 4)
            row = store.lock_account(conn, user_id)
            assert (row.balance_units, row.last_seq) == (0, 4)
            conn.rollback()


def test_the_credit_upsert_statement_as_built(app, user_id):
    """The upsert is built once when the module loads; built here again, it
    must create the account, add to it and refuse to pass the limit."""
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        dialect_insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}
        if engine.dialect.name not in dialect_insert:
            # MariaDB has no upsert with a condition: an UPDATE, then an INSERT
            # (test_a_credit_creates_adds_and_stops_at_the_limit runs that path).
            assert engine.dialect.name not in store._UPSERT_CREDIT
            return
        upsert = store._upsert_credit(dialect_insert[engine.dialect.name])
        later = NOW + timedelta(seconds=5)

        def credit(conn: Any, units: int, limit: int, now: datetime) -> Any:
            params = {
                "p_user_id": user_id,
                "p_units": units,
                "p_limit": limit,
                "p_now": now,
                "p_due": None,
                "p_grants": 1,
            }
            return conn.execute(upsert, params).first()

        with engine.begin() as conn:
            assert tuple(credit(conn, 5, 10, NOW)) == (5, 1, 1)
            assert tuple(credit(conn, 5, 10, later)) == (10, 2, 2)
            assert credit(conn, 1, 10, later) is None
            row = conn.execute(
                sa.select(store.accounts).where(store.accounts.c.user_id == user_id)
            ).one()
            assert (row.balance_units, row.last_seq) == (10, 2)
            assert (row.created_at, row.updated_at) == (NOW, later)
            conn.rollback()


def test_a_refunded_amount_is_recorded_on_its_entry_only_and_never_past_it(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, 3 * U)
        other = ledger.charge(user_id, 3 * U)
        engine = app.extensions["sqlalchemy"].engine
        with engine.begin() as conn:
            assert entry_rows.add_refunded(conn, charge.id, 3 * U + 1) is False
            assert entry_rows.add_refunded(conn, charge.id, 2 * U) is True
            assert entry_rows.add_refunded(conn, charge.id, U + 1) is False
            assert entry_rows.add_refunded(conn, charge.id, U) is True
        assert ledger.get_entry(charge.id).refunded_units == 3 * U
        assert ledger.get_entry(other.id).refunded_units == 0


def test_a_duplicate_reference_names_the_entry_of_that_user_and_type(app, user_id):
    other_user = user_id + "_other"
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(other_user, 10 * U, reference="order-1")
        ledger.charge(other_user, U, reference="order-1")
        ledger.top_up(user_id, 10 * U, reference="order-0")
        ledger.charge(user_id, U, reference="order-0")
        ledger.hold(user_id, U, reference="order-0")
        top_up = ledger.top_up(user_id, 10 * U, reference="order-1")
        charge = ledger.charge(user_id, U, reference="order-1")
        hold_elsewhere = ledger.hold(other_user, U, reference="order-1")
        hold = ledger.hold(user_id, U, reference="order-1")
        for call, expected in [
            (lambda: ledger.top_up(user_id, U, reference="order-1"), top_up.id),
            (lambda: ledger.charge(user_id, U, reference="order-1"), charge.id),
            (lambda: ledger.hold(user_id, U, reference="order-1"), hold.id),
        ]:
            with pytest.raises(DuplicateReference) as caught:
                call()
            assert caught.value.details[0]["transaction_id"] == expected
        assert hold_elsewhere.id != hold.id


# --- posting: refunds, references and signals -----------------------------------------


def test_a_refund_says_what_cannot_be_refunded(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        top_up = ledger.top_up(user_id, 10 * U)
        assert_only_debits_refundable(ledger, top_up.id)
        charge = ledger.charge(user_id, 3 * U)
        ledger.refund(charge.id, U)
        # A refund names no account; its outcome, refusals included, is still
        # recorded under the account of the charge.
        before = _key_records(app, user_id)
        with pytest.raises(RefundExceedsCharge) as exceeded:
            ledger.refund(charge.id, 2 * U + 1, idempotency_key=f"{user_id}-too-much")
        assert exceeded.value.message == "At most 2.0000000 USDC of this charge can be refunded"
        ledger.refund(charge.id, U, idempotency_key=f"{user_id}-refund-one")
        assert _key_records(app, user_id) == before + 2


def test_a_duplicate_reference_error_names_the_field_and_the_entry(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, U, reference="pay-9")
        with pytest.raises(DuplicateReference) as caught:
            ledger.top_up(user_id, U, reference="pay-9")
        assert caught.value.details == [
            {
                "field": "reference",
                "message": "This reference was already used",
                "code": "duplicate_reference",
                "transaction_id": first.id,
            }
        ]


SIGNALS = [
    "credits_topped_up",
    "credits_charged",
    "credits_refunded",
    "credits_adjusted",
    "hold_created",
    "hold_captured",
    "hold_released",
    "balance_low",
    "balance_depleted",
]


def test_each_change_sends_its_signal_with_what_changed(app, user_id):
    app.config["CREDITS_LOW_BALANCE_USDC"] = "5"
    received: list[tuple[str, dict[str, Any]]] = []

    def receiver(name: str) -> Callable[..., None]:
        def receive(sender: Any, **kwargs: Any) -> None:
            assert sender is not None
            received.append((name, kwargs))

        return receive

    receivers = {name: receiver(name) for name in SIGNALS}
    with app.app_context():
        for name in SIGNALS:
            getattr(signals, name).connect(receivers[name])
        try:
            ledger = current_ledger()
            top_up = ledger.top_up(user_id, 10 * U)
            at_low = ledger.charge(user_id, 5 * U)  # 10 -> 5: not below 5
            below = ledger.charge(user_id, U)  # 5 -> 4: below
            fix = ledger.adjust(user_id, -U, "fix")  # 4 -> 3: already below
            hold = ledger.hold(user_id, U)
            captured = ledger.capture(hold.id)  # 3 -> 2
            other = ledger.hold(user_id, U)
            released = ledger.release(other.id)
            emptied = ledger.update_balance(user_id, 0)  # 2 -> 0
            refund = ledger.refund(below.id)
        finally:
            for name in SIGNALS:
                getattr(signals, name).disconnect(receivers[name])
    assert received == [
        ("credits_topped_up", {"entry": top_up}),
        ("credits_charged", {"entry": at_low}),
        ("balance_low", {"user_id": user_id, "balance_units": 4 * U}),
        ("credits_charged", {"entry": below}),
        ("credits_adjusted", {"entry": fix}),
        ("hold_created", {"hold": hold}),
        ("hold_captured", {"hold": captured, "entry": ledger_entry(app, captured)}),
        ("hold_created", {"hold": other}),
        ("hold_released", {"hold": released}),
        ("balance_depleted", {"user_id": user_id, "balance_units": 0}),
        ("credits_adjusted", {"entry": emptied}),
        ("credits_refunded", {"entry": refund}),
    ]


def ledger_entry(app: Any, hold: Hold) -> Any:
    with app.app_context():
        return current_ledger().get_entry(hold.transaction_id)


# --- holds and keys against a stopped clock --------------------------------------------


def test_a_hold_stops_being_pending_the_instant_it_expires(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        expiring = ledger.hold(user_id, U, expires_in_seconds=60)
        captured = ledger.hold(user_id, U)
        released = ledger.hold(user_id, U)
        ledger.capture(captured.id, U)
        ledger.release(released.id)
        clock.advance(59)
        assert [hold.id for hold in ledger.pending_holds(user_id).items] == [expiring.id]
        assert ledger.find_by_user_id(user_id).held_units == U
        clock.advance(1)
        assert ledger.pending_holds(user_id).items == []
        assert ledger.find_by_user_id(user_id).held_units == 0
        # The expired reservation no longer counts against a new one.
        available = ledger.find_by_user_id(user_id).available_units
        assert ledger.hold(user_id, available).amount_units == available
        assert ledger.get_hold(expiring.id).status == "expired"


def test_expiring_holds_marks_only_the_expired_ones(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        expired = ledger.hold(user_id, U, expires_in_seconds=60)
        live = ledger.hold(user_id, U, expires_in_seconds=120)
        released = ledger.hold(user_id, U, expires_in_seconds=60)
        ledger.release(released.id)
        clock.advance(60)
        assert ledger.expire_holds() >= 1
        row = ledger.get_hold(expired.id)
        assert (row.status, row.resolved_at) == ("expired", clock.now)
        assert ledger.get_hold(live.id).status == "pending"
        assert ledger.get_hold(live.id).resolved_at is None
        assert ledger.get_hold(released.id).status == "released"
        captured = ledger.hold(user_id, U, expires_in_seconds=60)
        ledger.capture(captured.id)
        clock.advance(61)
        # Only a pending hold reads as expired once its time is up.
        assert ledger.get_hold(captured.id).status == "captured"
        assert ledger.get_hold(released.id).status == "released"


def test_a_capture_links_its_hold_and_no_other(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 2 * U)
        other = ledger.hold(user_id, U)
        captured = ledger.capture(hold.id, U)
        entry = ledger.get_entry(captured.transaction_id)
        assert (entry.type, entry.amount_units, entry.hold_id) == ("hold_capture", -U, hold.id)
        assert ledger.get_hold(hold.id).transaction_id == entry.id
        assert ledger.get_hold(other.id).transaction_id is None


def test_a_key_is_free_again_the_instant_it_expires(app, clock, user_id):
    app.config["CREDITS_IDEMPOTENCY_TTL_SECONDS"] = 0
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, U, idempotency_key=f"{user_id}-at-once")
        ledger.top_up(user_id, U, idempotency_key=f"{user_id}-left-alone")
        # Same instant: the record of "at-once" expires now, so the key is new.
        second = ledger.top_up(user_id, U, idempotency_key=f"{user_id}-at-once")
        assert second.id != first.id
        assert ledger.find_by_user_id(user_id).balance_units == 3 * U
        # Claiming "at-once" again freed that key only.
        assert _key_records(app, user_id) == 2
        assert ledger.prune_idempotency_keys() >= 2
        assert _key_records(app, user_id) == 0


# --- reconcile: each kind of inconsistency, by name -----------------------------------


def _tamper(app: Any, statement: Any) -> None:
    with app.app_context(), app.extensions["sqlalchemy"].engine.begin() as conn:
        conn.execute(statement)


def _problems(app: Any, user_id: str, *, whole_database: bool = False) -> list[str]:
    with app.app_context():
        ledger = current_ledger()
        report = ledger.reconcile(None if whole_database else user_id)
    return [m.problem for m in report.mismatches if m.user_id == user_id]


def test_reconcile_counts_what_it_checked(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.charge(user_id, 3 * U)
        ledger.charge(user_id, 2 * U)
        report = ledger.reconcile(user_id)
        assert (report.accounts, report.entries, report.ok) == (1, 3, True)
        twin = user_id + "_twin"
        ledger.top_up(twin, 10 * U)
        ledger.charge(twin, 3 * U)
        ledger.charge(twin, 2 * U)
        whole = ledger.reconcile()
        # Every account once, even two whose balance and seq are alike.
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            count = sa.select(sa.func.count())
            accounts = conn.execute(count.select_from(store.accounts)).scalar_one()
            entries = conn.execute(count.select_from(store.entries)).scalar_one()
        assert (whole.accounts, whole.entries) == (accounts, entries)
        assert not [m for m in whole.mismatches if m.user_id == user_id]
        assert ledger.reconcile(user_id + "_nobody").accounts == 0
        # An account with no entry yet: a zero balance, explained by nothing.
        empty = user_id + "_empty"
        ledger.get_or_create_by_user_id(empty)
        report = ledger.reconcile(empty)
        assert (report.accounts, report.entries, report.mismatches) == (1, 0, [])


def test_reconcile_names_a_balance_the_ledger_does_not_explain(app, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
    accounts = store.accounts
    _tamper(
        app,
        sa.update(accounts)
        .where(accounts.c.user_id == user_id)
        .values(balance_units=10 * U + 1, last_seq=2),
    )
    expected = [
        "balance 10.0000001 != ledger sum 10.0000000",
        "1 entry but last_seq is 2",
        "balance 10.0000001 != its grants' remaining + held 10.0000000",
    ]
    assert _problems(app, user_id) == expected
    assert _problems(app, user_id, whole_database=True) == expected
    with app.app_context():
        current_ledger().top_up(user_id, U)  # the account's own update: seq 3
    assert _problems(app, user_id)[1] == "2 entries but last_seq is 3"


def test_reconcile_names_a_gap_in_seq_and_each_wrong_balance_after(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        second = ledger.charge(user_id, 3 * U)
        ledger.charge(user_id, 2 * U)
    entries = store.entries
    _tamper(app, sa.update(entries).where(entries.c.id == second.id).values(seq=7))
    # Read in seq order the chain is 1, 3, 7: each jump is named once, and the
    # running balance goes on from what each row says.
    assert _problems(app, user_id) == [
        "seq 3 where 2 was expected",
        "seq 3: balance_after 5.0000000 != 8.0000000",
        "seq 7 where 4 was expected",
        "seq 7: balance_after 7.0000000 != 2.0000000",
    ]


def test_reconcile_resumes_from_a_wrong_balance_after(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, 10 * U)
        ledger.charge(user_id, 3 * U)
        ledger.charge(user_id, 2 * U)
    entries = store.entries
    _tamper(
        app, sa.update(entries).where(entries.c.id == first.id).values(balance_after_units=11 * U)
    )
    assert _problems(app, user_id) == [
        "seq 1: balance_after 11.0000000 != 10.0000000",
        "seq 2: balance_after 7.0000000 != 8.0000000",
    ]


def test_reconcile_names_entries_without_an_account(app, user_id):
    orphan = user_id + "_orphan"
    with app.app_context():
        entry = current_ledger().top_up(user_id, 10 * U)
    _tamper(
        app,
        sa.insert(store.entries).values(
            {**entry.row_values(), "id": "ctx_" + "f" * 24, "user_id": orphan}
        ),
    )
    assert _problems(app, orphan) == ["entries without an account"]
    assert _problems(app, orphan, whole_database=True) == ["entries without an account"]
    assert _problems(app, user_id) == []


# --- the Python API: keys, actors and the host's session reach every call ---------------


def test_release_and_update_balance_keep_their_key_and_actor(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, U)
        released = ledger.release(hold.id, actor_id="ops_1", idempotency_key=f"{user_id}-let-go")
        assert (
            ledger.release(hold.id, actor_id="ops_1", idempotency_key=f"{user_id}-let-go")
            == released
        )
        # The same key from another actor is another request: the hold is resolved.
        with pytest.raises(HoldNotPending):
            ledger.release(hold.id, actor_id="ops_2", idempotency_key=f"{user_id}-let-go")
        second = ledger.hold(user_id, U)
        captured = ledger.capture(second.id, actor_id="ops_3")
        assert ledger.get_entry(captured.transaction_id).actor_id == "ops_3"
        entry = ledger.update_balance(
            user_id, 5 * U, actor_id="ops_4", idempotency_key=f"{user_id}-set-5"
        )
        assert (entry.amount_units, entry.description, entry.actor_id) == (
            -4 * U,
            "balance set",
            "ops_4",
        )
        assert ledger.update_balance(user_id, 5 * U, idempotency_key=f"{user_id}-set-5") is None
        assert (
            ledger.update_balance(
                user_id, 5 * U, actor_id="ops_4", idempotency_key=f"{user_id}-set-5"
            )
            == entry
        )
        assert ledger.find_by_user_id(user_id).balance_units == 5 * U
        assert ledger.update_balance(user_id, 6 * U, "promotion").description == "promotion"


def test_a_set_balance_is_checked_like_any_operation():
    expected = {
        "field": "balance_usdc",
        "message": "A balance is a non-negative int of units",
        "code": "range",
    }
    for bad in (-1, True, 1.5, "5"):
        assert (
            refusal(lambda bad=bad: SetBalance(limits=LIMITS, user_id="u", balance_units=bad))
            == expected
        )
    assert refusal(lambda: SetBalance(limits=LIMITS, user_id="", balance_units=0))["field"] == (
        "user_id"
    )
    assert SetBalance(limits=LIMITS, user_id="u", balance_units=0).reason == "balance set"


def test_every_call_joins_the_hosts_session_and_reads_run_beside_it(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        charge = ledger.charge(user_id, 2 * U)
        session = app.extensions["sqlalchemy"].session
        try:
            hold = ledger.hold(user_id, U, session=session)
            other = ledger.hold(user_id, U, session=session)
            assert ledger.get_hold(hold.id, session=session).status == "pending"
            pending = ledger.pending_holds(user_id, session=session).items
            assert {h.id for h in pending} == {hold.id, other.id}
            # Outside the host's open transaction nothing of it shows, and a
            # read does not wait for it (on SQLite it takes no write lock).
            assert ledger.get_hold(hold.id) is None
            assert ledger.pending_holds(user_id).items == []
            assert ledger.get_entry(charge.id).amount_units == -2 * U
            assert len(ledger.history(user_id).items) == 2
            captured = ledger.capture(hold.id, U, session=session)
            assert ledger.get_entry(captured.transaction_id, session=session).hold_id == hold.id
            assert ledger.get_entry(captured.transaction_id) is None
            ledger.release(other.id, session=session)
            ledger.adjust(user_id, U, "fix", session=session)
            ledger.refund(charge.id, U, session=session)
            ledger.update_balance(user_id, 20 * U, session=session)
            newcomer = ledger.get_or_create_by_user_id(user_id + "_new", session=session)
            assert (newcomer.balance_units, newcomer.held_units) == (0, 0)
            assert ledger.find_by_user_id(user_id, session=session).balance_units == 20 * U
            assert ledger.find_by_user_id(user_id).balance_units == 8 * U
            assert len(ledger.history(user_id, session=session).items) == 6
        finally:
            session.rollback()
        assert ledger.find_by_user_id(user_id).balance_units == 8 * U
        assert len(ledger.history(user_id).items) == 2
        assert ledger.get_entry(charge.id).refunded_units == 0
        assert ledger.find_by_user_id(user_id + "_new") is None


@pytest.mark.parametrize("seq", [1, 2, 99, 100, 2**31, MAX_SEQ])
def test_every_seq_cursor_reads_back(seq):
    assert decode_seq_cursor(seq_cursor(seq)) == seq


@pytest.mark.parametrize(
    "cursor",
    [
        encode_cursor("s", "0"),
        encode_cursor("s", str(MAX_SEQ + 1)),
        encode_cursor("s", "0" * 19 + "1"),  # 20 digits, even with the value 1
        encode_cursor("s", "abc"),
        encode_cursor("s", "-5"),
        encode_cursor("h", "5"),  # another list's cursor of the same shape
        encode_cursor("s", "5", "6"),
    ],
    ids=["zero", "past-bigint", "twenty-digits", "letters", "negative", "prefix", "parts"],
)
def test_a_seq_cursor_of_our_alphabet_but_not_ours_is_refused(cursor):
    with pytest.raises(ValidationError):
        decode_seq_cursor(cursor)


def test_capture_and_release_record_what_they_did(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 2 * U, metadata={"order": "o-1"})
        assert (hold.captured_units, hold.metadata) == (0, {"order": "o-1"})
        assert ledger.get_hold(hold.id) == hold
        clock.advance(5)
        captured = ledger.capture(hold.id, 1)  # one unit: the smallest capture
        assert (captured.status, captured.captured_units) == ("captured", 1)
        assert captured.resolved_at == clock.now
        assert ledger.get_hold(hold.id) == captured
        entry = ledger.get_entry(captured.transaction_id)
        assert (entry.amount_units, entry.metadata) == (-1, {"order": "o-1"})
        assert ledger.find_by_user_id(user_id).balance_units == 10 * U - 1
        released = ledger.release(ledger.hold(user_id, U).id)
        assert (released.status, released.captured_units) == ("released", 0)
        assert released.transaction_id is None
        assert ledger.get_hold(released.id) == released
        with pytest.raises(HoldNotPending) as again:
            ledger.capture(hold.id)
        assert again.value.message == "The hold is already captured"
        with pytest.raises(HoldNotPending) as again:
            ledger.release(released.id)
        assert again.value.message == "The hold is already released"
        with pytest.raises(HoldAmountExceeded) as over:
            ledger.capture(ledger.hold(user_id, U).id, U + 1)
        assert over.value.message == "The hold reserves 1.0000000 USDC; capture at most that"
        late = ledger.hold(user_id, U, expires_in_seconds=60)
        clock.advance(60)
        with pytest.raises(HoldNotPending) as expired:
            ledger.capture(late.id)
        assert expired.value.message == "The hold has expired"
        with pytest.raises(NotFound) as missing:
            ledger.release("hold_" + "0" * 24)
        assert missing.value.message == "No such hold"
        # Capture and release name no account; their outcomes are the hold's account's.
        before = _key_records(app, user_id)
        ledger.release(ledger.hold(user_id, U).id)
        with pytest.raises(HoldNotPending):
            ledger.capture(late.id)
        assert _key_records(app, user_id) == before + 3


def test_an_adjustment_credits_a_new_account_and_keeps_its_reason(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        welcome = ledger.adjust(user_id, 1, "welcome")
        assert (welcome.amount_units, welcome.balance_after_units) == (1, 1)
        assert (welcome.type, welcome.description, welcome.seq) == ("adjustment", "welcome", 1)
        assert ledger.find_by_user_id(user_id).balance_units == 1


def test_history_defaults_to_pages_of_twenty_and_reads_check_the_user(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        for _ in range(21):
            ledger.top_up(user_id, U)
        page = ledger.history(user_id)
        assert [entry.seq for entry in page.items] == list(range(21, 1, -1))
        assert [entry.seq for entry in ledger.history(user_id, cursor=page.next_cursor).items] == [
            1
        ]
        bad_user = {
            "field": "user_id",
            "message": "Use a string of 1-128 printable characters",
            "code": "identity",
        }
        assert refusal(lambda: ledger.history("")) == bad_user
        assert refusal(lambda: ledger.pending_holds(" ")) == bad_user
        assert refusal(lambda: ledger.find_by_user_id("a\x00")) == bad_user


def test_a_key_must_be_printable_ascii_of_1_to_255():
    assert valid_key("k")
    assert valid_key(" ~")
    assert valid_key("k" * 255)
    for bad in ("", "k" * 256, "k\x7f", "k\n", "ключ"):
        assert not valid_key(bad)


def test_a_python_api_key_is_found_again_by_the_next_version():
    """The record's primary key derives from (actor, CALL, ledger.<name>, key):
    a stored key must keep matching after an upgrade."""
    op = TopUp(limits=LIMITS, user_id="u", amount_units=1, actor_id="ops")
    scope = IdempotencyScope.for_call(op, "k-1")
    expected = hashlib.sha256(b"ops\x00CALL\x00ledger.top_up\x00k-1").hexdigest()
    assert scope.key_hash == expected
    anonymous = IdempotencyScope.for_call(TopUp(limits=LIMITS, user_id="u", amount_units=1), "k")
    assert (anonymous.actor_id, anonymous.method, anonymous.path) == ("", "CALL", "ledger.top_up")
    fresh = IdempotencyScope.for_call(op, None)
    assert re.fullmatch(r"auto:[0-9a-f]{32}", fresh.key)
    assert IdempotencyScope.for_call(op, None).key != fresh.key


def test_the_python_api_stores_results_as_0_and_errors_as_1(app, user_id):
    codec = CallCodec()
    op = Charge(limits=LIMITS, user_id=user_id, amount_units=1)
    error = InsufficientCredits()
    assert codec.encode(op, error)[0] == 1
    assert codec.encode(op, None) == (0, b"null")
    with app.app_context():
        entry = current_ledger().top_up(user_id, U)
    status, body = codec.encode(op, entry)
    assert status == 0
    assert codec.decode(op, status, body) == entry
    decoded = codec.decode(op, *codec.encode(op, error))
    assert (type(decoded), decoded.message) == (InsufficientCredits, error.message)


def test_only_a_replay_says_it_is_one(app, client, user_id):
    headers = {
        "Authorization": f"Bearer {make_token('gateway', scopes=SERVICE_SCOPE)}",
        "Idempotency-Key": f"{user_id}-short",
    }
    body = {"user_id": user_id, "amount_usdc": "1"}
    first = client.post("/api/billing/credits/charge", json=body, headers=headers)
    assert first.status_code == 402
    assert "Idempotent-Replayed" not in first.headers
    again = client.post("/api/billing/credits/charge", json=body, headers=headers)
    assert again.status_code == 402
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()


def test_reads_check_their_limit(app, user_id):
    bad_limit = {"field": "limit", "message": "limit must be a positive int", "code": "range"}
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, U)
        ledger.top_up(user_id, U)
        for bad in (0, -1, True, "5", 1.0):
            assert refusal(lambda bad=bad: ledger.history(user_id, limit=bad)) == bad_limit
            assert refusal(lambda bad=bad: ledger.pending_holds(user_id, limit=bad)) == bad_limit
        assert len(ledger.history(user_id, limit=1).items) == 1
        key_type = {"field": "idempotency_key", "message": "Use a string", "code": "type"}
        assert refusal(lambda: ledger.top_up(user_id, U, idempotency_key=5)) == key_type


def test_history_since_is_inclusive_and_until_exclusive(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, U)
        clock.advance(10)
        middle = clock.now
        ledger.top_up(user_id, U)
        clock.advance(10)
        ledger.top_up(user_id, U)
        assert [e.seq for e in ledger.history(user_id, since=middle).items] == [3, 2]
        assert [e.seq for e in ledger.history(user_id, until=middle).items] == [1]
        window = ledger.history(user_id, since=middle, until=clock.now)
        assert [e.seq for e in window.items] == [2]


def test_actors_and_keys_reach_top_ups_charges_and_holds(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        assert ledger.top_up(user_id, 10 * U, actor_id="ops_1").actor_id == "ops_1"
        assert ledger.charge(user_id, U, actor_id="svc_1").actor_id == "svc_1"
        key = f"{user_id}-hold"
        first = ledger.hold(user_id, U, actor_id="svc_1", idempotency_key=key)
        # Keys are scoped per actor: another actor's same key is a new hold.
        second = ledger.hold(user_id, U, actor_id="svc_2", idempotency_key=key)
        assert first.id != second.id
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            actor = conn.execute(
                sa.select(store.holds.c.actor_id).where(store.holds.c.id == first.id)
            ).scalar_one()
        assert actor == "svc_1"
        with pytest.raises(InsufficientCredits):
            ledger.hold(user_id + "_none", 1)
