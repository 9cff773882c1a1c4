"""Reusable checks that one account's ledger is exact, and that the HTTP
answers a test collected agree with it and with what was asked.

They read the raw tables and share no code with ``Ledger.reconcile()``, so a
test that trusts them does not trust the library to judge itself.

Every check returns a list of problems (empty when all is well), so a test can
report all of them at once instead of stopping at the first.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from callora_credits.core.records import Allocation, Entry
from callora_credits.db.models import (
    Account,
    AllocationRow,
    GrantRow,
    HoldRow,
    IdempotencyRecord,
    LedgerEntry,
)

__all__ = [
    "Reply",
    "Snapshot",
    "account_problems",
    "asked_problems",
    "grants_problems",
    "holds_problems",
    "ledger_problems",
    "replies_problems",
    "snapshot",
]

REFUNDABLE = ("charge", "hold_capture")


@dataclass(frozen=True)
class Reply:
    """One HTTP answer a test received for a money-moving POST."""

    key: str
    path: str
    status: int
    body: bytes
    replayed: bool
    worker: str
    #: The JSON body sent; ``None`` when the test did not keep it (then the
    #: answer is not compared with what was asked).
    sent: dict[str, Any] | None = None

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def code(self) -> str | None:
        data = self.json
        return data.get("code") if isinstance(data, dict) and self.status >= 400 else None


@dataclass(frozen=True)
class Snapshot:
    """What the database holds for one user, read in one transaction."""

    accounts: list[Any]
    entries: list[Any]
    idempotency_keys: int
    holds: list[Any] = field(default_factory=list)
    grants: list[Any] = field(default_factory=list)
    allocations: list[Any] = field(default_factory=list)

    @property
    def balance_units(self) -> int | None:
        return int(self.accounts[0].balance_units) if len(self.accounts) == 1 else None


def snapshot(engine: Engine, user_id: str) -> Snapshot:
    a, t, k = Account.__table__, LedgerEntry.__table__, IdempotencyRecord.__table__
    h = HoldRow.__table__
    with engine.connect() as conn, conn.begin():
        accounts = list(conn.execute(sa.select(a).where(a.c.user_id == user_id)).all())
        entries = list(
            conn.execute(sa.select(t).where(t.c.user_id == user_id).order_by(t.c.seq)).all()
        )
        keys = conn.execute(
            sa.select(sa.func.count()).select_from(k).where(k.c.user_id == user_id)
        ).scalar_one()
        holds = list(
            conn.execute(sa.select(h).where(h.c.user_id == user_id).order_by(h.c.created_at)).all()
        )
        g, al = GrantRow.__table__, AllocationRow.__table__
        grants = list(
            conn.execute(sa.select(g).where(g.c.user_id == user_id).order_by(g.c.number)).all()
        )
        allocations = list(
            conn.execute(sa.select(al).where(al.c.user_id == user_id).order_by(al.c.id)).all()
        )
    return Snapshot(accounts, entries, int(keys), holds, grants, allocations)


def _utc_naive(now: datetime | None) -> datetime:
    if now is None:
        now = datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).replace(tzinfo=None) if now.tzinfo else now


def ledger_problems(engine: Engine, user_id: str, now: datetime | None = None) -> list[str]:
    """:func:`account_problems` and :func:`holds_problems` of a fresh snapshot.

    ``now`` is the instant holds are judged live at: the library's clock
    (a test that moves it passes it here); default the real time.
    """
    snap = snapshot(engine, user_id)
    return account_problems(snap) + holds_problems(snap, now) + grants_problems(snap)


def holds_problems(snap: Snapshot, now: datetime | None = None) -> list[str]:
    """Every hold agrees with the ledger: a captured hold names exactly one
    ``hold_capture`` entry of its amount and metadata, no other hold names an
    entry, every ``hold_capture`` entry belongs to one captured hold, and the
    holds live at ``now`` reserve no more than the balance."""
    problems: list[str] = []
    at = _utc_naive(now)
    by_id = {e.id: e for e in snap.entries}
    captures = {e.id: e for e in snap.entries if e.type == "hold_capture"}
    claimed: Counter[str] = Counter()
    for hold in snap.holds:
        amount, captured = int(hold.amount_units), int(hold.captured_units)
        if not 0 <= captured <= amount:
            problems.append(f"hold {hold.id}: captured {captured} outside 0..{amount}")
        if (hold.status == "pending") != (hold.resolved_at is None):
            problems.append(f"hold {hold.id}: {hold.status} with resolved_at {hold.resolved_at}")
        if hold.status != "captured":
            if captured != 0 or hold.transaction_id is not None:
                problems.append(
                    f"hold {hold.id}: {hold.status} but captured {captured}, "
                    f"transaction {hold.transaction_id}"
                )
            continue
        entry = by_id.get(hold.transaction_id)
        if captured == 0 or entry is None or entry.type != "hold_capture":
            problems.append(
                f"hold {hold.id}: captured {captured} but its transaction "
                f"{hold.transaction_id} is not a hold_capture entry of the user"
            )
            continue
        claimed[entry.id] += 1
        if entry.hold_id != hold.id or int(entry.amount_units) != -captured:
            problems.append(
                f"hold {hold.id} captured {captured}: its entry {entry.id} says hold "
                f"{entry.hold_id}, amount {entry.amount_units}"
            )
        if json.loads(entry.metadata_json) != json.loads(hold.metadata_json):
            problems.append(
                f"hold {hold.id}: metadata {hold.metadata_json} but its capture entry "
                f"carries {entry.metadata_json}"
            )
    for entry_id, entry in captures.items():
        if claimed[entry_id] != 1:
            problems.append(
                f"hold_capture {entry_id} (hold {entry.hold_id}) is the transaction of "
                f"{claimed[entry_id]} captured holds, expected 1"
            )
    live = sum(
        int(h.amount_units) for h in snap.holds if h.status == "pending" and h.expires_at > at
    )
    balance = snap.balance_units
    if balance is not None and live > balance:
        problems.append(f"live holds reserve {live} of a balance of {balance}")
    return problems


def account_problems(snap: Snapshot) -> list[str]:
    """The account is exact: one row, balance == sum of the ledger, ``seq``
    gapless from 1, each ``balance_after`` follows from the previous one and is
    never negative, refunds never exceed (and add up to) what they refund."""
    problems: list[str] = []
    if len(snap.accounts) != 1:
        problems.append(f"{len(snap.accounts)} rows in `credits` for the user, expected 1")
        return problems
    account = snap.accounts[0]
    entries = snap.entries
    total = sum(int(e.amount_units) for e in entries)
    if int(account.balance_units) != total:
        problems.append(f"balance {account.balance_units} != SUM(amount_units) {total}")
    if int(account.balance_units) < 0:
        problems.append(f"negative balance {account.balance_units}")
    seqs = [int(e.seq) for e in entries]
    if seqs != list(range(1, len(entries) + 1)):
        missing = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
        dupes = sorted(s for s, n in Counter(seqs).items() if n > 1)
        problems.append(f"seq not 1..{len(entries)}: missing {missing}, duplicated {dupes}")
    if int(account.last_seq) != len(entries):
        problems.append(f"last_seq {account.last_seq} but {len(entries)} entries")
    running = 0
    for e in entries:
        running += int(e.amount_units)
        if int(e.balance_after_units) != running:
            problems.append(
                f"seq {e.seq} ({e.type} {e.amount_units}): balance_after "
                f"{e.balance_after_units} != previous + amount = {running}"
            )
            running = int(e.balance_after_units)
        if int(e.balance_after_units) < 0:
            problems.append(f"seq {e.seq}: negative balance_after {e.balance_after_units}")
    by_id = {e.id: e for e in entries}
    refunded_total = 0
    for e in entries:
        refunded = int(e.refunded_units)
        if e.type in REFUNDABLE:
            refunded_total += refunded
            if not 0 <= refunded <= -int(e.amount_units):
                problems.append(
                    f"{e.type} {e.id}: refunded_units {refunded} outside 0..{-e.amount_units}"
                )
        elif refunded != 0:
            problems.append(f"{e.type} {e.id}: refunded_units {refunded} on a non-debit")
    refunds = [e for e in entries if e.type == "refund"]
    refund_sum = sum(int(e.amount_units) for e in refunds)
    if refund_sum != refunded_total:
        problems.append(
            f"refund entries sum to {refund_sum} but refunded_units of debits sum to "
            f"{refunded_total}"
        )
    # Each refund names what it refunds, and those add up per refunded entry.
    per_target: dict[str, int] = defaultdict(int)
    unlinked = [e.id for e in refunds if e.refund_of is None]
    if unlinked:
        problems.append(
            f"{len(unlinked)} of {len(refunds)} refund entries have refund_of NULL "
            f"in the database, e.g. {unlinked[:3]}"
        )
    for e in refunds:
        if e.refund_of is None:
            continue
        target = by_id.get(e.refund_of)
        if target is None or target.type not in REFUNDABLE:
            problems.append(f"refund {e.id}: refund_of {e.refund_of} is not a debit of the user")
            continue
        per_target[e.refund_of] += int(e.amount_units)
    if not unlinked:
        for e in entries:
            if e.type in REFUNDABLE and per_target.get(e.id, 0) != int(e.refunded_units):
                problems.append(
                    f"{e.id}: refunded_units {e.refunded_units} but its refunds sum to "
                    f"{per_target.get(e.id, 0)}"
                )
    return problems


def replies_problems(
    snap: Snapshot,
    replies: Iterable[Reply],
    allowed: set[tuple[int, str | None]],
) -> list[str]:
    """The answers agree with the ledger: only ``allowed`` (status, code)
    pairs; one outcome per idempotency key (replays byte for byte); every 201
    is exactly one ledger row and every ledger row is one key's 201."""
    problems: list[str] = []
    replies = list(replies)
    for r in replies:
        if (r.status, r.code) not in allowed:
            problems.append(f"{r.worker} {r.path} key={r.key}: {r.status} {r.body[:300]!r}")
    by_key: dict[str, list[Reply]] = defaultdict(list)
    for r in replies:
        by_key[r.key].append(r)
    created: dict[str, str] = {}  # key -> entry id
    settled_keys = 0
    for key, group in by_key.items():
        settled = [r for r in group if r.code != "IDEMPOTENCY_IN_PROGRESS"]
        if settled:
            settled_keys += 1
        bodies = {r.body for r in settled}
        if len(bodies) > 1:
            problems.append(
                f"key {key}: {len(bodies)} different outcomes "
                f"{sorted((r.status, r.body[:120]) for r in settled)}"
            )
        ids = {r.json["id"] for r in settled if r.status == 201}
        if len(ids) > 1:
            problems.append(f"key {key} applied more than once: entries {sorted(ids)}")
        if ids:
            created[key] = next(iter(ids))
        fresh = [r for r in settled if not r.replayed]
        if len(fresh) > 1:
            problems.append(f"key {key}: {len(fresh)} answers not marked Idempotent-Replayed")
    entry_ids = [e.id for e in snap.entries]
    by_id = {e.id: e for e in snap.entries}
    if len(entry_ids) != len(created):
        problems.append(
            f"{len(entry_ids)} ledger rows but {len(created)} distinct keys answered 201"
        )
    answered = Counter(created.values())
    for entry_id, n in answered.items():
        if n > 1:
            problems.append(f"entry {entry_id} answered for {n} different keys")
        if entry_id not in by_id:
            problems.append(f"entry {entry_id} of a 201 is not in the ledger")
    orphans = set(entry_ids) - set(answered)
    if orphans:
        problems.append(f"ledger rows no 201 answered: {sorted(orphans)[:5]}")
    # The 201 body is the entry as stored (refunded_usdc may grow later).
    mismatched: list[str] = []
    for key, entry_id in created.items():
        row = by_id.get(entry_id)
        if row is None:
            continue
        answer = next(r.json for r in by_key[key] if r.status == 201)
        drawn = tuple(
            Allocation(a.grant_id, int(a.amount_units))
            for a in sorted(snap.allocations, key=lambda a: a.position)
            if a.entry_id == row.id
        )
        stored = Entry.from_row(row, allocations=drawn).as_json()
        diff = sorted(
            f for f in stored if f != "refunded_usdc" and stored[f] != answer.get(f, "<absent>")
        )
        if diff:
            mismatched.append(
                f"{entry_id} ({stored['type']}): "
                + ", ".join(f"{f} answered {answer.get(f)!r} stored {stored[f]!r}" for f in diff)
            )
    if mismatched:
        problems.append(
            f"{len(mismatched)} 201 bodies differ from the stored entry, e.g. {mismatched[:2]}"
        )
    # An answer that agrees with the row proves nothing if both are not what
    # was asked (two requests' amounts or metadata swapped, a sign flipped).
    not_asked: list[str] = []
    for key, entry_id in created.items():
        row = by_id.get(entry_id)
        asked = next((r for r in by_key[key] if r.sent is not None), None)
        if row is None or asked is None or asked.sent is None:
            continue
        not_asked += [
            f"key {key} {asked.path}: {problem}"
            for problem in asked_problems(row, asked.path, asked.sent, by_id)
        ]
    if not_asked:
        problems.append(
            f"{len(not_asked)} entries are not what their request asked, e.g. {not_asked[:3]}"
        )
    if snap.idempotency_keys != settled_keys:
        problems.append(
            f"{snap.idempotency_keys} idempotency records for the user but "
            f"{settled_keys} keys got a stored outcome"
        )
    return problems


def _units_of(text: str) -> int:
    sign = -1 if text.startswith("-") else 1
    whole, _, fraction = text.lstrip("-").partition(".")
    return sign * (int(whole) * 10**7 + int(fraction.ljust(7, "0")))


#: The entry each money-moving path writes, and the sign of its amount.
_WRITES = {"topup": ("topup", 1), "charge": ("charge", -1), "adjustments": ("adjustment", 1)}


def asked_problems(row: Any, path: str, sent: dict[str, Any], by_id: dict[str, Any]) -> list[str]:
    """How the ledger row ``row`` differs from what the POST of ``sent`` to
    ``path`` (``/topup``, ``/charge``, ``/adjustments`` or
    ``/transactions/<id>/refund``, under any prefix) asked for: its type,
    user, amount, texts, metadata and links. ``by_id``: the user's entries."""
    parts = path.rstrip("/").split("/")
    expected: dict[str, Any] = {"hold_id": None, "metadata": sent.get("metadata") or {}}
    amount_text = sent.get("amount_usdc")
    if parts[-1] == "refund":
        target = by_id.get(parts[-2])
        if target is None:
            return [f"refund_of {parts[-2]} is not an entry of the user"]
        expected.update(
            type="refund",
            user_id=target.user_id,
            refund_of=target.id,
            reference=None,
            description=sent.get("reason"),
        )
        if amount_text is None:
            # "What is left": at most the refunded debit, and more than nothing.
            if not 0 < int(row.amount_units) <= -int(target.amount_units):
                return [f"refund of the rest is {row.amount_units} of {target.amount_units}"]
        else:
            expected["amount_units"] = _units_of(amount_text)
    elif parts[-1] in _WRITES:
        type_, sign = _WRITES[parts[-1]]
        expected.update(
            type=type_,
            user_id=sent["user_id"],
            refund_of=None,
            reference=sent.get("reference"),
            description=sent.get("reason" if type_ == "adjustment" else "description"),
            amount_units=sign * _units_of(amount_text or "0"),
        )
    else:
        return [f"{path} writes no ledger entry"]
    stored = {
        "type": row.type,
        "user_id": row.user_id,
        "amount_units": int(row.amount_units),
        "refund_of": row.refund_of,
        "reference": row.reference,
        "description": row.description,
        "hold_id": row.hold_id,
        "metadata": json.loads(row.metadata_json),
    }
    return [
        f"{name} is {stored[name]!r}, asked {value!r}"
        for name, value in expected.items()
        if stored[name] != value
    ]


