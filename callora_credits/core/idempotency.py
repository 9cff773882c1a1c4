"""Idempotency keys: one service for every door.

A key is scoped to (caller, method, concrete path) for HTTP requests and to
(actor, ``CALL``, ``ledger.<operation>``) for Python API calls, and hashed
into the primary key of ``credits_idempotency``, whose unique constraint
arbitrates concurrent claims. :class:`IdempotentExecutor` claims the key in
the same transaction as the money it moves (the record, with its stored
outcome, is the last statement), replays a stored outcome, refuses a key
reused for a different request, and records storable errors once the failed
transaction has rolled back.

What is stored for an outcome is the door's business: each door passes an
:class:`OutcomeCodec` that turns a result or an error into the status and
bytes it wants replayed (the HTTP layer stores its response, byte for byte).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from sqlalchemy.exc import IntegrityError

from ..db import key_rows
from ..db.unit_of_work import HostSession, RetryTransaction, Tx
from ..errors import (
    CreditsError,
    IdempotencyConflict,
    IdempotencyInProgress,
    error_for_code,
)
from .operations import Operation
from .posting import Posting, ReferenceTaken, Settings, describe_duplicate
from .records import Entry, Grant, Hold, Record, dumps

__all__ = [
    "CallCodec",
    "IdempotencyScope",
    "IdempotentExecutor",
    "Outcome",
    "OutcomeCodec",
    "Result",
    "canonical_fingerprint",
    "valid_key",
]

MAX_KEY_LENGTH = 255

#: What an operation produces: an entry, a hold, or nothing to change.
Result = Entry | Hold | Grant | None
T = TypeVar("T")


def valid_key(key: str) -> bool:
    """1-255 printable ASCII characters (space included, control characters not)."""
    return 0 < len(key) <= MAX_KEY_LENGTH and all(" " <= ch <= "~" for ch in key)


def canonical_fingerprint(payload: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``payload`` (sorted keys, compact)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class IdempotencyScope:
    """Who asked what, under which key: the identity of one mutating request."""

    actor_id: str
    method: str
    path: str
    key: str
    fingerprint: str

    @property
    def key_hash(self) -> str:
        """The record's primary key: SHA-256 of the scope and the key."""
        scope = "\x00".join((self.actor_id, self.method, self.path, self.key))
        return hashlib.sha256(scope.encode()).hexdigest()

    @classmethod
    def for_call(cls, op: Operation, key: str | None) -> IdempotencyScope:
        """The scope of a Python API call.

        Without a ``key`` the call gets a fresh internal one, so its own
        retries can never apply it twice.
        """
        return cls(
            actor_id=op.actor_id or "",
            method="CALL",
            path=f"ledger.{op.name}",
            key=key if key is not None else "auto:" + uuid.uuid4().hex,
            fingerprint=canonical_fingerprint(op.params()),
        )


class OutcomeCodec(Protocol):
    """How a door stores an outcome: a status and the bytes to replay."""

    def encode(self, op: Operation, result: Result | CreditsError) -> tuple[int, bytes]: ...


class CallCodec:
    """The Python API's stored outcomes: status 0 and the record's JSON, or
    status 1 and the error's code, message and details (a record never has
    a ``code``).

    Python API keys live in their own scope, so no HTTP request ever replays
    one of these.
    """

    def encode(self, op: Operation, result: Result | CreditsError) -> tuple[int, bytes]:
        if isinstance(result, CreditsError):
            error = {"code": result.code, "message": result.message, "details": result.details}
            return 1, dumps(error)
        return 0, dumps(None if result is None else result.as_json())

    def decode(self, op: Operation, status: int, body: bytes) -> Result | CreditsError:
        """The result or error a stored outcome describes."""
        data = json.loads(body)
        if data is None:
            return None
        if status != 0 and "code" in data and "message" in data:
            return error_for_code(data["code"], data["message"], data.get("details"))
        record: type[Record] = (
            Hold if "captured_usdc" in data else Grant if "remaining_usdc" in data else Entry
        )
        found = record.from_json(data)
        assert isinstance(found, Entry | Hold | Grant)
        return found


@dataclass(frozen=True)
class Outcome:
    """What a mutating operation answered.

    ``status`` and ``body`` are what the door's codec stored; ``result`` is
    the entry, hold or error when the operation ran in this call (``None``
    on a replay, which carries only the stored bytes).
    """

    status: int
    body: bytes
    replayed: bool
    result: Result | CreditsError = None


