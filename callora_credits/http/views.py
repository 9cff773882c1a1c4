"""Thin HTTP views: read the request (:mod:`.requests`), call the ledger, serialize."""

from __future__ import annotations

from datetime import timezone
from typing import TypeVar, cast

from flask import Response, request

from ..config import CreditsConfig, config
from ..core.operations import (
    Adjust,
    Capture,
    Charge,
    CreateGrant,
    CreateHold,
    Refund,
    Release,
    TopUp,
    VoidGrant,
)
from ..core.records import Entry, Grant, Hold
from ..core.usage import Granularity
from ..errors import (
    BalanceLimitExceeded,
    DuplicateReference,
    Forbidden,
    GrantNotActive,
    HoldAmountExceeded,
    HoldNotPending,
    IdempotencyConflict,
    IdempotencyInProgress,
    IdempotencyKeyRequired,
    InsufficientCredits,
    NotFound,
    PayloadTooLarge,
    RefundExceedsCharge,
    ServiceUnavailable,
    Unauthorized,
    ValidationError,
)
from ..extension import ledger_for
from .auth import Caller
from .blueprint import json_response, operation, register_routing_fallbacks
from .conditional import data_of
from .requests import NoQuery, identify, page_limit, parse_query, write_request
from .schemas import (
    AdjustmentIn,
    BalanceOut,
    BalanceQuery,
    CaptureIn,
    ChargeIn,
    EntryOut,
    EntryPageOut,
    GrantIn,
    GrantOut,
    GrantPageOut,
    GrantsQuery,
    HoldIn,
    HoldOut,
    HoldPageOut,
    HoldsQuery,
    RefundIn,
    ReleaseIn,
    TopUpIn,
    TransactionsQuery,
    UsageOut,
    UsageQuery,
    VoidGrantIn,
    balance_json,
    page_json,
)

__all__: list[str] = []

# What each kind of route can answer besides success (and a 500, which any
# route may). A read validates its query and authenticates; a write also
# checks the scope, the Idempotency-Key and the body, and may meet a
# concurrent duplicate of its key. Both reach the database, which may be
# unavailable (503). IdempotencyConflict is listed per route: a release's
# only valid body is empty, so its key can never meet another.
READ_ERRORS = (ValidationError, Unauthorized, ServiceUnavailable)
WRITE_ERRORS = (
    ValidationError,
    IdempotencyKeyRequired,
    Unauthorized,
    Forbidden,
    IdempotencyInProgress,
    PayloadTooLarge,
    ServiceUnavailable,
)


Owned = TypeVar("Owned", Entry, Hold, Grant)


