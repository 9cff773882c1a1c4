"""Idempotency keys: scope, fingerprint, and the stored outcome (SPEC §6).

A key is scoped to (caller, method, concrete path) and hashed into the
primary key of ``credits_idempotency``; the unique constraint arbitrates
concurrent claims. The record is written in the same transaction as the money
it moved, so a crashed worker's rollback frees the key.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Idempotency",
    "Outcome",
    "canonical_fingerprint",
    "valid_key",
]

MAX_KEY_LENGTH = 255


def valid_key(key: str) -> bool:
    """1-255 printable ASCII characters (space included, control characters not)."""
    return 0 < len(key) <= MAX_KEY_LENGTH and all(" " <= ch <= "~" for ch in key)


def canonical_fingerprint(payload: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``payload`` (sorted keys, compact)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Idempotency:
    """The identity of one mutating request, and how to reply to its replays."""

    actor_id: str
    method: str
    path: str
    key: str
    fingerprint: str
    request_id: str

    @property
    def key_hash(self) -> str:
        """The record's primary key: SHA-256 of the scope and the key."""
        scope = "\x00".join((self.actor_id, self.method, self.path, self.key))
        return hashlib.sha256(scope.encode()).hexdigest()

    @classmethod
    def for_call(
        cls,
        operation: str,
        params: Mapping[str, Any],
        *,
        key: str | None = None,
        actor_id: str | None = None,
    ) -> Idempotency:
        """The idempotency of a Python API call.

        Without a ``key`` the call gets a fresh internal one, so its own
        retries can never apply it twice.
        """
        return cls(
            actor_id=actor_id or "",
            method="CALL",
            path=f"ledger.{operation}",
            key=key if key is not None else "auto:" + uuid.uuid4().hex,
            fingerprint=canonical_fingerprint(params),
            request_id="call_" + uuid.uuid4().hex[:24],
        )


@dataclass(frozen=True)
class Outcome:
    """What a mutating operation answered: status, exact body, replayed or not.

    ``value`` is the domain object (an entry, a hold) when the operation ran
    in this call; replays carry only the stored bytes.
    """

    status: int
    body: bytes
    replayed: bool
    value: Any = None

    def json(self) -> Any:
        return json.loads(self.body)
