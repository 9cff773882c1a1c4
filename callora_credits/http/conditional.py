"""Conditional reads: a strong ``ETag`` on every 200 to a GET, and a 304 for a
client whose ``If-None-Match`` names it.

The tag is a hash of the body and of the user whose data it is, so two users'
equal bodies (two empty histories) have two tags. The views authenticate
before they answer, so a 304 is only ever made from a 200 the caller was
allowed to see: it never skips the auth checks.
"""

from __future__ import annotations

import hashlib

from flask import Response, request

__all__ = ["apply_conditional", "data_of", "entity_tag"]

_SUBJECT = "callora_credits.subject"
# The caller, as the views record it when they authenticate.
_CALLER = "callora_credits.user_id"
# Headers that describe a body; a 304 has none.
_BODY_HEADERS = ("Content-Type", "Content-Length")


def data_of(user_id: str) -> None:
    """Record whose data this request's response shows: its ``ETag`` is theirs.

    A view that does not say is taken to show its caller's data.
    """
    request.environ[_SUBJECT] = user_id


def entity_tag(body: bytes, user_id: str) -> str:
    """The strong entity tag (quoted) of ``body`` shown as ``user_id``'s data."""
    # A user id is printable text, never NUL, so the two parts cannot run into
    # each other.
    digest = hashlib.sha256(user_id.encode("utf-8") + b"\x00" + body).hexdigest()
    return f'"{digest[:32]}"'


def apply_conditional(response: Response) -> Response:
    """Tag a 200 to a GET (or HEAD); answer 304 when ``If-None-Match`` matches.

    The comparison is weak, as HTTP asks for ``If-None-Match``: ``W/"…"`` and
    ``"…"`` both match, as does any tag of a list, and ``*``. The 304 keeps
    every header but those of the body.
    """
    if request.method not in ("GET", "HEAD") or response.status_code != 200:
        return response
    environ = request.environ
    subject = environ.get(_SUBJECT) or environ.get(_CALLER) or ""
    tag = entity_tag(response.get_data(), subject)
    response.headers["ETag"] = tag
    if request.if_none_match.contains_weak(tag[1:-1]):
        response.status_code = 304
        response.set_data(b"")
        for name in _BODY_HEADERS:
            response.headers.pop(name, None)
    return response
