"""The OpenAPI 3.1 document, built from the blueprint's operations and the
pydantic models its views validate with, so a new route appears by itself."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .blueprint import OPERATIONS, Operation
from .schemas import ErrorOut

__all__ = ["build_document"]

_REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"<(?:[a-z]+:)?([a-zA-Z_][a-zA-Z0-9_]*)>")

_ERROR_TEXT = {
    400: "Invalid request (VALIDATION_ERROR, IDEMPOTENCY_KEY_REQUIRED)",
    401: "Not authenticated (UNAUTHORIZED, INVALID_AUTH_HEADER, MISSING_TOKEN, "
    "TOKEN_EXPIRED, TOKEN_NOT_ACTIVE, INVALID_TOKEN, MISSING_CLAIMS)",
    402: "INSUFFICIENT_CREDITS",
    403: "FORBIDDEN: the token lacks the scope",
    404: "NOT_FOUND",
    409: "Conflict (HOLD_NOT_PENDING, DUPLICATE_REFERENCE, IDEMPOTENCY_IN_PROGRESS)",
    413: "PAYLOAD_TOO_LARGE",
    422: "Unprocessable (IDEMPOTENCY_CONFLICT, HOLD_AMOUNT_EXCEEDED, "
    "REFUND_EXCEEDS_CHARGE, BALANCE_LIMIT_EXCEEDED)",
    500: "INTERNAL_SERVER_ERROR",
}


def _version() -> str:
    try:
        return version("callora-credits")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0.0.0"


def _models() -> list[type[BaseModel]]:
    seen: dict[str, type[BaseModel]] = {"ErrorOut": ErrorOut}
    for op in OPERATIONS:
        for model in (op.response, op.body):
            if model is not None:
                seen[model.__name__] = model
    return list(seen.values())


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", None)
        param: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if description:
            param["description"] = description
        params.append(param)
    return params


def _error_ref() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(model="ErrorOut")}}}


def _operation(op: Operation, path_params: list[str]) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in path_params
    ]
    if op.query is not None:
        parameters.extend(_query_parameters(op.query))
    if op.idempotent_post:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                "description": "Makes the request safe to retry (24 h).",
            }
        )
    success: dict[str, Any] = {"description": op.summary}
    if op.response is not None:
        success["content"] = {
            "application/json": {"schema": {"$ref": _REF.format(model=op.response.__name__)}}
        }
    else:
        success["content"] = {"application/json": {"schema": {"type": "object"}}}
    responses: dict[str, Any] = {str(op.success): success}
    for status in sorted(set(op.errors) | {500}):
        responses[str(status)] = {
            "description": _ERROR_TEXT.get(status, "Error"),
            "content": _error_ref(),
        }
    doc: dict[str, Any] = {
        "operationId": op.endpoint,
        "summary": op.summary,
        "tags": list(op.tags),
        "x-credits-scope": op.scope,
        "responses": responses,
    }
    if op.description:
        doc["description"] = op.description
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {
            "required": bool(op.body.model_json_schema().get("required")),
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=op.body.__name__)}}
            },
        }
    if op.scope != "anyone":
        doc["security"] = [{"bearerAuth": []}]
    else:
        doc["security"] = []
    return doc


def build_document(prefix: str = "/api/billing") -> dict[str, Any]:
    """The OpenAPI 3.1 document for the blueprint mounted at ``prefix``."""
    _, defs = models_json_schema([(model, "validation") for model in _models()], ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        path_params = _PARAM.findall(op.rule)
        path = prefix + _PARAM.sub(r"{\1}", op.rule)
        paths.setdefault(path, {})[op.method.lower()] = _operation(op, path_params)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "callora-credits",
            "version": _version(),
            "description": "Prepaid USDC credits: balances, top-ups, charges, "
            "holds, refunds and a paginated ledger. Amounts are strings with "
            "exactly 7 decimals.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }
