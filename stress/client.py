"""The load generator: client processes sending a mixed stream over HTTP.

Each process runs a few threads; each thread keeps one keep-alive connection
and sends, until a deadline or an operation budget, a random mix of balance
reads, top-ups, charges, holds, captures, releases and refunds against a few
hot accounts (shared by every thread) and many cold ones. A share of the
mutating requests is replayed with the same key and body, some after the
first answer and some concurrently from a second connection.

A connection error, a timeout, a 5xx or a 409 ``IDEMPOTENCY_IN_PROGRESS`` is
retried with the same key and body, a bounded number of times with backoff.
A 503 ``SERVICE_UNAVAILABLE`` (the database could not answer in time) is an
allowed answer, not a server error: retried the same way, after its
``Retry-After``; a request that gets nothing else through every retry is
recorded as unanswered (applied at most once), not as a problem.
Every logical request is recorded (key, body sent, final status and body,
whether the server ran it or replayed it) in a JSON file the harness checks
against the database.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import jwt

__all__ = ["ClientConfig", "client_main", "make_token", "units_text"]

UNITS = 10_000_000
PREFIX = "/api/billing"
ADMIN_SCOPE = "credits:admin"
SERVICE_SCOPE = "credits:charge"
ADMIN_ID = "stress_admin"
SERVICE_ID = "stress_gateway"

#: Final statuses each operation may legitimately end with (all stored, §6).
EXPECTED = {
    "topup": {201, 409},  # 409: DUPLICATE_REFERENCE (a reused reference)
    "charge": {201, 402},
    "hold": {201, 402},
    "capture": {200, 409},  # 409: HOLD_NOT_PENDING (resolved or expired)
    "release": {200, 409},
    "refund": {201, 422},  # 422: REFUND_EXCEEDS_CHARGE
}


@dataclass
class ClientConfig:
    """What one client process does; plain data, so it crosses processes."""

    host: str
    port: int
    prefix: str
    hot_users: list[str]
    cold_users: list[str]
    seed: int
    start_time: float
    end_time: float
    threads: int = 3
    max_ops_per_thread: int = 100_000
    jwt_secret: str = ""
    request_timeout: float = 15.0
    max_attempts: int = 10
    retry_budget_seconds: float = 40.0
    replay_share: float = 0.06
    concurrent_share: float = 0.04
    hot_share: float = 0.5


def make_token(user_id: str, secret: str, scope: str | None = None) -> str:
    """An HS256 access token shaped like Flask-JWT-Extended's."""
    now = datetime.now(timezone.utc)
    payload: dict[str, Any] = {
        "sub": user_id,
        "iat": now,
        "nbf": now,
        "exp": now + timedelta(hours=6),
        "jti": uuid.uuid4().hex,
        "type": "access",
        "fresh": False,
    }
    if scope is not None:
        payload["scope"] = scope
    return jwt.encode(payload, secret, algorithm="HS256")


def units_text(units: int) -> str:
    """Units as the wire's decimal string."""
    return f"{units // UNITS}.{units % UNITS:07d}"


def _units(text: str) -> int:
    whole, _, frac = text.partition(".")
    sign = -1 if whole.startswith("-") else 1
    return sign * (abs(int(whole)) * UNITS + int((frac + "0000000")[:7]))


class TransportError(Exception):
    """No HTTP answer: refused, reset, closed, or timed out."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def replayed(self) -> bool:
        return self.headers.get("idempotent-replayed") == "true"

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        try:
            data = self.json()
        except ValueError:
            return None
        return data.get("code") if isinstance(data, dict) else None


def _service_unavailable(reply: Reply) -> bool:
    """A 503 as the library answers it: ``SERVICE_UNAVAILABLE`` with
    ``Retry-After: 1``. Any other 5xx is a server error to explain."""
    return (
        reply.status == 503
        and reply.code == "SERVICE_UNAVAILABLE"
        and reply.headers.get("retry-after") == "1"
    )


class Http:
    """One keep-alive connection; reconnects after any transport error."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
        except TimeoutError as exc:
            self.close()
            raise TransportError("timeout", repr(exc)) from None
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TransportError("connection", repr(exc)) from None
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return Reply(response.status, data, {k.lower(): v for k, v in response.getheaders()})


