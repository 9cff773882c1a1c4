"""The OpenAPI 3.1 document, built from the blueprint's operations and the
pydantic models its views validate with, so a new route appears by itself.

Each operation's error responses come from the error codes it declares: the
statuses, their descriptions and the ``code`` values the response schema
allows. Scope names are the configured ones when the document is built in an
app context (served, or printed by ``flask credits openapi``).
"""

from __future__ import annotations

import copy
import inspect
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import has_app_context
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ..config import CreditsConfig, config
from .blueprint import OPERATIONS, Route
from .schemas import ErrorOut

__all__ = ["build_document"]

_REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"<(?:[a-z]+:)?([a-zA-Z_][a-zA-Z0-9_]*)>")

#: What each error code means, for the response descriptions.
ERROR_MEANINGS = {
    "VALIDATION_ERROR": "the request is malformed: a bad amount, an unknown or missing "
    "field, an unknown or repeated query key, a body that is not a JSON object. "
    "`details` names each field and says what to send.",
    "IDEMPOTENCY_KEY_REQUIRED": "the `Idempotency-Key` header is missing or empty.",
    "UNAUTHORIZED": "no identity: no token, and no trusted `X-User-Id`.",
    "INVALID_AUTH_HEADER": "the token header does not use the expected scheme "
    "(`JWT_HEADER_TYPE`, `Bearer` by default).",
    "MISSING_TOKEN": "the scheme is followed by no token.",
    "TOKEN_EXPIRED": "the token has expired.",
    "TOKEN_NOT_ACTIVE": "the token is not valid yet (`nbf`).",
    "INVALID_TOKEN": "the token is malformed, badly signed, revoked, a refresh token, "
    "or for another audience or issuer.",
    "MISSING_CLAIMS": "the token's identity claim is missing, not a string, or not "
    "1-128 printable characters.",
    "FORBIDDEN": "the caller lacks the scope this operation needs.",
    "INSUFFICIENT_CREDITS": "the available balance (the balance minus pending holds) "
    "does not cover the amount.",
    "NOT_FOUND": "the hold or ledger entry in the path does not exist.",
    "METHOD_NOT_ALLOWED": "the path does not accept this method.",
    "HOLD_NOT_PENDING": "the hold was already captured, released or has expired.",
    "GRANT_NOT_ACTIVE": "the grant is already voided, expired or depleted: nothing is "
    "left to void.",
    "DUPLICATE_REFERENCE": "the user already has an entry of this type with this "
    "`reference`; `details[0].transaction_id` names it.",
    "IDEMPOTENCY_IN_PROGRESS": "a request with this key is still running; retry with "
    "the same key later.",
    "PAYLOAD_TOO_LARGE": "the body is larger than `CREDITS_MAX_BODY_BYTES`.",
    "IDEMPOTENCY_CONFLICT": "this key was already used by this caller, on this path, "
    "with a different body.",
    "HOLD_AMOUNT_EXCEEDED": "the capture is larger than the held amount.",
    "REFUND_EXCEEDS_CHARGE": "the refund is larger than what is left of the charge.",
    "BALANCE_LIMIT_EXCEEDED": "the balance, with the grants still scheduled, would pass "
    "`CREDITS_MAX_BALANCE_USDC`.",
    "RATE_LIMITED": "the caller used up a rate limit (`CREDITS_RATE_LIMIT`, "
    "`CREDITS_RATE_LIMIT_WRITE`); retry after `Retry-After` seconds.",
    "SERVICE_UNAVAILABLE": "the database is unreachable, not accepting writes, or kept "
    "failing transiently (deadlocks, lock waits) past the bounded retries. Nothing was "
    "applied (unless the connection was lost during `COMMIT`); never stored under the "
    "key: send the same request with the same `Idempotency-Key` after `Retry-After` "
    "seconds.",
    "INTERNAL_SERVER_ERROR": "an unexpected failure; the body says nothing more, the "
    "log has the detail under the request id.",
}

_STATUS_TEXT = {
    400: "Bad request",
    401: "Not authenticated",
    402: "Payment required",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Payload too large",
    422: "Unprocessable",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}

