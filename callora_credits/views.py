"""Thin HTTP views: parse with :mod:`.schemas`, call the ledger, serialize."""

from __future__ import annotations

from typing import Any

from flask import Response, g, request
from pydantic import BaseModel

from .auth import Caller, authenticate
from .blueprint import json_response, operation, register_routing_fallbacks
from .config import CreditsConfig, config
from .errors import ValidationError
from .extension import current_ledger
from .schemas import BalanceOut, BalanceQuery, balance_json, parse_model

__all__: list[str] = []

AUTH_ERRORS = (400, 401, 403)


def _caller(cfg: CreditsConfig) -> Caller:
    caller = authenticate(request.headers, cfg)
    g.credits_user_id = caller.user_id
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


@operation(
    "/credits",
    "GET",
    summary="Read a balance",
    scope="self (admin: ?user_id=)",
    response=BalanceOut,
    query=BalanceQuery,
    errors=AUTH_ERRORS,
)
def get_balance() -> Response:
    """The caller's balance (or, for an admin, ``?user_id=``'s).

    A user with no balance yet gets a zero balance, created on this read.
    """
    cfg = config()
    caller = _caller(cfg)
    query: BalanceQuery = _query(BalanceQuery)
    user_id = caller.target_user(query.user_id, cfg)
    balance = current_ledger().get_or_create_by_user_id(user_id)
    return json_response(balance_json(balance))


@operation(
    "/openapi.json",
    "GET",
    summary="This API's OpenAPI 3.1 document",
    scope="anyone",
    response=None,
)
def openapi_document() -> Response:
    """The OpenAPI 3.1 document of every route of the blueprint."""
    from .openapi import build_document

    prefix = request.path[: -len("/openapi.json")]
    return json_response(build_document(prefix))


register_routing_fallbacks()
