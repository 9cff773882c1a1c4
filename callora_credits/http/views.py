"""Thin HTTP views: parse with :mod:`.schemas`, call the ledger, serialize."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timezone
from typing import Any, TypeVar

from flask import Response, request
from pydantic import BaseModel

from ..config import CreditsConfig, config
from ..core.idempotency import IdempotencyScope, canonical_fingerprint, valid_key
from ..core.money import AmountError, parse_amount
from ..core.operations import (
    Adjust,
    Capture,
    Charge,
    CreateHold,
    Operation,
    Refund,
    Release,
    TopUp,
)
from ..core.records import Entry, Hold
from ..errors import (
    BalanceLimitExceeded,
    DuplicateReference,
    Forbidden,
    HoldAmountExceeded,
    HoldNotPending,
    IdempotencyConflict,
    IdempotencyInProgress,
    IdempotencyKeyRequired,
    InsufficientCredits,
    NotFound,
    PayloadTooLarge,
    RefundExceedsCharge,
    Unauthorized,
    ValidationError,
)
from ..extension import ledger_for
from .auth import Caller, authenticate
from .blueprint import json_response, operation, register_routing_fallbacks, request_id
from .responses import HttpCodec
from .schemas import (
    AdjustmentIn,
    BalanceOut,
    BalanceQuery,
    CaptureIn,
    ChargeIn,
    EntryOut,
    EntryPageOut,
    HoldIn,
    HoldOut,
    HoldPageOut,
    HoldsQuery,
    RefundIn,
    ReleaseIn,
    TopUpIn,
    TransactionsQuery,
    balance_json,
    page_json,
    parse_model,
)

__all__: list[str] = []

# What each kind of route can answer besides success (and a 500, which any
# route may). A read validates its query and authenticates; a write also
# checks the scope, the Idempotency-Key and the body, and may meet a
# concurrent duplicate of its key. IdempotencyConflict is listed per route:
# a release's only valid body is empty, so its key can never meet another.
READ_ERRORS = (ValidationError, Unauthorized)
WRITE_ERRORS = (
    ValidationError,
    IdempotencyKeyRequired,
    Unauthorized,
    Forbidden,
    IdempotencyInProgress,
    PayloadTooLarge,
)


Owned = TypeVar("Owned", Entry, Hold)
Op = TypeVar("Op", bound=Operation)


def _visible(found: Owned | None, caller: Caller, cfg: CreditsConfig, missing: str) -> Owned:
    """``found`` if the caller owns it or is an admin; otherwise a 404, the
    same as for an id that does not exist, so ids cannot be probed."""
    if found is None or (found.user_id != caller.user_id and not caller.is_admin(cfg)):
        raise NotFound(missing)
    return found


class _NoQuery(BaseModel):
    model_config = {"extra": "forbid"}


def _caller(cfg: CreditsConfig) -> Caller:
    caller = authenticate(request.headers, cfg)
    request.environ["callora_credits.user_id"] = caller.user_id
    return caller


def _query(model: type[BaseModel]) -> Any:
    """Validate the query string; unknown and repeated keys are 400s."""
    args = request.args
    repeated = [key for key in args if len(args.getlist(key)) > 1]
    if repeated:
        raise ValidationError(
            details=[
                {"field": key, "message": "Give this parameter once", "code": "repeated"}
                for key in repeated
            ]
        )
    return parse_model(model, args.to_dict())


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _read_at_most(size: int) -> bytes:
    """Read up to ``size`` bytes, looping over short reads; never more."""
    stream = request.stream
    chunks: list[bytes] = []
    remaining = size
    while remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _body(model: type[BaseModel], cfg: CreditsConfig) -> tuple[Any, dict[str, Any]]:
    """Read at most CREDITS_MAX_BODY_BYTES, parse strict JSON, validate.

    Returns the model and the parsed object (whose canonical form is the
    idempotency fingerprint). An empty body is an empty object.
    """
    limit = cfg.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"The body may be at most {limit} bytes")
    raw = _read_at_most(limit + 1)
    if len(raw) > limit:
        raise PayloadTooLarge(f"The body may be at most {limit} bytes")
    if not raw.strip():
        data: Any = {}
    else:
        try:
            # Strict UTF-8 (json.loads would guess UTF-16 or UTF-32 from bytes
            # and let lone surrogates through), then no lone surrogate escape.
            data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except (ValueError, RecursionError):
            raise ValidationError(
                "Request body must be a JSON object in UTF-8",
                details=[
                    {"field": "body", "message": "Send a JSON object in UTF-8", "code": "json"}
                ],
            ) from None
    if not isinstance(data, dict):
        raise ValidationError(
            "Request body must be a JSON object",
            details=[{"field": "body", "message": "Send a JSON object", "code": "json"}],
        )
    return parse_model(model, data), data


def _amount(
    value: Any,
    cfg: CreditsConfig,
    *,
    field: str = "amount_usdc",
    signed: bool = False,
    allow_zero: bool = False,
) -> int:
    try:
        return parse_amount(
            value, max_units=cfg.max_amount_units, signed=signed, allow_zero=allow_zero
        )
    except AmountError as exc:
        raise ValidationError(
            details=[{"field": field, "message": str(exc), "code": exc.reason}]
        ) from None


def _idempotency_key() -> str:
    key = request.headers.get("Idempotency-Key")
    if key is None or key == "":
        raise IdempotencyKeyRequired()
    if not valid_key(key):
        raise ValidationError(
            details=[
                {
                    "field": "Idempotency-Key",
                    "message": "Use 1-255 printable ASCII characters",
                    "code": "idempotency_key",
                }
            ]
        )
    return key


@dataclass(frozen=True)
class _WriteRequest:
    """A money-moving request that passed auth, scope, key and body checks."""

    cfg: CreditsConfig
    caller: Caller
    key: str
    body: Any
    data: dict[str, Any]

    def build(
        self, kind: type[Op], *, signed: bool = False, allow_zero: bool = False, **path: str
    ) -> Op:
        """The operation the body asks for: its fields are the body's (the
        amount in units), the path's ids and the caller as actor."""
        declared = type(self.body).model_fields
        fields = {name: getattr(self.body, name) for name in declared}
        if "amount_usdc" in fields:
            amount = fields.pop("amount_usdc")
            # An optional amount left out means "the default"; a required one
            # sent as null is refused by the parser.
            if amount is not None or declared["amount_usdc"].is_required():
                units = _amount(amount, self.cfg, signed=signed, allow_zero=allow_zero)
                fields["amount_units"] = units
        return kind(limits=self.cfg, actor_id=self.caller.user_id, **fields, **path)

    def run(self, operation: Operation) -> Response:
        """Run the operation once per key; replay a stored outcome byte for byte."""
        scope = IdempotencyScope(
            actor_id=self.caller.user_id,
            method=request.method,
            path=request.path,
            key=self.key,
            fingerprint=canonical_fingerprint(self.data),
        )
        outcome = ledger_for(self.cfg).execute(operation, scope, HttpCodec(request_id()))
        response = Response(outcome.body, status=outcome.status, mimetype="application/json")
        if outcome.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return response