@dataclass
class Outcome:
    """The final answer to one logical send (after its retries), or none."""

    reply: Reply | None
    attempts: int
    last_error: str | None = None
    #: No answer but 503 SERVICE_UNAVAILABLE through every retry: allowed
    #: (the database could not answer in time), and not applied, unless the
    #: connection was lost during COMMIT (so checked as "at most once").
    unavailable: bool = False


@dataclass
class Recorder:
    """What a process saw; written as JSON at the end."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[dict[str, Any]] = field(default_factory=list)
    ops: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    server_errors: list[dict[str, Any]] = field(default_factory=list)
    unavailable: int = 0
    unavailable_final: list[dict[str, Any]] = field(default_factory=list)
    unresolved: list[dict[str, Any]] = field(default_factory=list)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    timeouts: int = 0
    balance_reads: int = 0
    replays_checked: int = 0
    concurrent_pairs: int = 0
    max_latency: float = 0.0

    def as_json(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "ops": dict(self.ops),
                "statuses": dict(self.statuses),
                "retries": dict(self.retries),
                "server_errors": self.server_errors,
                "unavailable": self.unavailable,
                "unavailable_final": self.unavailable_final,
                "unresolved": self.unresolved,
                "unexpected": self.unexpected,
                "anomalies": self.anomalies,
                "timeouts": self.timeouts,
                "balance_reads": self.balance_reads,
                "replays_checked": self.replays_checked,
                "concurrent_pairs": self.concurrent_pairs,
                "max_latency": self.max_latency,
            }


class Worker:
    """One client thread: its connection, its random stream, its holds."""

    def __init__(self, cfg: ClientConfig, name: str, recorder: Recorder) -> None:
        self.cfg = cfg
        self.name = name
        self.rng = random.Random(f"{cfg.seed}-{name}")
        self.recorder = recorder
        self.http = Http(cfg.host, cfg.port, cfg.request_timeout)
        self.admin = "Bearer " + make_token(ADMIN_ID, cfg.jwt_secret, ADMIN_SCOPE)
        self.service = "Bearer " + make_token(SERVICE_ID, cfg.jwt_secret, SERVICE_SCOPE)
        self.user_tokens: dict[str, str] = {}
        self.counter = 0
        # (hold_id, amount_units, monotonic expiry) of holds this thread placed.
        self.pending: list[tuple[str, int, float]] = []
        self.resolved: list[str] = []
        # (entry_id, debited units) this thread may refund.
        self.refundable: list[tuple[str, int]] = []
        self.references: list[tuple[str, str]] = []  # (user_id, reference) of top-ups

    # --- sending ------------------------------------------------------------------

    def _send(
        self,
        http: Http,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        op: str,
        key: str | None,
    ) -> Outcome:
        """Send, retrying transient failures with the same key and body."""
        started = time.monotonic()
        last_error = None
        unavailable = False
        attempt = 0
        while attempt < self.cfg.max_attempts:
            attempt += 1
            sent = time.monotonic()
            wait = 0.0
            unavailable = False
            try:
                reply = http.send(method, path, body, headers)
            except TransportError as exc:
                with self.recorder.lock:
                    self.recorder.retries[exc.reason] += 1
                    if exc.reason == "timeout":
                        self.recorder.timeouts += 1
                last_error = f"{exc.reason}: {exc}"
            else:
                elapsed = time.monotonic() - sent
                with self.recorder.lock:
                    self.recorder.max_latency = max(self.recorder.max_latency, elapsed)
                if _service_unavailable(reply):
                    # Allowed: retried with the same key after Retry-After.
                    with self.recorder.lock:
                        self.recorder.retries["service_unavailable"] += 1
                        self.recorder.unavailable += 1
                    last_error = "503 SERVICE_UNAVAILABLE"
                    unavailable = True
                    wait = float(reply.headers["retry-after"])
                elif reply.status >= 500:
                    with self.recorder.lock:
                        self.recorder.retries[f"http_{reply.status}"] += 1
                        self.recorder.server_errors.append(
                            {
                                "op": op,
                                "method": method,
                                "path": path,
                                "key": key,
                                "status": reply.status,
                                "request_id": reply.headers.get("x-request-id"),
                                "body": reply.body[:300].decode(errors="replace"),
                                "attempt": attempt,
                                "time": time.time(),
                            }
                        )
                    last_error = f"http {reply.status}"
                elif reply.status == 409 and reply.code == "IDEMPOTENCY_IN_PROGRESS":
                    with self.recorder.lock:
                        self.recorder.retries["in_progress"] += 1
                    last_error = "409 IDEMPOTENCY_IN_PROGRESS"
                else:
                    return Outcome(reply, attempt)
            if time.monotonic() - started > self.cfg.retry_budget_seconds:
                break
            pause = min(1.0, 0.05 * 2 ** (attempt - 1))
            time.sleep(max(wait, pause * (0.5 + self.rng.random())))
        return Outcome(None, attempt, last_error, unavailable)

    def _headers(self, auth: str, key: str | None) -> dict[str, str]:
        headers = {"Authorization": auth, "Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        return headers

    def _key(self) -> str:
        self.counter += 1
        return f"{self.cfg.prefix}k-{self.name}-{self.counter}"

    def mutate(self, op: str, path: str, auth: str, payload: dict[str, Any]) -> Reply | None:
        """One idempotent POST, maybe replayed; recorded; the final reply."""
        key = self._key()
        began = time.time()
        body = json.dumps(payload).encode()
        headers = self._headers(auth, key)
        mode = self.rng.random()
        record: dict[str, Any] = {
            "key": key,
            "op": op,
            "path": path,
            "payload": payload,
            "status": None,
            "body": None,
            "originals": 0,
            "replays": 0,
            "mode": "single",
            "started": began,
        }
        outcomes: list[Outcome] = []
        if mode < self.cfg.concurrent_share:
            record["mode"] = "concurrent"
            twin = Http(self.cfg.host, self.cfg.port, self.cfg.request_timeout)
            twin_out: list[Outcome] = []

            def other() -> None:
                twin_out.append(self._send(twin, "POST", path, body, headers, op, key))

            thread = threading.Thread(target=other, name=f"{self.name}-twin")
            thread.start()
            outcomes.append(self._send(self.http, "POST", path, body, headers, op, key))
            thread.join(self.cfg.retry_budget_seconds + 2 * self.cfg.request_timeout)
            twin.close()
            if thread.is_alive():
                with self.recorder.lock:
                    self.recorder.anomalies.append(f"{key}: the concurrent twin never finished")
            outcomes.extend(twin_out)
            with self.recorder.lock:
                self.recorder.concurrent_pairs += 1
        else:
            outcomes.append(self._send(self.http, "POST", path, body, headers, op, key))
            first = outcomes[0].reply
            if first is not None and mode < self.cfg.concurrent_share + self.cfg.replay_share:
                record["mode"] = "replay"
                outcomes.append(self._send(self.http, "POST", path, body, headers, op, key))
        return self._settle(op, key, record, outcomes)

    def _settle(
        self, op: str, key: str, record: dict[str, Any], outcomes: list[Outcome]
    ) -> Reply | None:
        replies = [o.reply for o in outcomes if o.reply is not None]
        record["attempts"] = sum(o.attempts for o in outcomes)
        record["elapsed"] = round(time.time() - record["started"], 4)
        with self.recorder.lock:
            self.recorder.ops[op] += 1
            self.recorder.requests.append(record)
            for failed in (o for o in outcomes if o.reply is None):
                item = {"op": op, "key": key, "last_error": failed.last_error}
                if failed.unavailable:
                    self.recorder.unavailable_final.append(item)
                else:
                    self.recorder.unresolved.append(item)
                    break
            if not replies:
                return None
            final = replies[0]
            record["status"] = final.status
            record["body"] = final.body.decode()
            record["originals"] = sum(not r.replayed for r in replies)
            record["replays"] = sum(r.replayed for r in replies)
            for reply in replies:
                self.recorder.statuses[f"{op} {reply.status}"] += 1
            if final.status not in EXPECTED[op]:
                self.recorder.unexpected.append(
                    {"op": op, "key": key, "status": final.status, "body": record["body"][:500]}
                )
            if record["originals"] > 1:
                self.recorder.anomalies.append(
                    f"{key}: {record['originals']} answers were not replays (applied twice?)"
                )
            for reply in replies[1:]:
                self.recorder.replays_checked += 1
                if reply.status != final.status or reply.body != final.body:
                    self.recorder.anomalies.append(
                        f"{key}: answers differ: {final.status} {final.body[:200]!r} vs "
                        f"{reply.status} {reply.body[:200]!r}"
                    )
            if record["mode"] == "replay" and len(replies) == 2 and not replies[1].replayed:
                self.recorder.anomalies.append(f"{key}: a sequential replay was not marked")
        return final

    # --- operations -----------------------------------------------------------------

    def _user(self) -> str:
        if self.rng.random() < self.cfg.hot_share:
            return self.rng.choice(self.cfg.hot_users)
        return self.rng.choice(self.cfg.cold_users)

    def _amount(self, low_usdc: float, high_usdc: float) -> int:
        return self.rng.randint(int(low_usdc * UNITS), int(high_usdc * UNITS))

    def balance(self) -> None:
        user = self._user()
        if self.rng.random() < 0.5:
            token = self.user_tokens.get(user)
            if token is None:
                token = self.user_tokens[user] = "Bearer " + make_token(user, self.cfg.jwt_secret)
            path, auth = f"{PREFIX}/credits", token
        else:
            path, auth = f"{PREFIX}/credits?user_id={user}", self.admin
        out = self._send(self.http, "GET", path, None, self._headers(auth, None), "balance", None)
        with self.recorder.lock:
            self.recorder.ops["balance"] += 1
            self.recorder.balance_reads += 1
            if out.reply is None:
                item = {"op": "balance", "key": None, "last_error": out.last_error}
                if out.unavailable:
                    self.recorder.unavailable_final.append(item)
                else:
                    self.recorder.unresolved.append(item)
                return
            self.recorder.statuses[f"balance {out.reply.status}"] += 1
            if out.reply.status != 200:
                self.recorder.unexpected.append(
                    {"op": "balance", "status": out.reply.status, "body": out.reply.body[:500]}
                )
                return
            data = out.reply.json()
            balance = _units(data["balance_usdc"])
            held = _units(data["held_usdc"])
            available = _units(data["available_usdc"])
            if data["user_id"] != user or balance < 0 or held < 0 or available < 0:
                self.recorder.anomalies.append(f"balance read of {user}: {data}")
            elif balance - held != available:
                self.recorder.anomalies.append(f"balance read of {user}: {data} does not add up")

    def top_up(self) -> None:
        user = self._user()
        payload: dict[str, Any] = {"user_id": user, "amount_usdc": units_text(self._amount(5, 60))}
        roll = self.rng.random()
        if roll < 0.1 and self.references:
            # A reference already credited: 409 DUPLICATE_REFERENCE, never a credit.
            user, reference = self.rng.choice(self.references)
            payload.update(user_id=user, reference=reference)
        elif roll < 0.4:
            payload["reference"] = f"{self.cfg.prefix}pay-{uuid.uuid4().hex[:16]}"
        payload["metadata"] = {"stress_key": ""}
        self._tagged("topup", "/credits/topup", self.admin, payload)

    def _tagged(self, op: str, path: str, auth: str, payload: dict[str, Any]) -> Reply | None:
        # The key rides in the metadata, so the database shows which request
        # wrote each row (and that none was written twice).
        key_preview = f"{self.cfg.prefix}k-{self.name}-{self.counter + 1}"
        if "metadata" in payload:
            payload["metadata"] = {"stress_key": key_preview}
        reply = self.mutate(op, f"{PREFIX}{path}", auth, payload)
        if reply is not None and reply.status == 201:
            data = reply.json()
            if op == "topup" and payload.get("reference"):
                self.references.append((payload["user_id"], payload["reference"]))
            if op == "charge":
                self.refundable.append((data["id"], -_units(data["amount_usdc"])))
        return reply

    def charge(self) -> None:
        user = self._user()
        high = 3 if self.rng.random() < 0.9 else 80
        payload = {
            "user_id": user,
            "amount_usdc": units_text(self._amount(0.0000001, high)),
            "metadata": {},
        }
        self._tagged("charge", "/credits/charge", self.service, payload)

    def hold(self) -> None:
        user = self._user()
        payload: dict[str, Any] = {
            "user_id": user,
            "amount_usdc": units_text(self._amount(0.0000001, 5)),
            "metadata": {},
        }
        ttl = 900
        if self.rng.random() < 0.1:
            ttl = self.rng.randint(1, 3)
            payload["expires_in_seconds"] = ttl
        reply = self._tagged("hold", "/credits/holds", self.service, payload)
        if reply is not None and reply.status == 201:
            data = reply.json()
            self.pending.append((data["id"], _units(data["amount_usdc"]), time.monotonic() + ttl))

    def resolve(self, op: str) -> None:
        if not self.pending:
            self.hold()
            return
        hold_id, amount, _ = self.pending.pop(self.rng.randrange(len(self.pending)))
        payload: dict[str, Any] = {}
        if op == "capture":
            roll = self.rng.random()
            if roll < 0.4:
                payload["amount_usdc"] = units_text(self.rng.randint(1, amount))
            elif roll < 0.5:
                payload["amount_usdc"] = "0"
        reply = self.mutate(op, f"{PREFIX}/credits/holds/{hold_id}/{op}", self.service, payload)
        self.resolved.append(hold_id)
        if reply is not None and reply.status == 200 and op == "capture":
            data = reply.json()
            if data["transaction_id"]:
                self.refundable.append((data["transaction_id"], _units(data["captured_usdc"])))

    def resolve_again(self) -> None:
        """Resolve a hold this thread already resolved: 409 HOLD_NOT_PENDING."""
        if not self.resolved:
            self.charge()
            return
        hold_id = self.rng.choice(self.resolved)
        op = self.rng.choice(["capture", "release"])
        self.mutate(op, f"{PREFIX}/credits/holds/{hold_id}/{op}", self.service, {})

    def refund(self) -> None:
        if not self.refundable:
            self.charge()
            return
        index = self.rng.randrange(len(self.refundable))
        entry_id, debited = self.refundable[index]
        key_preview = f"{self.cfg.prefix}k-{self.name}-{self.counter + 1}"
        payload: dict[str, Any] = {"reason": key_preview}
        if self.rng.random() < 0.5 and debited > 1:
            payload["amount_usdc"] = units_text(self.rng.randint(1, debited // 2))
        elif self.rng.random() < 0.7:
            self.refundable.pop(index)  # refunded in full; later ones would 422
        self.mutate(
            "refund", f"{PREFIX}/credits/transactions/{entry_id}/refund", self.admin, payload
        )

    def step(self) -> None:
        roll = self.rng.random()
        if roll < 0.18:
            self.balance()
        elif roll < 0.32:
            self.top_up()
        elif roll < 0.56:
            self.charge()
        elif roll < 0.72:
            self.hold()
        elif roll < 0.83:
            self.resolve("capture")
        elif roll < 0.90:
            self.resolve("release")
        elif roll < 0.97:
            self.refund()
        else:
            self.resolve_again()

    def run(self) -> None:
        try:
            for _ in range(self.cfg.max_ops_per_thread):
                if time.time() >= self.cfg.end_time:
                    break
                self.step()
        except Exception as exc:  # a harness bug must show, not hide in a thread
            with self.recorder.lock:
                self.recorder.anomalies.append(f"client thread {self.name} crashed: {exc!r}")
            raise
        finally:
            self.http.close()


def client_main(cfg: ClientConfig, index: int, result_path: str) -> None:
    """Entry point of one client process: run the threads, write the record."""
    recorder = Recorder()
    # Every process starts together, once all have imported.
    time.sleep(min(10.0, max(0.0, cfg.start_time - time.time())))
    workers = [Worker(cfg, f"p{index}t{n}", recorder) for n in range(cfg.threads)]
    threads = [threading.Thread(target=w.run, name=w.name, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    bound = max(0.0, cfg.end_time - time.time()) + cfg.retry_budget_seconds * 2 + 60
    deadline = time.monotonic() + bound
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            recorder.anomalies.append(f"client thread {thread.name} did not stop in time")
    with open(result_path, "w", encoding="utf-8") as out:
        json.dump(recorder.as_json(), out)
    with contextlib.suppress(Exception):
        for worker in workers:
            worker.http.close()
