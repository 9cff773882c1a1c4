"""Rules of the Python API that mutation testing found unpinned.

Each test here guards a rule of the operations, the records, the grants API
or the idempotency keys that a mutant broke while the rest of the suite still
passed: grants given, listed, read and voided inside a host's transaction,
the signals settling sends, how a pending hold reads past its expiry. The
ones that touch the database run on every engine.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import CLOCK_START as START
from conftest import Clock, refusal

from callora_credits import current_ledger
from callora_credits.core import signals
from callora_credits.core.grants import DueHold, GrantState, consumption_order, draw, due_events
from callora_credits.core.money import UNITS_PER_USDC
from callora_credits.core.records import Hold

U = UNITS_PER_USDC


# --- a hold read past its expiry --------------------------------------------------------


def _pending(expires_at: datetime) -> Hold:
    return Hold(
        id="hold_" + "1" * 24,
        user_id="u",
        status="pending",
        amount_units=U,
        captured_units=0,
        expires_at=expires_at,
        created_at=START,
        resolved_at=None,
        transaction_id=None,
        reference=None,
        metadata={},
    )


def test_a_pending_hold_read_at_or_past_its_expiry_is_expired_at_its_expiry():
    expiry = START + timedelta(minutes=5)
    hold = _pending(expiry)
    assert hold.as_of(expiry - timedelta(microseconds=1)) == hold
    for now in (expiry, expiry + timedelta(hours=1)):
        read = hold.as_of(now)
        assert (read.status, read.resolved_at) == ("expired", expiry)
        assert (read.amount_units, read.captured_units) == (U, 0)
    # A naive instant is UTC.
    assert hold.as_of(expiry.replace(tzinfo=None)).status == "expired"


def test_a_hold_read_through_the_api_past_its_expiry_is_resolved_at_its_expiry(
    app: Any, clock: Clock, user_id: str
) -> None:
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 5 * U)
        hold = ledger.hold(user_id, 2 * U, expires_in_seconds=60)
        assert (hold.status, hold.resolved_at) == ("pending", None)
        clock.advance(61)
        read = ledger.get_hold(hold.id)
        assert (read.status, read.resolved_at) == ("expired", hold.expires_at)
        # Written, the expiry reads the same (and nothing is left due).
        assert ledger.expire_holds() >= 1
        assert ledger.get_hold(hold.id) == read


# --- grants inside the host's transaction -----------------------------------------------


def test_grants_given_read_listed_and_voided_in_a_host_session_go_with_its_rollback(
    app: Any, clock: Clock, user_id: str
) -> None:
    with app.app_context():
        ledger = current_ledger()
        session = app.extensions["sqlalchemy"].session
        given = ledger.grant(user_id, 3 * U, session=session)
        # The host's transaction sees its own grant.
        assert ledger.get_grant(given.id, session=session) == given
        assert [g.id for g in ledger.grants(user_id, session=session).items] == [given.id]
        voided = ledger.void_grant(given.id, reason="gone", session=session)
        assert (voided.status, voided.remaining_units) == ("voided", 0)
        assert ledger.get_grant(given.id, session=session).status == "voided"
        session.rollback()
        assert ledger.get_grant(given.id) is None
        assert ledger.grants(user_id, status="all").items == []
        assert ledger.history(user_id).items == []


def test_a_balance_read_or_created_in_a_host_session_sees_the_hosts_own_work(
    app: Any, clock: Clock, user_id: str
) -> None:
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 5 * U)
        session = app.extensions["sqlalchemy"].session
        ledger.top_up(user_id, 3 * U, session=session)
        # Not committed yet: only the host's transaction sees 8 USDC.
        assert ledger.find_by_user_id(user_id, session=session).balance_units == 8 * U
        assert ledger.get_or_create_by_user_id(user_id, session=session).balance_units == 8 * U
        session.rollback()
        assert ledger.get_or_create_by_user_id(user_id).balance_units == 5 * U


def test_usage_read_in_a_host_session_counts_the_hosts_own_work(
    app: Any, clock: Clock, user_id: str
) -> None:
    with app.app_context():
        ledger = current_ledger()
        session = app.extensions["sqlalchemy"].session
        ledger.top_up(user_id, 70 * U, session=session)
        ledger.charge(user_id, 7 * U, session=session)
        clock.advance(60)
        window = {"since": START - timedelta(days=1), "until": START + timedelta(hours=1)}
        # Not committed yet: the sums and the available balance are the host's.
        seen = ledger.usage(user_id, **window, session=session)
        assert sum(b.debited_units for b in seen.buckets) == 7 * U
        assert ledger.usage(user_id, **window).depletion_estimate is None
        session.commit()
        assert ledger.usage(user_id, **window) == seen
        # 63 USDC left at 1 USDC a day (7 over the last 7 days): 63 days.
        assert seen.depletion_estimate is not None
        assert seen.depletion_estimate.at == clock.now + timedelta(days=63)


# --- settling sends its signals ---------------------------------------------------------


def test_settling_sends_the_expiry_signal_with_the_app_as_sender(
    app: Any, clock: Clock, user_id: str
) -> None:
    heard: list[tuple[Any, dict[str, Any]]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        heard.append((sender, kwargs))

    signals.grant_expired.connect(receiver, sender=app)
    try:
        with app.app_context():
            ledger = current_ledger()
            given = ledger.grant(user_id, 2 * U, expires_at=START + timedelta(minutes=1))
            clock.advance(60)
            assert heard == []
            assert ledger.settle_grants() >= 1
    finally:
        signals.grant_expired.disconnect(receiver, sender=app)
    ours = [kwargs for sender, kwargs in heard if kwargs["grant_id"] == given.id]
    assert len(ours) == 1
    entry = ours[0]["entry"]
    assert (entry.type, entry.amount_units, entry.grant_id) == ("expiration", -2 * U, given.id)


# --- what falls due at one instant ------------------------------------------------------


def test_a_hold_expiry_comes_before_a_grant_starting_at_the_same_instant() -> None:
    at = START.replace(tzinfo=None) + timedelta(minutes=1)
    live = GrantState(
        id="g1",
        user_id="u",
        number=1,
        category="paid",
        amount_units=10,
        remaining_units=6,
        held_units=4,
        priority=50,
        effective_at=at - timedelta(minutes=1),
        expires_at=None,
        status="active",
    )
    scheduled = GrantState(
        id="g2",
        user_id="u",
        number=2,
        category="promotional",
        amount_units=5,
        remaining_units=5,
        held_units=0,
        priority=50,
        effective_at=at,
        expires_at=None,
        status="scheduled",
    )
    hold = DueHold("h1", at - timedelta(minutes=1), at, [("g1", 4)])
    events = due_events([live, scheduled], [hold], at)
    assert [(event.at, event.kind) for event in events] == [
        (at, "hold_expiry"),
        (at, "activation"),
    ]
    assert events[1].movements == [("grant", scheduled, 5)]
    assert (live.remaining_units, live.held_units, scheduled.status) == (10, 0, "active")


def test_a_debit_draws_only_from_active_grants_with_something_left_before_their_expiry() -> None:
    now = START.replace(tzinfo=None)

    def grant(number: int, status: str, remaining: int, expires: datetime | None) -> GrantState:
        return GrantState(
            id=f"g{number}",
            user_id="u",
            number=number,
            category="paid",
            amount_units=10,
            remaining_units=remaining,
            held_units=0,
            priority=50,
            effective_at=now - timedelta(days=1),
            expires_at=expires,
            status=status,
        )

    spendable = grant(1, "active", 4, None)
    others = [
        grant(2, "scheduled", 10, None),
        grant(3, "voided", 10, None),
        grant(4, "expired", 10, None),
        grant(5, "active", 0, None),
        grant(6, "active", 10, now),
    ]
    assert consumption_order([*others, spendable], now) == [spendable]
    assert draw([*others, spendable], 4, now) == [(spendable, 4)]
    assert draw([*others, spendable], 5, now) is None


# --- the edges of what an operation accepts ---------------------------------------------


def test_the_edges_of_references_metadata_and_instants(app: Any, user_id: str) -> None:
    from callora_credits.core.operations import MAX_METADATA_KEYS

    with app.app_context():
        ledger = current_ledger()
        # A one-character reference and an empty metadata value are fine.
        entry = ledger.top_up(user_id, U, reference="r", metadata={"note": ""})
        assert (entry.reference, entry.metadata) == ("r", {"note": ""})
        refused: list[tuple[dict[str, Any], dict[str, str]]] = [
            (
                {"metadata": {f"k{i}": "v" for i in range(MAX_METADATA_KEYS + 1)}},
                {"field": "metadata", "message": f"Use at most {MAX_METADATA_KEYS} keys"},
            ),
            (
                # Aware, but past the last instant UTC can hold.
                {"expires_at": datetime.max.replace(tzinfo=timezone(timedelta(hours=-5)))},
                {"field": "expires_at", "message": "Out of range", "code": "datetime"},
            ),
        ]
        for options, expected in refused:
            detail = refusal(lambda options=options: ledger.top_up(user_id, U, **options))
            assert {k: detail[k] for k in expected} == expected
        assert ledger.find_by_user_id(user_id).balance_units == U


def test_an_amount_that_is_not_an_int_of_units_is_refused_by_name(app: Any, user_id: str) -> None:
    from decimal import Decimal

    expected = {
        "field": "amount_usdc",
        "message": "Amount must be an int of units (1 USDC = 10000000 units)",
        "code": "type",
    }
    with app.app_context():
        ledger = current_ledger()
        for amount in (1.0, True, Decimal(1), "1"):
            for move in (ledger.top_up, ledger.charge):
                refused = refusal(lambda move=move, amount=amount: move(user_id, amount))
                assert refused == expected, amount
        assert ledger.find_by_user_id(user_id) is None


# --- a duplicate that keeps losing the race for its key ---------------------------------


def _hide_the_winner(monkeypatch: Any, times: int) -> list[int]:
    """Make the key's record invisible to the next ``times`` look-ups.

    On SQLite writes take turns, so the race a server can run (the original
    commits between a duplicate's look-up and its insert) is played here by
    hiding the committed record from the look-up; the insert still loses on
    the real primary key.
    """
    from callora_credits.db import key_rows

    real = key_rows.find_idempotency
    hidden: list[int] = []

    def find(conn: Any, key_hash: str) -> Any:
        if len(hidden) < times:
            hidden.append(1)
            return None
        return real(conn, key_hash)

    monkeypatch.setattr(key_rows, "find_idempotency", find)
    return hidden


@pytest.mark.parametrize(
    ("wait", "losses", "answer"),
    [(0, 1, "replay"), (30, 2, "replay"), (0, 2, "in progress")],
    ids=["once-no-wait", "twice-within-the-wait", "twice-past-the-wait"],
)
def test_a_duplicate_losing_the_race_for_its_key(
    host: Any, user_id: str, monkeypatch: Any, wait: int, losses: int, answer: str
) -> None:
    """The first loss always runs again and replays; a further loss runs
    again within ``CREDITS_IDEMPOTENCY_WAIT_SECONDS`` and past it answers
    ``IDEMPOTENCY_IN_PROGRESS``, storing nothing."""
    from callora_credits.errors import IdempotencyInProgress

    app = host(CREDITS_IDEMPOTENCY_WAIT_SECONDS=wait)
    key = f"{user_id}-c"
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 5 * U)
        first = ledger.charge(user_id, U, idempotency_key=key)
        # The first loss is on the record's primary key; each further one
        # needs the record hidden from one look-up.
        hidden = _hide_the_winner(monkeypatch, times=losses - 1)
        if answer == "replay":
            assert ledger.charge(user_id, U, idempotency_key=key) == first
        else:
            with pytest.raises(IdempotencyInProgress):
                ledger.charge(user_id, U, idempotency_key=key)
            # Nothing was stored for the refusal: the next retry replays.
            assert ledger.charge(user_id, U, idempotency_key=key) == first
        assert len(hidden) == losses - 1
        assert ledger.find_by_user_id(user_id).balance_units == 4 * U
        charges = [e.id for e in ledger.history(user_id, limit=50).items if e.type == "charge"]
        assert charges == [first.id]


def test_identities_are_up_to_128_characters_and_text_must_be_storable(
    app: Any, user_id: str
) -> None:
    from callora_credits.core.operations import MAX_IDENTITY_LENGTH

    longest = (user_id + "x" * MAX_IDENTITY_LENGTH)[:MAX_IDENTITY_LENGTH]
    with app.app_context():
        ledger = current_ledger()
        assert ledger.top_up(longest, U).user_id == longest
        assert refusal(lambda: ledger.top_up(longest + "x", U))["field"] == "user_id"
        # A lone surrogate cannot be encoded for any engine; NUL is refused too.
        for text in ("a\ud800b", "a\x00b"):
            detail = refusal(lambda text=text: ledger.top_up(longest, U, description=text))
            assert detail["field"] == "description"
        assert ledger.find_by_user_id(longest).balance_units == U


# --- the Ledger object ------------------------------------------------------------------


def test_a_ledger_counts_its_retries_and_sends_signals_as_itself_unless_told(
    app: Any, user_id: str
) -> None:
    from callora_credits.core.ledger import Ledger
    from callora_credits.db.unit_of_work import RetryStats

    with app.app_context():
        host_ledger = current_ledger()
        plain = Ledger(host_ledger.engine, host_ledger.config)
        shared, owner = RetryStats(), object()
        told = Ledger(host_ledger.engine, host_ledger.config, stats=shared, sender=owner)
        assert told.stats is shared
        senders: list[Any] = []

        def received(sender: Any, **_: Any) -> None:
            senders.append(sender)

        with signals.credits_topped_up.connected_to(received):
            for ledger, name in ((plain, "plain"), (told, "told")):
                key = f"{user_id}-{name}"
                first = ledger.top_up(user_id, U, idempotency_key=key)
                # A duplicate loses on the key once, then replays: one retry.
                assert ledger.top_up(user_id, U, idempotency_key=key) == first
                assert ledger.stats.counts == {"conflict": 1}
        assert senders == [plain, owner]
        assert shared.counts == {"conflict": 1}
        assert host_ledger.find_by_user_id(user_id).balance_units == 2 * U


def test_a_lost_database_is_given_up_on_after_the_configured_seconds(host: Any) -> None:
    """``CREDITS_DB_RETRY_SECONDS`` bounds the retrying even when many more
    retries are allowed (a database that cannot be opened fails at once, so
    only the seconds bound stops it)."""
    import time
    import uuid

    from callora_credits.errors import ServiceUnavailable

    app = host(
        f"sqlite:////nonexistent-{uuid.uuid4().hex}/credits.db",
        CREDITS_DB_RETRIES=10_000,
        CREDITS_DB_RETRY_SECONDS=0.2,
    )
    with app.app_context():
        ledger = current_ledger()
        started = time.monotonic()
        with pytest.raises(ServiceUnavailable):
            ledger.top_up("user_lost", U)
        # The default bound is 5 s; 0.2 s of retrying ends well before it.
        assert time.monotonic() - started < 3
        assert 0 < ledger.stats.counts["connect"] < 10_000


def test_the_json_the_library_writes_is_compact_utf_8() -> None:
    """Stored and sent bodies are compact JSON whose text is UTF-8 as given,
    not ``\\u`` escapes: a description reads back byte for byte."""
    from callora_credits.core.records import dumps

    body = dumps({"description": "café ☕", "amount_usdc": "1.0000000"})
    assert body == '{"description":"café ☕","amount_usdc":"1.0000000"}'.encode()