def _write_request(model: type[BaseModel], *, admin: bool) -> _WriteRequest:
    """Checks in SPEC order: identity (401), scope (403), key and body (400)."""
    cfg = config()
    caller = _caller(cfg)
    if admin:
        caller.require_admin(cfg)
    else:
        caller.require_service(cfg)
    key = _idempotency_key()
    body, data = _body(model, cfg)
    return _WriteRequest(cfg, caller, key, body, data)


@operation(
    "/credits",
    "GET",
    summary="Read a balance",
    scope="self",
    response=BalanceOut,
    query=BalanceQuery,
    errors=(*READ_ERRORS, Forbidden),
    description="A user with no balance yet gets a zero balance, created by this read. "
    "`held_usdc` sums the pending holds that have not expired; `available_usdc` "
    "is what a charge or hold may spend.",
)
def get_balance() -> Response:
    """The caller's balance (or, for an admin, ``?user_id=``'s).

    A user with no balance yet gets a zero balance, created on this read.
    """
    cfg = config()
    caller = _caller(cfg)
    query: BalanceQuery = _query(BalanceQuery)
    user_id = caller.target_user(query.user_id, cfg)
    balance = ledger_for(cfg).get_or_create_by_user_id(user_id)
    return json_response(balance_json(balance))


@operation(
    "/credits/topup",
    "POST",
    summary="Top up a balance",
    scope="admin",
    success=201,
    response=EntryOut,
    body=TopUpIn,
    errors=(*WRITE_ERRORS, IdempotencyConflict, DuplicateReference, BalanceLimitExceeded),
    description="Credit a user's balance, for example when a payment has been received. "
    "A `reference` (an external payment id) credits at most once per user, even "
    "under different idempotency keys.",
)
def top_up() -> Response:
    """Credit a user's balance (a payment received). Needs the admin scope.

    ``reference`` (an external payment id) credits at most once per user,
    even under different idempotency keys.
    """
    req = _write_request(TopUpIn, admin=True)
    return req.run(req.build(TopUp))


