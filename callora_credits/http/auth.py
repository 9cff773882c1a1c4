"""Who is calling, and what they may do.

A token is verified by Flask-JWT-Extended itself, through
``verify_jwt_in_request(locations=["headers"])``, so the credits routes accept
a token exactly when the host's own ``@jwt_required()`` routes accept it from
the headers: every ``JWT_*`` setting and loader of the host applies. Only the
header is read, whatever ``JWT_TOKEN_LOCATION`` says. ``X-User-Id`` is an
identity only when the host opts in with ``CREDITS_TRUST_USER_ID_HEADER`` (an
app behind an authenticating gateway).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from flask import current_app, request
from flask_jwt_extended import get_jwt_identity, verify_jwt_in_request
from flask_jwt_extended.exceptions import (
    InvalidHeaderError,
    JWTDecodeError,
    JWTExtendedException,
    NoAuthorizationError,
    RevokedTokenError,
    WrongTokenError,
)
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidSubjectError,
    PyJWTError,
)
from werkzeug.datastructures import Headers

from ..config import CreditsConfig, config
from ..core.operations import valid_identity
from ..errors import Forbidden, Unauthorized

__all__ = [
    "Caller",
    "authenticate",
    "current_caller",
    "request_caller",
    "scope_required",
    "valid_identity",
]

USER_ID_HEADER = "X-User-Id"
_JWT_EXTENSION = "flask-jwt-extended"


def scope_required(scope: str, operation: str = "This operation") -> Forbidden:
    """The 403 for a caller without ``scope`` (the configured scope string)."""
    return Forbidden(f"{operation} requires the {scope} scope")


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
        """Raise :class:`~callora_credits.errors.Forbidden` without the admin scope."""
        if not self.is_admin(cfg):
            raise scope_required(cfg.admin_scope)

    def require_service(self, cfg: CreditsConfig) -> None:
        """Raise :class:`~callora_credits.errors.Forbidden` without the service
        (or admin) scope."""
        if not self.is_service(cfg):
            raise scope_required(cfg.service_scope)

    def target_user(self, requested: str | None, cfg: CreditsConfig) -> str:
        """The user a read is about: the caller, or another one for an admin."""
        if requested is None or requested == self.user_id:
            return self.user_id
        if not self.is_admin(cfg):
            raise scope_required(cfg.admin_scope, "Reading another user's data")
        return requested


def _scopes(claims: Mapping[str, Any], claim: str) -> frozenset[str]:
    raw = claims.get(claim)
    if isinstance(raw, str):
        # RFC 6749 §3.3: scope tokens are separated by spaces (U+0020) only.
        return frozenset(token for token in raw.split(" ") if token)
    if isinstance(raw, list):
        return frozenset(item for item in raw if isinstance(item, str))
    return frozenset()


#: How each refusal of Flask-JWT-Extended or PyJWT is reported: the first row
#: whose exception class matches gives the code and message. A header refusal
#: is ``MISSING_TOKEN`` instead when the header holds no token at all.
REFUSALS: tuple[tuple[type[Exception], str, str], ...] = (
    (NoAuthorizationError, "INVALID_AUTH_HEADER", "Send one token, as '{expected}'"),
    (InvalidHeaderError, "INVALID_AUTH_HEADER", "Send one token, as '{expected}'"),
    (ExpiredSignatureError, "TOKEN_EXPIRED", "Token has expired"),
    (ImmatureSignatureError, "TOKEN_NOT_ACTIVE", "Token is not valid yet"),
    # PyJWT's check that `sub` is a string.
    (InvalidSubjectError, "MISSING_CLAIMS", "Token identity must be a string"),
    # Flask-JWT-Extended raises it for a missing identity claim only (and a
    # missing csrf claim, which header tokens never need).
    (JWTDecodeError, "MISSING_CLAIMS", "Token has no identity claim"),
    (WrongTokenError, "INVALID_TOKEN", "A refresh token cannot be used here"),
    (RevokedTokenError, "INVALID_TOKEN", "Token has been revoked"),
    # A `token_verification_loader` or `user_lookup_loader` that said no.
    (JWTExtendedException, "INVALID_TOKEN", "Token is invalid"),
    # Signature, algorithm, malformed, audience, issuer.
    (PyJWTError, "INVALID_TOKEN", "Token is invalid"),
)
_HEADER_REFUSALS = (NoAuthorizationError, InvalidHeaderError)


def _refusal(error: Exception, value: str) -> Unauthorized:
    """The 401 for a token header (``value``) that Flask-JWT-Extended refused."""
    code, message = next((c, m) for kind, c, m in REFUSALS if isinstance(error, kind))
    if not isinstance(error, _HEADER_REFUSALS):
        return Unauthorized(message, code)
    app_config = current_app.config
    name, scheme = app_config["JWT_HEADER_NAME"], app_config["JWT_HEADER_TYPE"]
    # This only names the refusal; whether a header is accepted is decided by
    # Flask-JWT-Extended alone. InvalidHeaderError means it found exactly one
    # field starting with the scheme and could not take one token from it.
    empty = not value.replace(",", " ").split()
    scheme_alone = isinstance(error, InvalidHeaderError) and any(
        field.split() == [scheme] for field in value.split(",")
    )
    if empty or scheme_alone:
        return Unauthorized(f"The {name} header holds no token", "MISSING_TOKEN")
    expected = f"{name}: {scheme} <token>" if scheme else f"{name}: <token>"
    return Unauthorized(message.format(expected=expected), code)


def _token_caller(value: str, cfg: CreditsConfig) -> Caller:
    try:
        verified = verify_jwt_in_request(locations=["headers"])
    except (JWTExtendedException, PyJWTError) as error:
        raise _refusal(error, value) from None
    if verified is None:
        # Flask-JWT-Extended verifies nothing for an exempt method (OPTIONS),
        # so there is no identity to act for.
        raise Unauthorized()
    _, claims = verified  # what get_jwt() returns, without looking it up again
    identity = get_jwt_identity()
    if not valid_identity(identity):
        raise Unauthorized("Token identity must be 1-128 printable characters", "MISSING_CLAIMS")
    return Caller(identity, _scopes(claims, cfg.scope_claim), "jwt")


def authenticate(headers: Headers, cfg: CreditsConfig) -> Caller:
    """Resolve the caller of the current request, or raise :class:`Unauthorized`.

    ``headers`` are the current request's headers. With a ``JWTManager``, a
    present token header (``JWT_HEADER_NAME``) is verified by
    Flask-JWT-Extended and wins over ``X-User-Id``, even when it is refused;
    without one, the token header is ignored.
    """
    if _JWT_EXTENSION in current_app.extensions:
        value = headers.get(current_app.config["JWT_HEADER_NAME"])
        if value is not None:
            return _token_caller(value, cfg)
    if cfg.trust_user_id_header:
        user_id = headers.get(USER_ID_HEADER)
        if user_id is not None:
            if not valid_identity(user_id):
                raise Unauthorized("X-User-Id must be 1-128 printable characters")
            return Caller(user_id, frozenset(), "header")
    raise Unauthorized()


_CALLER_KEY = "callora_credits.caller"


def request_caller(cfg: CreditsConfig) -> Caller:
    """:func:`authenticate` once per request: the rate limiter keys on the
    caller before the view runs, and the view then reuses the same answer
    (the caller, or the same 401) instead of verifying the token again."""
    environ = request.environ
    found: Caller | Unauthorized | None = environ.get(_CALLER_KEY)
    if found is None:
        try:
            found = authenticate(request.headers, cfg)
        except Unauthorized as refused:
            found = refused
        environ[_CALLER_KEY] = found
    if isinstance(found, Unauthorized):
        raise Unauthorized(found.message, found.code)
    return found


def current_caller() -> Caller:
    """The caller of the current request, resolved exactly as the blueprint does.

    For host routes that need the same identity and scopes (a page, a report).
    Raises :class:`~callora_credits.errors.Unauthorized` when there is none;
    ``callora_credits.error_response(error)`` renders it as the blueprint
    would.
    """
    return authenticate(request.headers, config())