class _Storable(Exception):
    """A storable error found mid-transaction: roll back, then record it."""

    def __init__(self, error: CreditsError, user_id: str | None) -> None:
        super().__init__(error.message)
        self.error, self.user_id = error, user_id


class IdempotencySettings(Settings, Protocol):
    @property
    def idempotency_ttl_seconds(self) -> int: ...

    @property
    def idempotency_wait_seconds(self) -> float: ...


Runner = Callable[[Callable[[Tx], Any], "HostSession | None"], Any]


class IdempotentExecutor:
    """Runs each operation once per idempotency key (see the module docstring).

    ``run`` executes a unit of work in one transaction (retrying transient
    failures) or inside a host's session.
    """

    def __init__(self, run: Runner, settings: IdempotencySettings, sender: Any) -> None:
        self._run = run
        self.settings = settings
        self.sender = sender

    def execute(
        self,
        op: Operation,
        scope: IdempotencyScope,
        codec: OutcomeCodec,
        now: datetime,
        *,
        session: HostSession | None = None,
    ) -> Outcome:
        """Apply ``op`` once under ``scope``'s key; replay a stored outcome.

        A concurrent duplicate loses on the record's primary key, rolls back
        and replays the winner's outcome. Storable errors roll the change back
        and are then recorded in a transaction of their own. With ``session``
        (the host's transaction) a storable error is raised, not recorded: the
        host's rollback would take the record with it.
        """
        settings = self.settings
        expires = now + timedelta(seconds=settings.idempotency_ttl_seconds)
        deadline = time.monotonic() + settings.idempotency_wait_seconds

        def record(tx: Tx, user_id: str | None, status: int, body: bytes) -> None:
            values = {
                "key_hash": scope.key_hash,
                "user_id": user_id,
                "actor_id": scope.actor_id,
                "method": scope.method,
                "path": scope.path[:512],
                "idempotency_key": scope.key,
                "fingerprint": scope.fingerprint,
                "status_code": status,
                "response_body": body.decode(),
                "created_at": now,
                "expires_at": expires,
            }
            if session is not None:
                key_rows.insert_idempotency(tx.conn, values)
                return
            try:
                key_rows.insert_idempotency(tx.conn, values)
            except IntegrityError:
                # The first conflict always runs again, to replay a request
                # that has finished; only repeated losses are "in progress".
                if tx.attempt > 0 and time.monotonic() > deadline:
                    raise IdempotencyInProgress() from None
                raise RetryTransaction() from None

        def replay(tx: Tx) -> Outcome | None:
            found = key_rows.find_idempotency(tx.conn, scope.key_hash)
            if found is None:
                return None
            if found.expires_at <= now:
                key_rows.delete_expired_key(tx.conn, scope.key_hash, now)
                return None
            if found.fingerprint != scope.fingerprint:
                raise IdempotencyConflict()
            return Outcome(int(found.status_code), found.response_body.encode(), True)

        def apply(tx: Tx) -> Outcome:
            if tx.attempt > 0 or session is not None:
                replayed = replay(tx)
                if replayed is not None:
                    return replayed
            posting = Posting(tx, now, settings, self.sender)
            try:
                result = posting.apply(op)
            except CreditsError as error:
                if error.storable:
                    raise _Storable(error, posting.user_id) from None
                raise
            status, body = codec.encode(op, result)
            record(tx, posting.user_id, status, body)
            return Outcome(status, body, False, result)

        try:
            outcome: Outcome = self._run(apply, session)
            return outcome
        except _Storable as stored:
            if session is not None:
                raise stored.error from None
            return self._record_error(stored, op, codec, record, replay)

    def _record_error(
        self,
        stored: _Storable,
        op: Operation,
        codec: OutcomeCodec,
        record: Callable[[Tx, str | None, int, bytes], None],
        replay: Callable[[Tx], Outcome | None],
    ) -> Outcome:
        def work(tx: Tx) -> Outcome:
            replayed = replay(tx)
            if replayed is not None:
                return replayed
            error = stored.error
            if isinstance(error, ReferenceTaken):
                error = describe_duplicate(tx, error)
            status, body = codec.encode(op, error)
            record(tx, stored.user_id, status, body)
            return Outcome(status, body, False, error)

        outcome: Outcome = self._run(work, None)
        return outcome
