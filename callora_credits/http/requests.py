"""Reading a request: the caller, the query string, the body, the
Idempotency-Key, and the operation a write asks for.

Everything here turns HTTP into values the core understands, and refuses
what cannot be one with a 4xx before anything is looked up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Response, request
from pydantic import BaseModel

from ..config import CreditsConfig, config
from ..core.idempotency import IdempotencyScope, canonical_fingerprint, valid_key
from ..core.money import AmountError, parse_amount
from ..core.operations import Operation
from ..errors import IdempotencyKeyRequired, PayloadTooLarge, ValidationError
from ..extension import ledger_for
from .auth import Caller, request_caller
from .blueprint import request_id
from .responses import HttpCodec
from .schemas import parse_model

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "NoQuery",
    "WriteRequest",
    "amount_units",
    "idempotency_key",
    "identify",
    "page_limit",
    "parse_query",
    "read_body",
    "write_request",
]

Op = TypeVar("Op", bound=Operation)


class NoQuery(BaseModel):
    model_config = {"extra": "forbid"}


def identify(cfg: CreditsConfig) -> Caller:
    caller = request_caller(cfg)
    request.environ["callora_credits.user_id"] = caller.user_id
    return caller


def parse_query(model: type[BaseModel]) -> Any:
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


def read_body(model: type[BaseModel], cfg: CreditsConfig) -> tuple[Any, dict[str, Any]]:
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


def amount_units(
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


def idempotency_key() -> str:
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
class WriteRequest:
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
                units = amount_units(amount, self.cfg, signed=signed, allow_zero=allow_zero)
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


def write_request(model: type[BaseModel], *, admin: bool) -> WriteRequest:
    """Checks in this order: identity (401), scope (403), key and body (400)."""
    cfg = config()
    caller = identify(cfg)
    if admin:
        caller.require_admin(cfg)
    else:
        caller.require_service(cfg)
    key = idempotency_key()
    body, data = read_body(model, cfg)
    return WriteRequest(cfg, caller, key, body, data)


DEFAULT_PAGE_SIZE = 20


def page_limit(limit: int | None, cfg: CreditsConfig) -> int:
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
