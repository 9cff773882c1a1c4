"""A server-rendered billing page over the credits API (vanilla JS, no build).

``GET /billing`` renders the page; its script (``static/billing.js``) calls
the credits API with the signed-in user's token: the balance (paid and
promotional, and the next credit to expire), the grants
(``GET /api/billing/credits/grants``), the history, and
``GET /api/billing/credits/usage`` for the usage chart (30 days of spending
and top-ups, and when the credits run out at the current pace), which the
script draws as SVG. An admin token also gets a top-up form and a form that
gives promotional credit (``POST /api/billing/credits/grants``).

DEMO-ONLY sign-in: the demo has no login system, so ``make demo`` prints
``/billing?token=…`` links. The page's script moves the token into the tab's
``sessionStorage``, strips it from the address bar and sends it as
``Authorization: Bearer`` to the API. A real host signs users in its own way
and hands the page a token (or a session) that way instead.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, render_template

__all__ = ["PAGE_HEADERS", "bp"]

# The page's own security headers: scripts and styles from this origin only,
# API calls to this origin only, and the sign-in token never sent onwards as
# a Referer.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

bp = Blueprint("billing_page", __name__)


@bp.get("/billing")
def page() -> Response:
    """The billing page: an empty shell its script fills from the API."""
    response = Response(
        render_template(
            "billing/page.html",
            admin_scope=current_app.config["CREDITS_ADMIN_SCOPE"],
            scope_claim=current_app.config["CREDITS_SCOPE_CLAIM"],
        )
    )
    response.headers.update(PAGE_HEADERS)
    return response
