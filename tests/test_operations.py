"""Operations validate themselves: every door refuses the same bad input.

The Python API and the HTTP API are driven with the same table of bad
amounts, lifetimes, metadata, identities and texts; both answer
``VALIDATION_ERROR`` and neither writes anything (checked with plain SQL,
not through the library). Also: integrity errors are told apart by
constraint, and ``update_balance`` reads under the account's lock.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, SERVICE_SCOPE, assert_error, make_token
from conftest import MAX_AMOUNT_UNITS as MAX_UNITS
from invariants import ledger_problems

from callora_credits import current_ledger
from callora_credits.core.idempotency import CallCodec, IdempotencyScope
from callora_credits.core.operations import CreateHold
from callora_credits.db import entry_rows, hold_rows, store
from callora_credits.db.constraints import violates
from callora_credits.db.models import Account, HoldRow, IdempotencyRecord, LedgerEntry
from callora_credits.errors import DuplicateReference, ValidationError

U = 10_000_000


def _rows(app: Any, user_id: str) -> tuple[Any, int, int, int]:
    """Balance, entries, holds and idempotency records of ``user_id``, read raw."""
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            balance = conn.execute(
                sa.select(Account.balance_units).where(Account.user_id == user_id)
            ).scalar()
            count = sa.func.count()
            entries = conn.execute(
                sa.select(count).where(LedgerEntry.user_id == user_id)
            ).scalar_one()
            holds = conn.execute(sa.select(count).where(HoldRow.user_id == user_id)).scalar_one()
            keys = conn.execute(
                sa.select(count).where(IdempotencyRecord.user_id == user_id)
            ).scalar_one()
    return balance, entries, holds, keys


def _funded(app: Any) -> tuple[str, str]:
    """A user with 10 USDC and a pending hold of 1: (user_id, hold_id)."""
    user_id = f"user_{uuid.uuid4().hex[:12]}"
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        hold = ledger.hold(user_id, 1 * U)
    return user_id, hold.id


# (operation, field, python value, JSON value); None for JSON means the case
# is one only the Python API can express (a JSON body has no int amounts).
AMOUNTS = [
    ("zero", 0, "0"),
    ("negative", -5 * U, "-5"),
    ("over the maximum", MAX_UNITS + 1, "1000000000.0000001"),
    ("a float", 1.5, None),
    ("a bool", True, None),
    ("a string", "1.0000000", None),
]
BAD_METADATA = [
    ("too many keys", {f"k{i}": "v" for i in range(51)}),
    ("a long key", {"k" * 41: "v"}),
    ("an empty key", {"": "v"}),
    ("a control character in a key", {"a\nb": "v"}),
    ("a lone surrogate key", {"\ud800": "v"}),
    ("a long value", {"k": "v" * 501}),
    ("a control character in a value", {"k": "a\x07b"}),
    ("a non-string value", {"k": 1}),
]
BAD_USERS = [
    ("empty", ""),
    ("too long", "u" * 129),
    ("blank", "   "),
    ("a control character", "al\x07ice"),
    ("a NUL", "al\x00ice"),
    ("a lone surrogate", "al\udc00ice"),
]


def _python(app: Any, name: str, account: str, hold_id: str, **fields: Any) -> None:
    with app.app_context():
        ledger = current_ledger()
        calls = {
            "top_up": lambda: ledger.top_up(
                fields.get("user_id", account), fields.get("amount", U), **fields.get("kw", {})
            ),
            "charge": lambda: ledger.charge(
                fields.get("user_id", account), fields.get("amount", U), **fields.get("kw", {})
            ),
            "adjust": lambda: ledger.adjust(
                fields.get("user_id", account), fields.get("amount", U), "fix"
            ),
            "hold": lambda: ledger.hold(
                fields.get("user_id", account), fields.get("amount", U), **fields.get("kw", {})
            ),
            "capture": lambda: ledger.capture(hold_id, fields.get("amount", U)),
        }
        calls[name]()


def _http(client: Any, name: str, user_id: str, hold_id: str, body: dict[str, Any]) -> Any:
    paths = {
        "top_up": ("/api/billing/credits/topup", ADMIN_SCOPE),
        "charge": ("/api/billing/credits/charge", SERVICE_SCOPE),
        "adjust": ("/api/billing/credits/adjustments", ADMIN_SCOPE),
        "hold": ("/api/billing/credits/holds", SERVICE_SCOPE),
        "capture": (f"/api/billing/credits/holds/{hold_id}/capture", SERVICE_SCOPE),
    }
    path, scope = paths[name]
    if name != "capture":
        body = {"user_id": user_id, **body}
    if name == "adjust":
        body.setdefault("reason", "fix")
    token = make_token(ADMIN, scopes=scope)
    return client.post(
        path,
        json=body,
        headers={"Authorization": f"Bearer {token}", "Idempotency-Key": uuid.uuid4().hex},
    )


MOVING = ["top_up", "charge", "hold", "capture"]


# A negative adjustment is a valid debit, and capturing zero is a release.
AMOUNT_CASES = [
    pytest.param(operation, *amount, id=f"{operation}-{amount[0]}")
    for operation in [*MOVING, "adjust"]
    for amount in AMOUNTS
    if (operation, amount[0]) not in {("adjust", "negative"), ("capture", "zero")}
]


@pytest.mark.parametrize(("operation", "case", "units", "text"), AMOUNT_CASES)
def test_bad_amounts_are_refused_by_both_doors(app, client, operation, case, units, text):
    user_id, hold_id = _funded(app)
    before = _rows(app, user_id)
    with pytest.raises(ValidationError) as raised:
        _python(app, operation, user_id, hold_id, amount=units)
    assert raised.value.code == "VALIDATION_ERROR"
    assert raised.value.details[0]["field"] == "amount_usdc"
    if text is not None:
        response = _http(client, operation, user_id, hold_id, {"amount_usdc": text})
        assert_error(response, 400, "VALIDATION_ERROR")
    assert _rows(app, user_id) == before


@pytest.mark.parametrize("operation", ["top_up", "charge", "hold"])
@pytest.mark.parametrize(("case", "metadata"), BAD_METADATA, ids=[m[0] for m in BAD_METADATA])
def test_bad_metadata_is_refused_by_both_doors(app, client, operation, case, metadata):
    user_id, hold_id = _funded(app)
    before = _rows(app, user_id)
    with pytest.raises(ValidationError):
        _python(app, operation, user_id, hold_id, kw={"metadata": metadata})
    if "surrogate" not in case:  # the JSON case is in test_lone_surrogates_over_http
        response = _http(
            client, operation, user_id, hold_id, {"amount_usdc": "1", "metadata": metadata}
        )
        assert_error(response, 400, "VALIDATION_ERROR")
    assert _rows(app, user_id) == before


@pytest.mark.parametrize("operation", ["top_up", "charge", "hold", "adjust"])
@pytest.mark.parametrize(("case", "bad_user"), BAD_USERS, ids=[u[0] for u in BAD_USERS])
def test_bad_user_ids_are_refused_by_both_doors(app, client, operation, case, bad_user):
    _, hold_id = _funded(app)
    with pytest.raises(ValidationError) as raised:
        _python(app, operation, "", hold_id, user_id=bad_user)
    assert raised.value.details[0]["field"] == "user_id"
    if "surrogate" not in case and "\x00" not in bad_user:
        response = _http(client, operation, bad_user, hold_id, {"amount_usdc": "1"})
        assert_error(response, 400, "VALIDATION_ERROR")
    if "surrogate" in case or "NUL" in case:
        return  # not every engine can even be asked about such an id
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            found = conn.execute(
                sa.select(sa.func.count()).where(Account.user_id == bad_user)
            ).scalar_one()
    assert found == 0


@pytest.mark.parametrize("ttl", [0, -1, 86_401, 1.5, True])
def test_bad_hold_lifetimes_are_refused_by_both_doors(app, client, ttl):
    user_id, hold_id = _funded(app)
    before = _rows(app, user_id)
    with pytest.raises(ValidationError) as raised:
        _python(app, "hold", user_id, hold_id, kw={"expires_in_seconds": ttl})
    assert raised.value.details[0]["field"] == "expires_in_seconds"
    response = _http(
        client, "hold", user_id, hold_id, {"amount_usdc": "1", "expires_in_seconds": ttl}
    )
    assert_error(response, 400, "VALIDATION_ERROR")
    assert _rows(app, user_id) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("reference", ""),
        ("reference", "r" * 256),
        ("reference", "a\nb"),
        ("description", "d" * 501),
        ("description", "nul\x00"),
    ],
)
def test_bad_references_and_descriptions_are_refused_by_both_doors(app, client, field, value):
    user_id, hold_id = _funded(app)
    before = _rows(app, user_id)
    for operation in ("top_up", "charge"):
        with pytest.raises(ValidationError):
            _python(app, operation, user_id, hold_id, kw={field: value})
        response = _http(client, operation, user_id, hold_id, {"amount_usdc": "1", field: value})
        assert_error(response, 400, "VALIDATION_ERROR")
    assert _rows(app, user_id) == before


def test_a_negative_charge_never_credits(app, user_id):
    """The 0.1.0 bug: charge(u, -x) credited x, recorded as a charge."""
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 1 * U)
        with pytest.raises(ValidationError):
            ledger.charge(user_id, -50_000_000)
        with pytest.raises(ValidationError):
            ledger.top_up(user_id, -50_000_000)
    assert _rows(app, user_id)[:2] == (1 * U, 1)


def test_lone_surrogates_over_http_are_400_whether_escaped_or_raw(app, client, user_id):
    token = make_token(ADMIN, scopes=ADMIN_SCOPE)
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
    }
    escaped = json.dumps({"user_id": user_id, "amount_usdc": "1", "metadata": {"\ud800": "v"}})
    raw = escaped.replace("\\ud800", "\udc80").encode("utf-8", "surrogateescape")
    raw_surrogate = escaped.encode().replace(b"\\ud800", b"\xed\xa0\x80")
    for body in (escaped.encode(), raw, raw_surrogate):
        response = client.post(
            "/api/billing/credits/topup",
            data=body,
            headers={**headers, "Idempotency-Key": uuid.uuid4().hex},
        )
        assert_error(response, 400, "VALIDATION_ERROR")
    assert _rows(app, user_id) == (None, 0, 0, 0)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-16-le"])
def test_bodies_that_are_not_utf8_are_refused(app, client, user_id, encoding):
    token = make_token(ADMIN, scopes=ADMIN_SCOPE)
    body = json.dumps({"user_id": user_id, "amount_usdc": "1"}).encode(encoding)
    response = client.post(
        "/api/billing/credits/topup",
        data=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Idempotency-Key": uuid.uuid4().hex,
        },
    )
    assert_error(response, 400, "VALIDATION_ERROR")
    assert _rows(app, user_id) == (None, 0, 0, 0)


# --- integrity errors are told apart by constraint ---------------------------------


def test_a_check_violation_is_never_a_duplicate_reference(app, user_id):
    """A hold that skips its own validation reaches the CHECK constraint: the
    database refuses it (MariaDB as an OperationalError), and the refusal is
    not reported (or stored) as a duplicate reference."""
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        op = CreateHold(limits=ledger.config, user_id=user_id, amount_units=U, reference="r1")
        object.__setattr__(op, "amount_units", -5)  # as if validation were skipped
        scope = IdempotencyScope.for_call(op, "check-violation")
        with pytest.raises(sa.exc.DBAPIError) as raised:
            ledger.execute(op, scope, CallCodec())
        assert not isinstance(raised.value, DuplicateReference)
    assert _rows(app, user_id) == (10 * U, 1, 0, 1)  # only the top-up and its key


def test_violates_names_only_its_own_constraint(app, user_id):
    """NOT NULL and CHECK violations on the reference-bearing tables are not
    mistaken for the reference's unique constraint; a real duplicate is."""
    with app.app_context():
        ledger = current_ledger()
        entry = ledger.top_up(user_id, U, reference="pay-1")
        engine = app.extensions["sqlalchemy"].engine
        row = {**entry.row_values(), "id": "ctx_" + uuid.uuid4().hex[:24], "seq": 99}
        cases = {
            "duplicate": (row, True),
            "not null": ({**row, "reference": "pay-2", "metadata_json": None}, False),
            "check": ({**row, "reference": "pay-3", "balance_after_units": -1}, False),
            "seq unique": ({**row, "reference": "pay-4", "seq": 1}, False),
        }
        for name, (values, expected) in cases.items():
            with pytest.raises(sa.exc.DBAPIError) as raised, engine.begin() as conn:
                conn.execute(sa.insert(store.entries).values(values))
            assert violates(raised.value, entry_rows.ENTRY_REFERENCE) is expected, name
            assert violates(raised.value, hold_rows.HOLD_REFERENCE) is False, name


