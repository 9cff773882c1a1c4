"""Who is calling, and what they may do (SPEC §3).

The token is read from the host's ``JWT_HEADER_NAME`` header by this module
and verified the way Flask-JWT-Extended's ``decode_token`` verifies it, so
the host's keys (and decode key loader), algorithms, audience, issuer,
identity claim, leeway, blocklist and claims verification all apply. Only
header tokens are accepted: no cookies, no query strings. ``X-User-Id`` is
an identity only when the host opts in with ``CREDITS_TRUST_USER_ID_HEADER``
(an app behind an authenticating gateway).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import jwt
from flask import current_app, request
from flask_jwt_extended import decode_token
from flask_jwt_extended.config import config as jwt_config
from flask_jwt_extended.default_callbacks import default_decode_key_callback
from flask_jwt_extended.exceptions import JWTDecodeError, JWTExtendedException
from flask_jwt_extended.internal_utils import (
    custom_verification_for_token,
    verify_token_not_blocklisted,
)
from jwt.exceptions import InvalidSubjectError
from jwt.utils import base64url_decode
from werkzeug.datastructures import Headers

from ..config import CreditsConfig, config
from ..errors import Forbidden, Unauthorized

__all__ = ["Caller", "authenticate", "current_caller", "valid_identity"]

USER_ID_HEADER = "X-User-Id"
MAX_IDENTITY_LENGTH = 128


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: their identity and the scopes they hold."""

    user_id: str
    scopes: frozenset[str]
    via: Literal["jwt", "header"]

    def is_admin(self, cfg: CreditsConfig) -> bool:
        """Holds the admin scope (top-ups, refunds, other users' data)."""
        return cfg.admin_scope in self.scopes

    def is_service(self, cfg: CreditsConfig) -> bool:
        """Holds the service scope (charges and holds) or the admin scope."""
        return cfg.service_scope in self.scopes or self.is_admin(cfg)

    def require_admin(self, cfg: CreditsConfig) -> None:
        if not self.is_admin(cfg):
            raise Forbidden(f"This operation requires the {cfg.admin_scope} scope")

    def require_service(self, cfg: CreditsConfig) -> None:
        if not self.is_service(cfg):
            raise Forbidden(f"This operation requires the {cfg.service_scope} scope")

    def target_user(self, requested: str | None, cfg: CreditsConfig) -> str:
        """The user a read is about: the caller, or another one for an admin."""
        if requested is None or requested == self.user_id:
            return self.user_id
        if not self.is_admin(cfg):
            raise Forbidden("Reading another user's data requires the admin scope")
        return requested


def valid_identity(value: object) -> bool:
    """1-128 printable characters, not all blank."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_IDENTITY_LENGTH
        and value.isprintable()
        and not value.isspace()
    )


def _scopes(claims: Mapping[str, Any], claim: str) -> frozenset[str]:
    raw = claims.get(claim)
    if isinstance(raw, str):
        # RFC 6749 §3.3: scope tokens are separated by spaces (U+0020) only.
        return frozenset(token for token in raw.split(" ") if token)
    if isinstance(raw, list):
        return frozenset(item for item in raw if isinstance(item, str))
    return frozenset()


def _token_from_header(raw: str, header_type: str) -> str:
    value = raw.strip()
    if not header_type:
        token = value
    else:
        scheme, _, token = value.partition(" ")
        if scheme.lower() != header_type.lower():
            raise Unauthorized(
                f"Authorization header must use the {header_type} scheme",
                "INVALID_AUTH_HEADER",
            )
        token = token.strip()
    if not token:
        raise Unauthorized("Bearer token is missing", "MISSING_TOKEN")
    if any(ch in token for ch in " ,\t"):
        raise Unauthorized("Send exactly one token", "INVALID_TOKEN")
    return token


def _segment(token: str, index: int) -> dict[str, Any]:
    """A JSON object segment of ``token``, read without verifying anything."""
    try:
        value = json.loads(base64url_decode(token.split(".")[index]))
    except (IndexError, ValueError, TypeError, UnicodeDecodeError):
        raise jwt.DecodeError("Invalid token segment") from None
    if not isinstance(value, dict):
        raise jwt.DecodeError("Invalid token segment")
    return value


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify ``token`` as Flask-JWT-Extended's ``decode_token`` does: the
    host's decode key loader, algorithms, audience, issuer, leeway and
    identity claim. Returns ``(header, claims)``.

    ``decode_token`` parses a token three times (twice unverified, for the key
    loader); this parses it with verification once, and reads the loader's
    inputs from the segments only when the host has registered a loader. On
    a Flask-JWT-Extended that keeps its loader or settings elsewhere,
    ``decode_token`` itself runs.
    """
    manager = current_app.extensions["flask-jwt-extended"]
    key_loader = getattr(manager, "_decode_key_callback", None)
    verify_sub = getattr(jwt_config, "verify_sub", None)
    if key_loader is None or verify_sub is None:
        claims: dict[str, Any] = decode_token(token)
        return _segment(token, 0), claims
    if key_loader is default_decode_key_callback:
        secret = jwt_config.decode_key
    else:
        secret = key_loader(_segment(token, 0), _segment(token, 1))
    audience = jwt_config.decode_audience
    decoded = jwt.decode_complete(
        token,
        secret,
        algorithms=jwt_config.decode_algorithms,
        audience=audience,
        issuer=jwt_config.decode_issuer,
        leeway=jwt_config.leeway,
        options={"verify_aud": audience is not None, "verify_sub": verify_sub},
    )
    header: dict[str, Any] = decoded["header"]
    claims = decoded["payload"]
    if jwt_config.identity_claim_key not in claims:
        raise JWTDecodeError(f"Missing claim: {jwt_config.identity_claim_key}")
    # The defaults decode_token fills in, which blocklist and verification
    # loaders may read.
    claims.setdefault("type", "access")
    claims.setdefault("fresh", False)
    claims.setdefault("jti", None)
    return header, claims