# reST markup of docstrings, rewritten as the CommonMark OpenAPI descriptions use.
_LITERAL = re.compile(r"``(.+?)``")
_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`(~)?(?:([^`<]+?)\s*<[^`>]+>|([^`]+))`")
_LIST_ITEM = re.compile(r"\s*(?:[-*]|[0-9]+\.)\s")


def _role_text(match: re.Match[str]) -> str:
    short, label, target = match.groups()
    if label is not None:
        return str(label)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def _reflow(paragraph: str) -> str:
    """The lines of ``paragraph`` joined, each list item kept on its own line."""
    lines: list[str] = []
    for line in paragraph.splitlines():
        if lines and not _LIST_ITEM.match(line):
            lines[-1] = f"{lines[-1]} {line.strip()}"
        else:
            lines.append(" ".join(line.split()))
    return "\n".join(" ".join(line.split()) for line in lines)


def prose(text: str, cfg: CreditsConfig) -> str:
    """``text`` (a docstring or a schema description) as clean CommonMark.

    Indentation is removed, the lines of a paragraph are joined, reST literals
    and roles become code spans, and "the admin scope" / "the service scope"
    name the configured scope strings.
    """
    text = inspect.cleandoc(text)
    text = _LITERAL.sub(r"`\1`", text)
    text = _ROLE.sub(_role_text, text)
    paragraphs = [_reflow(part) for part in re.split(r"\n\s*\n", text)]
    text = "\n\n".join(part for part in paragraphs if part)
    text = text.replace("the admin scope", f"the `{cfg.admin_scope}` scope")
    return text.replace("the service scope", f"the `{cfg.service_scope}` scope")


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


def _scope_text(op: Route, cfg: CreditsConfig) -> tuple[str, str]:
    """The ``x-credits-scope`` value and the sentence saying who may call."""
    admin, service = cfg.admin_scope, cfg.service_scope
    if op.scope == "admin":
        return admin, f"Requires the `{admin}` scope."
    if op.scope == "service":
        return service, f"Requires the `{service}` scope (`{admin}` includes it)."
    if op.scope == "self":
        return (
            f"self; {admin} for ?user_id=",
            "Any authenticated caller, for their own data; another user's, named "
            f"with `?user_id=`, requires the `{admin}` scope.",
        )
    if op.scope == "owner":
        return (
            f"owner or {admin}",
            f"The owner, or a caller with the `{admin}` scope; anyone else gets the "
            "404 of an id that does not exist.",
        )
    return "anyone", "No authentication."


def _security(op: Route, cfg: CreditsConfig) -> list[dict[str, list[str]]]:
    # OpenAPI 3.1 lets a non-OAuth requirement list the roles it needs.
    if op.scope == "anyone":
        return []
    if op.scope == "admin":
        return [{"bearerAuth": [cfg.admin_scope]}]
    if op.scope == "service":
        return [{"bearerAuth": [cfg.service_scope]}, {"bearerAuth": [cfg.admin_scope]}]
    return [{"bearerAuth": []}]


def _meaning(code: str, op: Route) -> str:
    """What ``code`` means for ``op``: a few codes say which object or scope."""
    if "<hold_id>" in op.rule:
        thing = "hold"
    elif "<grant_id>" in op.rule:
        thing = "grant"
    else:
        thing = "ledger entry"
    if code == "FORBIDDEN" and op.scope == "self":
        return "another user was named with `?user_id=` without the admin scope."
    if code == "FORBIDDEN" and op.scope == "admin":
        return "the caller lacks the admin scope."
    if code == "FORBIDDEN" and op.scope == "service":
        return "the caller has neither the service scope nor the admin scope."
    if code == "NOT_FOUND" and op.scope == "owner":
        return f"no such {thing}, or another user's: the same answer, so ids cannot be probed."
    if code == "NOT_FOUND":
        return f"no such {thing}."
    if code == "DUPLICATE_REFERENCE" and op.rule == "/credits/holds":
        return "the user already has a hold with this `reference`."
    if code == "DUPLICATE_REFERENCE" and op.rule == "/credits/grants":
        return (
            "the user already has a grant made by this operation with this `reference`; "
            "`details[0].grant_id` names it, and `details[0].transaction_id` its entry "
            "(null while it is scheduled)."
        )
    return ERROR_MEANINGS[code]


def _error_response(status: int, codes: tuple[str, ...], op: Route) -> dict[str, Any]:
    if len(codes) == 1:
        description = f"`{codes[0]}`: {_meaning(codes[0], op)}"
    else:
        items = "\n".join(f"- `{code}`: {_meaning(code, op)}" for code in codes)
        description = f"{_STATUS_TEXT.get(status, 'Error')}:\n\n{items}"
    schema = {
        "allOf": [
            {"$ref": _REF.format(model="ErrorOut")},
            {"type": "object", "properties": {"code": {"enum": list(codes)}}},
        ]
    }
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    if status == 503:
        response["headers"] = {"Retry-After": copy.deepcopy(_RETRY_AFTER)}
    return response


_RETRY_AFTER: dict[str, Any] = {
    "description": "Whole seconds to wait before sending the same request again.",
    "schema": {"type": "integer", "minimum": 1},
}


# Conditional reads: every 200 to a GET is tagged, and a matching tag is a 304.
# Copied into each operation: the document's descriptions are rewritten in place.
_ETAG: dict[str, Any] = {
    "description": "A strong entity tag of this body as this user's data; send it back in "
    "`If-None-Match` to get a 304 while the data is unchanged.",
    "schema": {"type": "string", "pattern": '^"[0-9a-f]{32}"$'},
}
_IF_NONE_MATCH: dict[str, Any] = {
    "name": "If-None-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "`ETag`s of earlier responses (`W/` prefixes allowed, comma-separated), "
    "or `*`: a 304 without a body when one matches the current response. The "
    "authentication and query checks run first.",
}


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds} s"


def _operation(op: Route, path_params: list[str], cfg: CreditsConfig) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in path_params
    ]
    if op.query is not None:
        parameters.extend(_query_parameters(op.query))
    if op.method == "GET":
        parameters.append(copy.deepcopy(_IF_NONE_MATCH))
    if op.idempotent_post:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                "description": "1-255 printable ASCII characters. A retry with the same "
                "key and body replays the first answer instead of running again "
                f"(for {_duration(cfg.idempotency_ttl_seconds)}).",
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
    if op.method == "GET":
        success["headers"] = {"ETag": copy.deepcopy(_ETAG)}
        responses["304"] = {
            "description": "Not modified: `If-None-Match` names this response's `ETag`. "
            "No body; the `ETag` is sent again.",
            "headers": {"ETag": copy.deepcopy(_ETAG)},
        }
    for status, codes in op.errors_by_status().items():
        responses[str(status)] = _error_response(status, codes, op)
    scope, who = _scope_text(op, cfg)
    description = f"{op.description}\n\n{who}" if op.description.strip() else who
    doc: dict[str, Any] = {
        "operationId": op.endpoint,
        "summary": op.summary,
        "description": description,
        "tags": list(op.tags),
        "x-credits-scope": scope,
        "security": _security(op, cfg),
        "responses": responses,
    }
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {
            "required": bool(op.body.model_json_schema().get("required")),
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model=op.body.__name__)}}
            },
        }
    return doc


def _clean_descriptions(node: Any, cfg: CreditsConfig) -> None:
    """Every ``description`` in the document as :func:`prose`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = prose(value, cfg)
            else:
                _clean_descriptions(value, cfg)
    elif isinstance(node, list):
        for item in node:
            _clean_descriptions(item, cfg)


def build_document(
    prefix: str = "/api/billing", cfg: CreditsConfig | None = None
) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the blueprint mounted at ``prefix``.

    ``cfg`` names the scopes; by default the current app's configuration in an
    app context, else the defaults.
    """
    if cfg is None:
        cfg = config() if has_app_context() else CreditsConfig({})
    _, defs = models_json_schema([(model, "validation") for model in _models()], ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        path_params = _PARAM.findall(op.rule)
        path = prefix + _PARAM.sub(r"{\1}", op.rule)
        paths.setdefault(path, {})[op.method.lower()] = _operation(op, path_params, cfg)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "callora-credits",
            "version": _version(),
            "description": "Prepaid USDC credits: balances, top-ups, credit grants, "
            "charges, holds, refunds and a paginated ledger. Amounts are strings with "
            "exactly 7 decimals. Every error is a JSON body with `code`, `message`, "
            "`requestId` and `details`; any operation may also answer 500.",
        },
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "A JWT verified with the host's Flask-JWT-Extended "
                    f"settings; its `{cfg.scope_claim}` claim lists the caller's scopes "
                    "(a space-separated string or a list).",
                }
            },
        },
    }
    _clean_descriptions(document, cfg)
    return document