def test_a_duplicate_hold_reference_is_409_with_the_existing_hold(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        first = ledger.hold(user_id, U, reference="order-1")
        with pytest.raises(DuplicateReference) as raised:
            ledger.hold(user_id, U, reference="order-1")
        assert raised.value.details[0]["transaction_id"] == first.id


# --- update_balance under the account's lock ------------------------------------------


def test_concurrent_update_balance_leaves_one_of_the_targets(app, user_id):
    targets = [15 * U, 35 * U, 5 * U, 50 * U, 20 * U, 0, 42 * U, 7 * U]
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
    barrier = threading.Barrier(len(targets))
    errors: list[BaseException] = []

    def set_to(target: int) -> None:
        try:
            with app.app_context():
                ledger = current_ledger()
                barrier.wait()
                ledger.update_balance(user_id, target, "reset")
        except BaseException as exc:  # reported below
            errors.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=set_to, args=(t,)) for t in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        barrier.reset()
        assert errors == []
        balance = _rows(app, user_id)[0]
        assert balance in targets
        with app.app_context():
            engine = app.extensions["sqlalchemy"].engine
            with engine.connect() as conn:
                total = conn.execute(
                    sa.select(sa.func.sum(LedgerEntry.amount_units)).where(
                        LedgerEntry.user_id == user_id
                    )
                ).scalar_one()
            assert int(total) == balance
            assert current_ledger().reconcile(user_id).ok
            assert ledger_problems(engine, user_id) == []


def test_update_balance_to_the_same_value_writes_nothing(app, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 3 * U)
        assert ledger.update_balance(user_id, 3 * U) is None
        entry = ledger.update_balance(user_id, 1 * U, "correction")
        assert entry is not None
        assert (entry.type, entry.amount_units, entry.balance_after_units) == (
            "adjustment",
            -2 * U,
            1 * U,
        )
        with pytest.raises(ValidationError):
            ledger.update_balance(user_id, -1)
    assert _rows(app, user_id)[:2] == (1 * U, 2)
