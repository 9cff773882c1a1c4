"""The usage summary: buckets summed by the database, the depletion estimate,
and the checks every door makes, on every engine.

Entries are written at chosen instants through the library's clock, and the
expected buckets are summed here, in Python, from the ledger's rows. The host
process runs in a zone far from UTC (and the database sessions too), which
must change nothing: buckets are UTC hours and days.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import ADMIN, ADMIN_SCOPE, assert_error, make_token
from test_statement_budget import counting_events

from callora_credits import current_ledger
from callora_credits.core.usage import MAX_BUCKETS, UsageWindow
from callora_credits.db import store
from callora_credits.db.usage import usage_sums
from callora_credits.errors import ValidationError

BASE = "/api/billing/credits"
U = 10_000_000
UTC = timezone.utc
HOUR, DAY = timedelta(hours=1), timedelta(days=1)
US = timedelta(microseconds=1)


class StoppedClock:
    """The library's clock, set by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def set(self, now: datetime) -> None:
        self.now = now


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture(params=["NPT-5:45", "NST+3:30"], ids=["utc+5:45", "utc-3:30"])
def host_zone(request: pytest.FixtureRequest) -> Iterator[str]:
    """The test process in a zone with a fractional offset from UTC."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TZ", request.param)
    time.tzset()
    try:
        assert time.localtime().tm_gmtoff != 0
        yield str(request.param)
    finally:
        patch.undo()
        time.tzset()


# Database sessions in another zone too: bucket expressions must not depend on it.
SESSION_ZONE = {
    "postgresql": {"connect_args": {"options": "-c timezone=Asia/Kathmandu"}},
    "mysql": {"connect_args": {"init_command": "SET time_zone = '+05:45'"}},
    "sqlite": {},
}


@pytest.fixture
def zoned_app(host, engine_name: str, host_zone: str) -> Any:
    return host(SQLALCHEMY_ENGINE_OPTIONS=SESSION_ZONE[engine_name])


@pytest.fixture
def clock(app: Any) -> StoppedClock:
    stopped = StoppedClock(at("2026-03-01T12:00:00"))
    app.extensions["callora_credits"].clock = stopped
    return stopped


# --- the expected sums, computed here from the ledger's rows -------------------------


def bucket_of(instant: datetime, granularity: str) -> datetime:
    if granularity == "day":
        return datetime(instant.year, instant.month, instant.day, tzinfo=UTC)
    return datetime(instant.year, instant.month, instant.day, instant.hour, tzinfo=UTC)


def expected_buckets(
    rows: list[Any], since: datetime, until: datetime, granularity: str
) -> list[tuple[datetime, int, int, int, int]]:
    size = DAY if granularity == "day" else HOUR
    sums: dict[datetime, list[int]] = {}
    for row in rows:
        created = row.created_at.replace(tzinfo=UTC)
        if not since <= created < until:
            continue
        bucket = sums.setdefault(bucket_of(created, granularity), [0, 0, 0, 0])
        amount = int(row.amount_units)
        if row.type in ("charge", "hold_capture") or (row.type == "adjustment" and amount < 0):
            bucket[0] -= amount
        elif row.type in ("expiration", "void"):
            bucket[2] -= amount
        else:
            bucket[1] += amount
        bucket[3] += 1
    starts = []
    start = bucket_of(since, granularity)
    while start < until:
        starts.append(start)
        start += size
    return [(start, *sums.get(start, [0, 0, 0, 0])) for start in starts]


def ledger_rows(app: Any, user_id: str) -> list[Any]:
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            t = store.entries
            return list(conn.execute(sa.select(t).where(t.c.user_id == user_id)).all())


def as_tuples(summary: Any) -> list[tuple[datetime, int, int, int, int]]:
    return [
        (b.start, b.debited_units, b.credited_units, b.expired_units, b.count)
        for b in summary.buckets
    ]


def bearer(user: str, scopes: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(user, scopes=scopes)}"}


def write_history_across_boundaries(app: Any, clock: StoppedClock, user_id: str) -> None:
    """Entries on both sides of hour and day boundaries, to the microsecond."""
    with app.app_context():
        ledger = current_ledger()
        clock.set(at("2026-03-01T21:50:00"))
        ledger.top_up(user_id, 100 * U)
        clock.set(at("2026-03-01T22:29:59.999999"))
        ledger.charge(user_id, U + 1)
        clock.set(at("2026-03-01T22:30:00"))
        spent = ledger.charge(user_id, 2 * U)
        clock.set(at("2026-03-01T22:59:59.999999"))
        hold = ledger.hold(user_id, 5 * U)
        clock.set(at("2026-03-01T23:00:00"))
        ledger.capture(hold.id, 3 * U)
        ledger.adjust(user_id, -U // 2, "correction")
        clock.set(at("2026-03-01T23:59:59.999999"))
        ledger.adjust(user_id, 4 * U, "goodwill")
        clock.set(at("2026-03-02T00:00:00"))
        ledger.refund(spent.id, U)
        clock.set(at("2026-03-02T00:00:00.000001"))
        ledger.charge(user_id, U // 4)
        clock.set(at("2026-03-02T01:15:00"))
        ledger.top_up(user_id, 10 * U)
        clock.set(at("2026-03-02T01:30:00"))
        ledger.charge(user_id, 7)
        clock.set(at("2026-03-02T02:00:00"))


# --- buckets -----------------------------------------------------------------------------


def session_zone(app: Any) -> str | None:
    """The time zone of the database session, where the engine has one."""
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                return str(conn.exec_driver_sql("SELECT current_setting('TimeZone')").scalar())
            if engine.dialect.name in ("mysql", "mariadb"):
                return str(conn.exec_driver_sql("SELECT @@session.time_zone").scalar())
    return None


def test_buckets_are_the_sums_of_the_rows_in_them(zoned_app, engine_name, user_id):
    app = zoned_app
    zones = {"sqlite": None, "postgresql": "Asia/Kathmandu", "mysql": "+05:45"}
    assert session_zone(app) == zones[engine_name]
    clock = StoppedClock(at("2026-03-01T12:00:00"))
    app.extensions["callora_credits"].clock = clock
    write_history_across_boundaries(app, clock, user_id)
    rows = ledger_rows(app, user_id)
    assert len(rows) == 10

    since, until = at("2026-03-01T22:30:00"), at("2026-03-02T01:30:00")
    with app.app_context():
        ledger = current_ledger()
        hourly = ledger.usage(user_id, since=since, until=until, granularity="hour")
        daily = ledger.usage(
            user_id, since=at("2026-03-01T00:00:00"), until=at("2026-03-03T00:00:00")
        )
        default = ledger.usage(user_id)

    assert hourly.granularity == "hour"
    assert as_tuples(hourly) == expected_buckets(rows, since, until, "hour")
    # Spelled out once, so the Python sums above are checked too.
    assert as_tuples(hourly) == [
        (at("2026-03-01T22:00:00"), 2 * U, 0, 0, 1),
        (at("2026-03-01T23:00:00"), 3 * U + U // 2, 4 * U, 0, 3),
        (at("2026-03-02T00:00:00"), U // 4, U, 0, 2),
        (at("2026-03-02T01:00:00"), 0, 10 * U, 0, 1),
    ]
    assert daily.granularity == "day"
    day_range = (at("2026-03-01T00:00:00"), at("2026-03-03T00:00:00"))
    assert as_tuples(daily) == expected_buckets(rows, *day_range, "day")
    assert [b.count for b in daily.buckets] == [6, 4]
    # Until now (02:00), since 30 days before: 31 days, the last two with entries.
    assert len(default.buckets) == 31
    assert default.buckets[0].start == at("2026-01-31T00:00:00")
    assert as_tuples(default) == expected_buckets(
        rows, at("2026-01-31T02:00:00"), at("2026-03-02T02:00:00"), "day"
    )
    # The balance moved by credited - debited - expired over every entry.
    total = sum(b.credited_units - b.debited_units - b.expired_units for b in default.buckets)
    assert total == sum(int(row.amount_units) for row in rows)


def test_the_http_summary_is_the_python_one(zoned_app, user_id):
    app = zoned_app
    clock = StoppedClock(at("2026-03-01T12:00:00"))
    app.extensions["callora_credits"].clock = clock
    write_history_across_boundaries(app, clock, user_id)
    client = app.test_client()
    # 22:30 UTC written with a +05:45 offset, and 01:30 UTC with -03:30.
    query = "since=2026-03-02T04:15:00%2B05:45&until=2026-03-01T22:00:00-03:30&granularity=hour"

    response = client.get(f"{BASE}/usage?{query}", headers=bearer(user_id))

    assert response.status_code == 200, response.get_json()
    with app.app_context():
        summary = current_ledger().usage(
            user_id, at("2026-03-01T22:30:00"), at("2026-03-02T01:30:00"), "hour"
        )
    assert response.get_json() == summary.as_json()
    body = response.get_json()
    assert [b["start"] for b in body["data"]] == [
        "2026-03-01T22:00:00.000000Z",
        "2026-03-01T23:00:00.000000Z",
        "2026-03-02T00:00:00.000000Z",
        "2026-03-02T01:00:00.000000Z",
    ]
    assert body["data"][1] == {
        "start": "2026-03-01T23:00:00.000000Z",
        "debited_usdc": "3.5000000",
        "credited_usdc": "4.0000000",
        "expired_usdc": "0.0000000",
        "count": 3,
    }
    # Days by default; an admin names the user.
    admin = client.get(f"{BASE}/usage?user_id={user_id}", headers=bearer(ADMIN, ADMIN_SCOPE))
    assert admin.status_code == 200
    mine = client.get(f"{BASE}/usage", headers=bearer(user_id))
    assert admin.get_json() == mine.get_json()
    assert mine.get_json()["granularity"] == "day"
    assert len(mine.get_json()["data"]) == 31
    stranger = client.get(f"{BASE}/usage?user_id={user_id}", headers=bearer("someone_else"))
    assert_error(stranger, 403, "FORBIDDEN")


def test_an_unknown_user_has_empty_buckets_and_no_row_is_created(app, clock, user_id):
    with app.app_context():
        summary = current_ledger().usage(user_id, granularity="hour", since=clock.now - 3 * HOUR)
        assert current_ledger().find_by_user_id(user_id) is None
    assert as_tuples(summary) == [
        (clock.now - 3 * HOUR, 0, 0, 0, 0),
        (clock.now - 2 * HOUR, 0, 0, 0, 0),
        (clock.now - HOUR, 0, 0, 0, 0),
    ]
    assert summary.depletion_estimate is None


def test_the_sums_are_one_statement(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        ledger.top_up(user_id, 10 * U)
        ledger.charge(user_id, U)
        with counting_events(app.extensions["sqlalchemy"].engine) as statements:
            ledger.usage(user_id)
    # The sums, then the balance read.
    assert len(statements) == 2, statements
    assert "GROUP BY" in statements[0].upper()
    assert statements[0].upper().count("FROM CREDITS_TRANSACTIONS") == 2


def _insert_entry(conn: Any, user_id: str, seq: int, type_: str, units: int, when: str) -> None:
    conn.execute(
        store.entries.insert().values(
            id=f"ctx_{uuid.uuid4().hex[:24]}",
            user_id=user_id,
            seq=seq,
            type=type_,
            amount_units=units,
            balance_after_units=0,
            metadata_json="{}",
            refunded_units=0,
            created_at=at(when).replace(tzinfo=None),
        )
    )


def test_expirations_and_voids_are_expired_and_grants_credited(app, engine_name, user_id):
    """Entry types that credit grants write are summed by their names.

    Written in a transaction that is rolled back, with the type check of the
    current schema set aside for it.
    """
    with app.app_context():
        url = app.extensions["sqlalchemy"].engine.url
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                if engine_name == "sqlite":
                    conn.exec_driver_sql("PRAGMA ignore_check_constraints = 1")
                elif engine_name == "mysql":
                    conn.exec_driver_sql("SET SESSION check_constraint_checks = 0")
                else:
                    conn.exec_driver_sql(
                        "ALTER TABLE credits_transactions "
                        "DROP CONSTRAINT IF EXISTS ck_credits_transactions_type_known"
                    )
                _insert_entry(conn, user_id, 1, "grant", 10 * U, "2026-03-01T10:00:00")
                _insert_entry(conn, user_id, 2, "charge", -U, "2026-03-01T11:00:00")
                _insert_entry(conn, user_id, 3, "expiration", -3 * U, "2026-03-01T23:59:59")
                _insert_entry(conn, user_id, 4, "void", -2 * U, "2026-03-02T00:00:00")
                buckets, burned = usage_sums(
                    conn,
                    user_id,
                    at("2026-03-01T00:00:00").replace(tzinfo=None),
                    at("2026-03-03T00:00:00").replace(tzinfo=None),
                    "day",
                    at("2026-03-01T00:00:00").replace(tzinfo=None),
                )
            finally:
                trans.rollback()
                if engine_name == "sqlite":
                    conn.exec_driver_sql("PRAGMA ignore_check_constraints = 0")
                elif engine_name == "mysql":
                    conn.exec_driver_sql("SET SESSION check_constraint_checks = 1")
    finally:
        engine.dispose()
    assert buckets == {
        datetime(2026, 3, 1): (U, 10 * U, 3 * U, 3),
        datetime(2026, 3, 2): (0, 0, 2 * U, 1),
    }
    # Expired credit is not spending: only the charge burns.
    assert burned == U


# --- the window ----------------------------------------------------------------------------


def test_at_most_400_buckets(app, client, clock, user_id):
    until = at("2026-03-01T10:30:00")
    with app.app_context():
        ledger = current_ledger()
        assert len(ledger.usage(user_id, until - 400 * DAY + DAY, until).buckets) == 400
        assert (
            len(
                ledger.usage(
                    user_id, at("2026-02-14T10:00:00"), at("2026-03-03T02:00:00"), "hour"
                ).buckets
            )
            == 400
        )
        for since, until_, granularity in (
            (until - 400 * DAY, until, "day"),  # 10:30 to 10:30 touches 401 days
            (at("2026-02-14T10:00:00"), at("2026-03-03T02:00:00.000001"), "hour"),
            (None, None, "hour"),  # 30 days of hours
        ):
            with pytest.raises(ValidationError) as refused:
                ledger.usage(user_id, since, until_, granularity)
            (detail,) = refused.value.details
            assert (detail["field"], detail["code"]) == ("since", "too_many_buckets")
            assert f"at most {MAX_BUCKETS}" in detail["message"]

    response = client.get(f"{BASE}/usage?granularity=hour", headers=bearer(user_id))
    body = assert_error(response, 400, "VALIDATION_ERROR")
    assert body["details"][0]["field"] == "since"
    assert "720 hours" in body["details"][0]["message"]
    assert "granularity=day" in body["details"][0]["message"]


@pytest.mark.parametrize(
    ("query", "field", "code"),
    [
        ("since=yesterday", "since", None),
        ("until=2026-13-01", "until", None),
        ("since=2026-03-01T25:00:00Z", "since", None),
        ("granularity=week", "granularity", "literal_error"),
        ("granularity=", "granularity", "literal_error"),
        ("granularity=DAY", "granularity", "literal_error"),
        ("since=2026-03-02&until=2026-03-01", "since", "range"),
        ("since=2026-03-01&until=2026-03-01", "since", "range"),
        ("since=2026-03-01T12:00:01Z", "since", "range"),  # later than now
        ("since=0001-01-01T00:00:00%2B14:00", "since", "range"),
        ("until=0001-01-05T00:00:00Z", "since", "range"),
        ("until=9999-12-31T23:00:00-10:00", "until", "range"),
        ("user_id=", "user_id", None),
        ("bogus=1", "bogus", "extra_forbidden"),
        ("granularity=day&granularity=hour", "granularity", "repeated"),
    ],
)
def test_bad_windows_are_400s_that_name_the_field(client, clock, user_id, query, field, code):
    response = client.get(f"{BASE}/usage?{query}", headers=bearer(user_id))
    body = assert_error(response, 400, "VALIDATION_ERROR")
    assert body["details"][0]["field"] == field, body
    if code is not None:
        assert body["details"][0]["code"] == code, body
    assert body["details"][0]["message"]


def test_the_python_api_makes_the_same_checks(app, clock, user_id):
    def refusal(**kwargs: Any) -> tuple[str, str]:
        with pytest.raises(ValidationError) as refused:
            current_ledger().usage(**{"user_id": user_id, **kwargs})
        (detail,) = refused.value.details
        return detail["field"], detail["code"]

    with app.app_context():
        assert refusal(granularity="week") == ("granularity", "literal_error")
        assert refusal(granularity=None) == ("granularity", "literal_error")
        assert refusal(since="2026-03-01") == ("since", "datetime_type")
        assert refusal(until=1767225600) == ("until", "datetime_type")
        assert refusal(since=clock.now, until=clock.now) == ("since", "range")
        assert refusal(user_id="") == ("user_id", "identity")
        assert refusal(user_id="x" * 129) == ("user_id", "identity")
        # Naive datetimes are UTC; aware ones are converted.
        kathmandu = timezone(timedelta(hours=5, minutes=45))
        aware = current_ledger().usage(
            user_id, datetime(2026, 3, 1, 15, 45, tzinfo=kathmandu), granularity="hour"
        )
        naive = current_ledger().usage(user_id, datetime(2026, 3, 1, 10, 0), granularity="hour")
    assert aware == naive
    assert [b.start for b in naive.buckets] == [
        at("2026-03-01T10:00:00"),
        at("2026-03-01T11:00:00"),
    ]


# --- the depletion estimate ----------------------------------------------------------------


def test_no_spending_no_estimate(app, clock, user_id):
    with app.app_context():
        ledger = current_ledger()
        assert ledger.usage(user_id).depletion_estimate is None
        ledger.top_up(user_id, 10 * U)
        ledger.adjust(user_id, U, "goodwill")
        assert ledger.usage(user_id).depletion_estimate is None
        # Six units in seven days is a burn of zero units a day.
        ledger.charge(user_id, 6)
        assert ledger.usage(user_id).depletion_estimate is None
        ledger.charge(user_id, 1)
        assert ledger.usage(user_id).depletion_estimate is not None


def test_the_estimate_is_exact_to_the_unit_and_microsecond(app, client, clock, user_id):
    now = clock.now
    with app.app_context():
        ledger = current_ledger()
        clock.set(now - 30 * DAY)
        ledger.top_up(user_id, 100 * U)
        # Before the window: not counted.
        clock.set(now - 7 * DAY - US)
        ledger.charge(user_id, 50 * U)
        # In it: a charge on its first instant, a capture, a negative adjustment.
        clock.set(now - 7 * DAY)
        spent = ledger.charge(user_id, 3 * U)
        clock.set(now - DAY)
        hold = ledger.hold(user_id, 4 * U)
        ledger.capture(hold.id, 2 * U + 3)
        ledger.adjust(user_id, -2 * U, "chargeback")
        # A refund and a pending hold change what is available, not the burn.
        ledger.refund(spent.id, U)
        clock.set(now - timedelta(seconds=10))
        ledger.hold(user_id, 5 * U)
        clock.set(now)
        summary = ledger.usage(user_id)
        balance = ledger.find_by_user_id(user_id)

    debited = 3 * U + 2 * U + 3 + 2 * U
    burn = debited // 7
    assert burn == 10_000_000  # 7.0000003 USDC / 7 days, rounded down
    available = balance.available_units
    assert available == 100 * U - 50 * U - debited + U - 5 * U
    estimate = summary.depletion_estimate
    assert estimate is not None
    assert estimate.daily_burn_units == burn
    assert estimate.at == now + timedelta(microseconds=available * 86_400_000_000 // burn)
    assert estimate.at == now + timedelta(days=38, hours=23, minutes=59, seconds=59.97408)
    body = client.get(f"{BASE}/usage", headers=bearer(user_id)).get_json()
    assert body["depletion_estimate"] == {
        "at": estimate.at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "daily_burn_usdc": "1.0000000",
    }


def test_an_estimate_past_the_last_timestamp_reads_as_it():
    window = UsageWindow.resolve("u", None, None, "day", at("2026-03-01T00:00:00"))
    estimate = window.estimate(debited_units=7, available_units=10**18)
    assert estimate is not None
    assert estimate.at == datetime.max.replace(tzinfo=UTC)
    assert window.estimate(debited_units=7 * 24, available_units=1).at == at("2026-03-01T01:00:00")
    assert window.estimate(debited_units=7, available_units=0).at == at("2026-03-01T00:00:00")


# --- the command line --------------------------------------------------------------------


def test_flask_credits_usage_prints_the_buckets(app, clock, user_id):
    with app.app_context():
        current_ledger().top_up(user_id, 10 * U)
        current_ledger().charge(user_id, 7 * U)
    clock.set(clock.now + HOUR)
    runner = app.test_cli_runner()

    result = runner.invoke(
        args=["credits", "usage", user_id, "--since", "2026-03-01T11:00", "--granularity", "hour"]
    )

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1:] == [
        "2026-03-01 11:00            0.0000000            0.0000000            0.0000000       0",
        "2026-03-01 12:00            7.0000000           10.0000000            0.0000000       2",
        "depletion: 2026-03-04 13:00 UTC at 1.0000000 a day",
    ]
    refused = runner.invoke(args=["credits", "usage", user_id, "--granularity", "hour"])
    assert refused.exit_code == 1
    assert "since: The range spans 720 hours" in refused.output