@operation(
    "/credits/adjustments",
    "POST",
    summary="Adjust a balance",
    scope="admin",
    success=201,
    response=EntryOut,
    body=AdjustmentIn,
    errors=(*WRITE_ERRORS, IdempotencyConflict, InsufficientCredits, BalanceLimitExceeded),
    description="A signed correction: a chargeback, a goodwill credit, a fix. A negative "
    "amount may not take the balance below zero, nor below what pending holds "
    "reserve.",
)
def adjust() -> Response:
    """A signed correction (chargeback, fix); never takes the balance below zero."""
    req = _write_request(AdjustmentIn, admin=True)
    return req.run(req.build(Adjust, signed=True))


@operation(
    "/credits/charge",
    "POST",
    summary="Charge a balance",
    scope="service",
    success=201,
    response=EntryOut,
    body=ChargeIn,
    errors=(*WRITE_ERRORS, IdempotencyConflict, InsufficientCredits, DuplicateReference),
    description="Debit a user's available balance (the balance minus pending holds). A "
    "user who has never had a balance has nothing available.",
)
def charge() -> Response:
    """Debit a user's available balance; 402 when it does not cover the amount."""
    req = _write_request(ChargeIn, admin=False)
    return req.run(req.build(Charge))


@operation(
    "/credits/transactions/<transaction_id>/refund",
    "POST",
    summary="Refund a charge",
    scope="admin",
    success=201,
    response=EntryOut,
    body=RefundIn,
    errors=(
        *WRITE_ERRORS,
        IdempotencyConflict,
        NotFound,
        RefundExceedsCharge,
        BalanceLimitExceeded,
    ),
    description="Give back all or part of a `charge` or `hold_capture` entry; without an "
    "amount, what is left of it. Refunding any other entry type is a 400.",
)
def refund(transaction_id: str) -> Response:
    """Give back all or part of a ``charge`` or ``hold_capture`` entry."""
    req = _write_request(RefundIn, admin=True)
    return req.run(req.build(Refund, transaction_id=transaction_id))


@operation(
    "/credits/transactions",
    "GET",
    summary="List ledger entries",
    scope="self",
    response=EntryPageOut,
    query=TransactionsQuery,
    errors=(*READ_ERRORS, Forbidden),
    description="The ledger, newest first (by `seq`), cursor-paginated. Entries written "
    "while a client pages never shift the pages that follow.",
)
def list_transactions() -> Response:
    """The caller's history, newest first, cursor-paginated."""
    cfg = config()
    caller = _caller(cfg)
    query: TransactionsQuery = _query(TransactionsQuery)
    user_id = caller.target_user(query.user_id, cfg)
    for name in ("since", "until"):
        value = getattr(query, name)
        if value is not None and value.tzinfo is not None:
            try:
                value.astimezone(timezone.utc)
            except OverflowError:
                raise ValidationError(
                    details=[{"field": name, "message": "Date out of range", "code": "range"}]
                ) from None
    page = ledger_for(cfg).history(
        user_id,
        limit=_limit(query.limit, cfg),
        cursor=query.cursor,
        type=query.type,
        since=query.since,
        until=query.until,
    )
    return json_response(page_json(page))


@operation(
    "/credits/transactions/<transaction_id>",
    "GET",
    summary="Read one ledger entry",
    scope="owner",
    response=EntryOut,
    errors=(*READ_ERRORS, NotFound),
    description="One ledger entry, by id.",
)
def get_transaction(transaction_id: str) -> Response:
    """One entry; another user's entry is a 404, so ids cannot be probed."""
    cfg = config()
    caller = _caller(cfg)
    _query(_NoQuery)
    entry = ledger_for(cfg).get_entry(transaction_id)
    return json_response(_visible(entry, caller, cfg, "No such transaction").as_json())