def _verify(token: str) -> dict[str, Any]:
    try:
        header, claims = _decode(token)
        if claims.get("type") == "refresh":
            raise Unauthorized("A refresh token cannot be used here", "INVALID_TOKEN")
        verify_token_not_blocklisted(header, claims)
        custom_verification_for_token(header, claims)
    except jwt.ExpiredSignatureError:
        raise Unauthorized("Token has expired", "TOKEN_EXPIRED") from None
    except jwt.ImmatureSignatureError:
        raise Unauthorized("Token is not valid yet", "TOKEN_NOT_ACTIVE") from None
    except InvalidSubjectError:
        raise Unauthorized("Token identity must be a string", "MISSING_CLAIMS") from None
    except JWTExtendedException as exc:
        if str(exc).startswith("Missing claim"):
            raise Unauthorized("Token has no identity claim", "MISSING_CLAIMS") from None
        raise Unauthorized("Token is invalid", "INVALID_TOKEN") from None
    except jwt.PyJWTError:
        raise Unauthorized("Token is invalid", "INVALID_TOKEN") from None
    return claims


def authenticate(headers: Headers, cfg: CreditsConfig) -> Caller:
    """Resolve the caller from request headers, or raise :class:`Unauthorized`.

    With a ``JWTManager``, a present token header wins over ``X-User-Id``;
    without one, the token header is ignored (SPEC §3).
    """
    app_config = current_app.config
    has_jwt = "flask-jwt-extended" in current_app.extensions
    header_name = app_config.get("JWT_HEADER_NAME", "Authorization")
    raw = headers.get(header_name)
    if has_jwt and raw is not None:
        token = _token_from_header(raw, app_config.get("JWT_HEADER_TYPE", "Bearer"))
        claims = _verify(token)
        identity = claims.get(app_config.get("JWT_IDENTITY_CLAIM", "sub"))
        if not valid_identity(identity):
            raise Unauthorized(
                "Token identity must be 1-128 printable characters", "MISSING_CLAIMS"
            )
        return Caller(str(identity), _scopes(claims, cfg.scope_claim), "jwt")
    if cfg.trust_user_id_header:
        user_id = headers.get(USER_ID_HEADER)
        if user_id is not None:
            if not valid_identity(user_id):
                raise Unauthorized("X-User-Id must be 1-128 printable characters")
            return Caller(user_id, frozenset(), "header")
    raise Unauthorized()


def current_caller() -> Caller:
    """The caller of the current request, resolved exactly as the blueprint does.

    For host routes that need the same identity and scopes (a page, a report).
    Raises :class:`~callora_credits.errors.Unauthorized` when there is none;
    ``callora_credits.error_response(error)`` renders it as the blueprint
    would.
    """
    return authenticate(request.headers, config())
