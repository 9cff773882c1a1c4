"""What a retried transaction logs: real retries at INFO, replays quietly."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from callora_credits import current_ledger
from callora_credits.db.unit_of_work import RetryStats, Tx, run
from callora_credits.errors import ServiceUnavailable


def _retry_notices(records: list[logging.LogRecord]) -> list[str]:
    return [
        r.getMessage()
        for r in records
        if r.levelno >= logging.INFO and r.getMessage().startswith("credits: retrying")
    ]


def test_a_replayed_duplicate_is_not_logged_as_a_retry(app, user_id, caplog):
    caplog.set_level(logging.DEBUG, logger="callora_credits")
    with app.app_context():
        ledger = current_ledger()
        first = ledger.top_up(user_id, 5, idempotency_key=f"dup-{user_id}")
        before = dict(ledger.stats.counts)
        caplog.clear()
        again = ledger.top_up(user_id, 5, idempotency_key=f"dup-{user_id}")
        after = dict(ledger.stats.counts)
        engine = app.extensions["sqlalchemy"].engine
        with engine.connect() as conn:
            balance = conn.execute(
                sa.text("SELECT balance_units FROM credits WHERE user_id = :u"), {"u": user_id}
            ).scalar()
    assert again.id == first.id
    assert balance == 5
    # The duplicate reached its replay through a lost race on the key...
    assert after.get("conflict", 0) == before.get("conflict", 0) + 1
    assert _retry_notices(caplog.records) == []
    # ...which is logged, at DEBUG, as what it is.
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("idempotency key" in m and "replay" in m for m in debug), debug


def test_a_transient_failure_is_still_logged_at_info(app, caplog):
    caplog.set_level(logging.DEBUG, logger="callora_credits")
    locked = OperationalError("BEGIN IMMEDIATE", {}, Exception("database is locked"))
    attempts: list[int] = []

    def work(tx: Tx) -> int:
        attempts.append(tx.attempt)
        if tx.attempt == 0:
            raise locked
        return int(tx.conn.execute(sa.text("SELECT 1")).scalar_one())

    stats = RetryStats()
    with app.app_context():
        engine = app.extensions["sqlalchemy"].engine
        assert run(work, engine=engine, retries=2, stats=stats) == 1
    assert attempts == [0, 1]
    assert stats.counts == {"locked": 1}
    assert _retry_notices(caplog.records) == [
        "credits: retrying a transaction (locked, attempt 1)"
    ]


# --- the two bounds of retrying ----------------------------------------------------------


def _locked(calls: list[float]) -> Any:
    def work(tx: Any) -> None:
        calls.append(time.monotonic())
        raise sa.exc.OperationalError("UPDATE credits", {}, Exception("database is locked"))

    return work


def test_retries_stop_at_the_attempt_bound(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="callora_credits")
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bound.sqlite3'}")
    calls: list[float] = []
    with pytest.raises(ServiceUnavailable) as raised:
        run(_locked(calls), engine=engine, retries=3, retry_seconds=60)
    assert len(calls) == 4  # the first attempt and three retries
    # The driver's error is the cause, kept for the log; the reason names it.
    assert isinstance(raised.value.__cause__, sa.exc.OperationalError)
    assert (raised.value.reason, raised.value.retry_after) == ("locked", 1)
    gave_up = [r for r in caplog.records if r.getMessage().startswith("credits: giving up")]
    assert len(gave_up) == 1
    assert gave_up[0].levelno == logging.WARNING
    assert "after 4 attempts" in gave_up[0].getMessage()
    assert "database is locked" in gave_up[0].getMessage()
    engine.dispose()


def test_retries_stop_at_the_time_bound(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bound.sqlite3'}")
    calls: list[float] = []
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        run(_locked(calls), engine=engine, retries=10_000, retry_seconds=0.5)
    assert 0.5 <= time.monotonic() - started < 2.0
    assert 3 < len(calls) < 10_000
    engine.dispose()


def test_the_backoff_grows_with_jitter_and_stays_within_the_budget(tmp_path, monkeypatch):
    import callora_credits.db.unit_of_work as unit_of_work

    pauses: list[float] = []
    monkeypatch.setattr(unit_of_work.time, "sleep", pauses.append)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bound.sqlite3'}")
    calls: list[float] = []
    with pytest.raises(ServiceUnavailable):
        run(_locked(calls), engine=engine, retries=8, retry_seconds=60)
    engine.dispose()
    assert len(pauses) == 8
    # Full jitter under a ceiling that doubles from 20 ms up to 0.5 s.
    ceilings = [min(0.5, 0.01 * 2**attempt) for attempt in range(1, 9)]
    assert all(0 <= pause <= top for pause, top in zip(pauses, ceilings, strict=True))
    assert len(set(pauses)) > 1


def test_an_error_that_is_not_transient_is_raised_as_it_is(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bound.sqlite3'}")
    calls: list[int] = []

    def work(tx: Tx) -> None:
        calls.append(tx.attempt)
        tx.conn.execute(sa.text("SELECT * FROM no_such_table"))

    with pytest.raises(sa.exc.OperationalError):
        run(work, engine=engine, retries=3, retry_seconds=60)
    assert calls == [0]
    engine.dispose()


def test_the_defaults_are_ten_retries_within_five_seconds(app):
    from callora_credits.config import CreditsConfig

    cfg = CreditsConfig(app.config)
    assert (cfg.db_retries, cfg.db_retry_seconds) == (10, 5.0)