DEBITS = ("charge", "hold_capture")
GRANT_SOURCES = ("topup", "grant")


def grants_problems(snap: Snapshot) -> list[str]:
    """The grants agree with the balance, the ledger and the holds, as written:

    - the balance is the sum of the non-scheduled grants' remaining + held;
    - the account's held total is what the pending holds reserve, no more
      than the balance;
    - the grants' held parts are the pinned amounts of the pending holds, and
      each pending hold pins exactly its amount;
    - each grant's amount = remaining + held + what debits drew from it + what
      its expiration/void entries took out - what refunds gave back to it
      (a scheduled grant is whole and has no entry);
    - each debit's allocations add up to its amount, each refund's to its
      amount; each top-up, grant and positive adjustment entry brought in
      exactly the grant it names, of its amount.
    """
    problems: list[str] = []
    if len(snap.accounts) != 1:
        return problems
    balance = int(snap.accounts[0].balance_units)
    grants = {g.id: g for g in snap.grants}
    live = sum(
        int(g.remaining_units) + int(g.held_units) for g in snap.grants if g.status != "scheduled"
    )
    if live != balance:
        problems.append(f"balance {balance} != remaining + held of its grants {live}")
    # The held total on the account row is what the pending holds reserve
    # (expired ones too until their expiry is written), within the balance.
    account_held = int(snap.accounts[0].held_units)
    reserved = sum(int(h.amount_units) for h in snap.holds if h.status == "pending")
    if account_held != reserved:
        problems.append(f"account held_units {account_held} != pending holds reserve {reserved}")
    if reserved > balance:
        problems.append(f"pending holds reserve {reserved} of a balance of {balance}")
    scheduled = sum(int(g.amount_units) for g in snap.grants if g.status == "scheduled")
    if int(snap.accounts[0].scheduled_units) != scheduled:
        problems.append(
            f"scheduled_units {snap.accounts[0].scheduled_units} != scheduled grants {scheduled}"
        )
    by_entry: dict[str, list[Any]] = defaultdict(list)
    by_hold: dict[str, list[Any]] = defaultdict(list)
    for a in snap.allocations:
        if a.entry_id is not None:
            by_entry[a.entry_id].append(a)
        else:
            by_hold[a.hold_id].append(a)
        if a.grant_id not in grants:
            problems.append(f"allocation {a.id} names grant {a.grant_id} of no such user grant")
    pending = [h for h in snap.holds if h.status == "pending"]
    for h in snap.holds:
        pinned = sum(int(a.amount_units) for a in by_hold.get(h.id, []))
        if pinned != int(h.amount_units):
            problems.append(f"hold {h.id} ({h.status}) pins {pinned} of {h.amount_units}")
    held = sum(int(g.held_units) for g in snap.grants)
    pending_held = sum(int(h.amount_units) for h in pending)
    if held != pending_held:
        problems.append(f"grants hold {held} but pending holds reserve {pending_held}")
    taken: dict[str, int] = defaultdict(int)
    migrated = any(g.origin == "migration" for g in snap.grants)
    for e in snap.entries:
        amount = int(e.amount_units)
        allocations = by_entry.get(e.id, [])
        total = sum(int(a.amount_units) for a in allocations)
        drawing = e.type in DEBITS or (e.type == "adjustment" and amount < 0)
        if drawing or e.type == "refund":
            if total != abs(amount):
                problems.append(f"{e.type} {e.id} of {amount}: allocations sum to {total}")
            sign = -1 if e.type == "refund" else 1
            for a in allocations:
                taken[a.grant_id] += sign * int(a.amount_units)
        elif allocations:
            problems.append(f"{e.type} {e.id} has allocations")
        if e.type in ("expiration", "void"):
            if e.grant_id not in grants:
                problems.append(f"{e.type} {e.id} names no grant of the user")
            taken[e.grant_id] += -amount
        if e.grant_id is None and migrated:
            pass  # written before grants: the migration folded it into one grant
        elif e.type in GRANT_SOURCES or (e.type == "adjustment" and amount > 0):
            grant = grants.get(e.grant_id)
            if grant is None or grant.transaction_id != e.id or int(grant.amount_units) != amount:
                problems.append(f"{e.type} {e.id} does not match the grant it names")
    for g in snap.grants:
        amount, remaining, held = int(g.amount_units), int(g.remaining_units), int(g.held_units)
        if g.status == "scheduled":
            if remaining != amount or held or taken.get(g.id):
                problems.append(f"scheduled grant {g.id} is not whole")
            continue
        if g.status == "voided" and g.transaction_id is None and g.origin == "grant":
            # Voided while scheduled: it never entered the balance.
            if remaining or held or taken.get(g.id):
                problems.append(f"grant {g.id}, voided before it started, moved money")
            continue
        if amount != remaining + held + taken.get(g.id, 0):
            problems.append(
                f"grant {g.id}: amount {amount} != remaining {remaining} + held {held} "
                f"+ taken out {taken.get(g.id, 0)}"
            )
        if g.status in ("expired", "voided") and remaining:
            problems.append(f"{g.status} grant {g.id} still has {remaining} unheld")
    return problems
