"""A server-rendered billing page over the credits API (vanilla JS, no build).

``GET /billing`` renders the page; its script (``static/billing.js``) calls
the credits API with the signed-in user's token. ``GET /billing/chart.svg``
draws the balance over the latest ledger entries, read with
``current_ledger().history(...)``: host code using the ledger directly,
without HTTP.

DEMO-ONLY sign-in: the demo has no login system, so ``make demo`` prints
``/billing?token=…`` links. The page's script moves the token into the tab's
``sessionStorage``, strips it from the address bar and sends it as
``Authorization: Bearer`` to the API. A real host signs users in its own way
and hands the page a token (or a session) that way instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template, request
from flask_jwt_extended import get_jwt, get_jwt_identity, jwt_required

from callora_credits import Entry, current_ledger, format_units

__all__ = ["CHART_ENTRIES", "Chart", "bp", "build_chart"]

#: How many of the latest ledger entries the chart draws.
CHART_ENTRIES = 60
MAX_USER_ID_LENGTH = 128

# The chart's geometry, in SVG user units (the viewBox scales it to the page).
WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 72, 16, 16, 32

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


@bp.get("/billing/chart.svg")
@jwt_required()
def chart() -> Any:
    """The balance over the latest entries, as SVG (the API's auth rules).

    The caller's own, or, for a caller with the admin scope, ``?user_id=``'s.
    """
    caller = str(get_jwt_identity())
    user_id = request.args.get("user_id") or caller
    if len(user_id) > MAX_USER_ID_LENGTH:
        return _error(400, "VALIDATION_ERROR", "user_id may be at most 128 characters")
    if user_id != caller and not _is_admin(get_jwt()):
        return _error(403, "FORBIDDEN", "Reading another user's data requires the admin scope")
    entries = current_ledger().history(user_id, limit=CHART_ENTRIES).items
    svg = render_template("billing/chart.svg", chart=build_chart(user_id, entries))
    return Response(svg, mimetype="image/svg+xml", headers={"Cache-Control": "no-store"})


def _is_admin(claims: dict[str, Any]) -> bool:
    # The same claim and scope the credits API reads (CREDITS_SCOPE_CLAIM).
    scopes = claims.get(current_app.config["CREDITS_SCOPE_CLAIM"], [])
    if isinstance(scopes, str):
        scopes = scopes.split()
    return current_app.config["CREDITS_ADMIN_SCOPE"] in scopes


def _error(status: int, code: str, message: str) -> Any:
    """An error in the credits API's shape, so the page reads both alike."""
    return jsonify(code=code, message=message, details=[]), status


@dataclass(frozen=True)
class Chart:
    """What ``chart.svg`` draws: coordinates as strings, labels as text."""

    user_id: str
    width: int
    height: int
    points: list[tuple[str, str]]  # (x, y), oldest first, starting before the first entry
    balances: list[int]  # the balance at each point, in units
    top_label: str
    plot_left: int
    plot_right: int
    top_y: int
    bottom_y: int
    first_label: str
    last_label: str

    @property
    def line(self) -> str:
        """The ``d`` of the balance line: M x,y L x,y …"""
        return " ".join(
            f"{'M' if index == 0 else 'L'}{x},{y}" for index, (x, y) in enumerate(self.points)
        )

    @property
    def area(self) -> str:
        """The ``d`` of the shaded area under the line."""
        if not self.points:
            return ""
        first_x, last_x = self.points[0][0], self.points[-1][0]
        return f"{self.line} L{last_x},{self.bottom_y} L{first_x},{self.bottom_y} Z"

    @property
    def summary(self) -> str:
        """A sentence for screen readers (the SVG's <desc>)."""
        if not self.balances:
            return "No ledger entries yet."
        return (
            f"Over the last {len(self.balances) - 1} entries the balance went from "
            f"{usdc_label(self.balances[0])} to {usdc_label(self.balances[-1])} USDC."
        )


def usdc_label(units: int) -> str:
    """A short label: ``"98.75"`` for 98.7500000, at least two decimals."""
    whole, _, fraction = format_units(units).partition(".")
    return f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"


def _scaled(offset: int, value: int, span: int, pixels: int) -> str:
    """``offset + pixels * value / span`` to two decimals, in integers only:
    amounts never meet a float, not even on their way to a pixel."""
    hundredths = offset * 100 + (pixels * 100 * value) // span if span else offset * 100
    return f"{hundredths // 100}.{hundredths % 100:02d}"


def build_chart(user_id: str, newest_first: Sequence[Entry]) -> Chart:
    """The chart of a page of history (``history()`` returns newest first).

    It starts from the balance before the oldest entry shown, so a single
    top-up draws a rise from where the balance was.
    """
    entries = list(reversed(newest_first))
    balances = []
    if entries:
        balances = [entries[0].balance_after_units - entries[0].amount_units]
        balances += [entry.balance_after_units for entry in entries]
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    highest = max(balances, default=0)
    points = [
        (
            _scaled(LEFT, index, len(balances) - 1, plot_width),
            _scaled(TOP, highest - balance, highest, plot_height)
            if highest
            else str(TOP + plot_height),
        )
        for index, balance in enumerate(balances)
    ]
    return Chart(
        user_id=user_id,
        width=WIDTH,
        height=HEIGHT,
        points=points,
        balances=balances,
        top_label=usdc_label(highest),
        plot_left=LEFT,
        plot_right=WIDTH - RIGHT,
        top_y=TOP,
        bottom_y=TOP + plot_height,
        first_label=_when(entries[0]) if entries else "",
        last_label=_when(entries[-1]) if entries else "",
    )


def _when(entry: Entry) -> str:
    return entry.created_at.strftime("%Y-%m-%d %H:%M UTC")