DEFAULT_PAGE_SIZE = 20


def _limit(limit: int | None, cfg: CreditsConfig) -> int:
    if limit is None:
        return min(DEFAULT_PAGE_SIZE, cfg.page_size_max)
    if limit > cfg.page_size_max:
        raise ValidationError(
            details=[
                {
                    "field": "limit",
                    "message": f"limit must be 1 to {cfg.page_size_max}",
                    "code": "less_than_equal",
                }
            ]
        )
    return limit


@operation(
    "/credits/holds",
    "POST",
    summary="Place a hold",
    scope="service",
    success=201,
    response=HoldOut,
    body=HoldIn,
    errors=(*WRITE_ERRORS, IdempotencyConflict, InsufficientCredits, DuplicateReference),
    description="Reserve part of a user's available balance until it is captured, "
    "released or expires: the first step of a two-phase charge.",
)
def create_hold() -> Response:
    """Reserve part of a user's available balance (two-phase charge, step one)."""
    req = _write_request(HoldIn, admin=False)
    return req.run(req.build(CreateHold))


@operation(
    "/credits/holds",
    "GET",
    summary="List pending holds",
    scope="self",
    response=HoldPageOut,
    query=HoldsQuery,
    errors=(*READ_ERRORS, Forbidden),
    description="Pending holds that have not expired, newest first, cursor-paginated.",
)
def list_holds() -> Response:
    """The caller's pending, unexpired holds, newest first, cursor-paginated."""
    cfg = config()
    caller = _caller(cfg)
    query: HoldsQuery = _query(HoldsQuery)
    user_id = caller.target_user(query.user_id, cfg)
    page = ledger_for(cfg).pending_holds(
        user_id, limit=_limit(query.limit, cfg), cursor=query.cursor
    )
    return json_response(page_json(page))


@operation(
    "/credits/holds/<hold_id>",
    "GET",
    summary="Read one hold",
    scope="owner",
    response=HoldOut,
    errors=(*READ_ERRORS, NotFound),
    description="One hold, in any status; a pending hold past its `expires_at` reads as "
    "`expired`.",
)
def get_hold(hold_id: str) -> Response:
    """One hold; another user's hold is a 404, so ids cannot be probed."""
    cfg = config()
    caller = _caller(cfg)
    _query(_NoQuery)
    hold = ledger_for(cfg).get_hold(hold_id)
    return json_response(_visible(hold, caller, cfg, "No such hold").as_json())


@operation(
    "/credits/holds/<hold_id>/capture",
    "POST",
    summary="Capture a hold",
    scope="service",
    response=HoldOut,
    body=CaptureIn,
    errors=(*WRITE_ERRORS, IdempotencyConflict, NotFound, HoldNotPending, HoldAmountExceeded),
    description="Spend up to the held amount (default: all of it) and release the rest, "
    "writing one `hold_capture` ledger entry. Capturing `0` releases the hold.",
)
def capture_hold(hold_id: str) -> Response:
    """Spend up to the held amount (default: all); the rest is released."""
    req = _write_request(CaptureIn, admin=False)
    return req.run(req.build(Capture, allow_zero=True, hold_id=hold_id))


@operation(
    "/credits/holds/<hold_id>/release",
    "POST",
    summary="Release a hold",
    scope="service",
    response=HoldOut,
    body=ReleaseIn,
    errors=(*WRITE_ERRORS, NotFound, HoldNotPending),
    description="Give the whole reservation back. No ledger entry is written.",
)
def release_hold(hold_id: str) -> Response:
    """Give the whole reservation back."""
    req = _write_request(ReleaseIn, admin=False)
    return req.run(req.build(Release, hold_id=hold_id))


@operation(
    "/openapi.json",
    "GET",
    summary="This API's OpenAPI 3.1 document",
    scope="anyone",
    response=None,
    errors=(ValidationError,),
    description="This document, with paths under the prefix the blueprint is mounted at.",
)
def openapi_document() -> Response:
    """The OpenAPI 3.1 document of every route of the blueprint."""
    _query(_NoQuery)
    from .openapi import build_document

    prefix = request.path[: -len("/openapi.json")]
    return json_response(build_document(prefix))


register_routing_fallbacks()