def _visible(found: Owned | None, caller: Caller, cfg: CreditsConfig, missing: str) -> Owned:
    """``found`` if the caller owns it or is an admin; otherwise a 404, the
    same as for an id that does not exist, so ids cannot be probed."""
    if found is None or (found.user_id != caller.user_id and not caller.is_admin(cfg)):
        raise NotFound(missing)
    data_of(found.user_id)
    return found


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
    caller = identify(cfg)
    query: BalanceQuery = parse_query(BalanceQuery)
    user_id = caller.target_user(query.user_id, cfg)
    data_of(user_id)
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
    "under different idempotency keys. The credit is a `paid` grant, without expiry "
    "unless `expires_at` is given, used in `priority` order.",
)
def top_up() -> Response:
    """Credit a user's balance (a payment received). Needs the admin scope.

    ``reference`` (an external payment id) credits at most once per user,
    even under different idempotency keys.
    """
    req = write_request(TopUpIn, admin=True)
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
    req = write_request(AdjustmentIn, admin=True)
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
    req = write_request(ChargeIn, admin=False)
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
    req = write_request(RefundIn, admin=True)
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
    caller = identify(cfg)
    query: TransactionsQuery = parse_query(TransactionsQuery)
    user_id = caller.target_user(query.user_id, cfg)
    data_of(user_id)
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
        limit=page_limit(query.limit, cfg),
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
    caller = identify(cfg)
    parse_query(NoQuery)
    entry = ledger_for(cfg).get_entry(transaction_id)
    return json_response(_visible(entry, caller, cfg, "No such transaction").as_json())


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
    req = write_request(HoldIn, admin=False)
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
    caller = identify(cfg)
    query: HoldsQuery = parse_query(HoldsQuery)
    user_id = caller.target_user(query.user_id, cfg)
    data_of(user_id)
    page = ledger_for(cfg).pending_holds(
        user_id, limit=page_limit(query.limit, cfg), cursor=query.cursor
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
    caller = identify(cfg)
    parse_query(NoQuery)
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
    req = write_request(CaptureIn, admin=False)
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
    req = write_request(ReleaseIn, admin=False)
    return req.run(req.build(Release, hold_id=hold_id))


@operation(
    "/credits/grants",
    "POST",
    summary="Create a credit grant",
    scope="admin",
    success=201,
    response=GrantOut,
    body=GrantIn,
    errors=(*WRITE_ERRORS, IdempotencyConflict, DuplicateReference, BalanceLimitExceeded),
    description="Give a user credit that is used in `priority` order (lower first), "
    "enters the balance at `effective_at` and leaves it at `expires_at`: promotional "
    "credit by default. A grant that takes effect now writes a `grant` ledger entry "
    "(its `transaction_id`); a scheduled one writes it when it takes effect, and counts "
    "against the balance limit from now on.",
)
def create_grant() -> Response:
    """Give a user credit as a grant (promotional by default). Needs the admin scope."""
    req = write_request(GrantIn, admin=True)
    return req.run(req.build(CreateGrant))


@operation(
    "/credits/grants",
    "GET",
    summary="List grants",
    scope="self",
    response=GrantPageOut,
    query=GrantsQuery,
    errors=(*READ_ERRORS, Forbidden),
    description="Grants, newest first, cursor-paginated: by default the active and the "
    "scheduled ones; `status` picks one status, or `all`. Every figure is as of now, "
    "expiries and activations that fell due included.",
)
def list_grants() -> Response:
    """The caller's grants, newest first, cursor-paginated."""
    cfg = config()
    caller = identify(cfg)
    query: GrantsQuery = parse_query(GrantsQuery)
    user_id = caller.target_user(query.user_id, cfg)
    data_of(user_id)
    page = ledger_for(cfg).grants(
        user_id, status=query.status, limit=page_limit(query.limit, cfg), cursor=query.cursor
    )
    return json_response(page_json(page))


@operation(
    "/credits/grants/<grant_id>",
    "GET",
    summary="Read one grant",
    scope="owner",
    response=GrantOut,
    errors=(*READ_ERRORS, NotFound),
    description="One grant, in any status, as of now.",
)
def get_grant(grant_id: str) -> Response:
    """One grant; another user's grant is a 404, so ids cannot be probed."""
    cfg = config()
    caller = identify(cfg)
    parse_query(NoQuery)
    grant = _visible(ledger_for(cfg).get_grant(grant_id), caller, cfg, "No such grant")
    return json_response(grant.as_json())


@operation(
    "/credits/grants/<grant_id>/void",
    "POST",
    summary="Void a grant",
    scope="admin",
    response=GrantOut,
    body=VoidGrantIn,
    errors=(*WRITE_ERRORS, IdempotencyConflict, NotFound, GrantNotActive),
    description="Take what is left of a grant out of the balance now, with a `void` "
    "ledger entry; the part pending holds have pinned leaves when they resolve, unless "
    "captured. Voiding a scheduled grant writes no entry: it never enters the balance. "
    "A voided, expired or depleted grant cannot be voided.",
)
def void_grant(grant_id: str) -> Response:
    """Void what is left of a grant (a chargeback, a withdrawn promotion)."""
    req = write_request(VoidGrantIn, admin=True)
    return req.run(req.build(VoidGrant, grant_id=grant_id))


@operation(
    "/credits/usage",
    "GET",
    summary="Summarise usage",
    scope="self",
    response=UsageOut,
    query=UsageQuery,
    errors=(*READ_ERRORS, Forbidden),
    description="The ledger summed per UTC hour or day: every bucket that overlaps "
    "`[since, until)`, oldest first, empty ones with zeros, at most 400. Amounts are "
    "unsigned: `credited_usdc - debited_usdc - expired_usdc` is the bucket's change in "
    "balance. `depletion_estimate` says when the available balance runs out at the pace "
    "of the last 7 days (`null` when nothing was debited in them).",
)
def usage() -> Response:
    """The caller's usage per hour or day, and when their credits run out."""
    cfg = config()
    caller = identify(cfg)
    query: UsageQuery = parse_query(UsageQuery)
    user_id = caller.target_user(query.user_id, cfg)
    data_of(user_id)
    # The ledger refuses a granularity other than hour or day (the same
    # check for every door), so the query passes on what it was given.
    granularity = cast(Granularity, "day" if query.granularity is None else query.granularity)
    summary = ledger_for(cfg).usage(
        user_id, since=query.since, until=query.until, granularity=granularity
    )
    return json_response(summary.as_json())


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
    parse_query(NoQuery)
    from .openapi import build_document

    prefix = request.path[: -len("/openapi.json")]
    return json_response(build_document(prefix))


register_routing_fallbacks()
