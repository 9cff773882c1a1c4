"""Run the example host app with a demo balance, print its billing page's
sign-in links and working curl commands.

    make demo            # or: .venv/bin/python examples/demo.py

Uses ``DATABASE_URL`` (default: ``demo.sqlite3`` in the repository root) and
``JWT_SECRET_KEY`` (default: a public demo-only key), applies the host's
migrations and the library's, credits "alice" once, prints the billing page's
URL (a DEMO-ONLY sign-in link for alice and one for an admin) and curl
commands with ready-made tokens, then serves on http://127.0.0.1:$PORT
(default 5000).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import flask_migrate
from flask import Flask, url_for
from flask_jwt_extended import create_access_token

import callora_credits
from callora_credits import migrate as credits_migrate

# Run as a script from anywhere (a fresh clone, `make demo`): find host_app.
EXAMPLES_DIR = Path(__file__).resolve().parent
if str(EXAMPLES_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLES_DIR))

from host_app import DEMO_JWT_SECRET_KEY, MIGRATIONS_DIR, create_app, db, paid_api  # noqa: E402

DEMO_USER = "alice"
DEMO_ADMIN = "demo_admin"
DEMO_GATEWAY = "demo_gateway"
SEED_USDC = "100"
SEED_REFERENCE = "demo-seed"
#: Demo tokens live long so pasted commands keep working for a while.
TOKEN_LIFETIME = timedelta(days=30)


@dataclass(frozen=True)
class DemoRequest:
    """One request the demo prints as a curl command."""

    title: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    #: Print the response headers too (``curl -i``), e.g. X-Credits-Charged.
    show_headers: bool = False

    def curl(self, base_url: str) -> str:
        """The request as a shell-quoted curl command against ``base_url``."""
        words = ["curl", "-sS"]
        if self.show_headers:
            words.append("-i")
        if self.method != "GET":
            words += ["-X", self.method]
        words.append(base_url + self.path)
        for name, value in self.headers.items():
            words += ["-H", f"{name}: {value}"]
        if self.body is not None:
            words += ["--data", self.body]
        return shlex.join(words)


def apply_migrations(app: Flask) -> None:
    """The host's history (Flask-Migrate), then the library's (its own table)."""
    with app.app_context():
        flask_migrate.upgrade(directory=str(MIGRATIONS_DIR))
        credits_migrate.upgrade(db.engine)


def seed_balance(app: Flask) -> str:
    """Credit the demo user once, through the ledger API; say what happened."""
    with app.app_context():
        ledger = callora_credits.current_ledger()
        if not hasattr(ledger, "top_up"):
            return "ledger API has no top_up yet: not seeding a balance"
        try:
            entry = ledger.top_up(
                DEMO_USER,
                callora_credits.parse_amount(SEED_USDC, max_units=ledger.config.max_amount_units),
                reference=SEED_REFERENCE,
                description="demo seed",
                actor_id="demo",
            )
        except callora_credits.CreditsError as error:
            # The reference credits once, ever: a later run finds it taken.
            if error.code != "DUPLICATE_REFERENCE":
                raise
            return f"{DEMO_USER} was seeded by an earlier run"
        return (
            f"seeded {DEMO_USER}: +{callora_credits.format_units(entry.amount_units)} USDC, "
            f"balance {callora_credits.format_units(entry.balance_after_units)}"
        )


def _token(identity: str, scope: str | None = None) -> str:
    claims = {"scope": scope} if scope else None
    return create_access_token(
        identity=identity, additional_claims=claims, expires_delta=TOKEN_LIFETIME
    )


def demo_requests(app: Flask) -> list[DemoRequest]:
    """The quickstart requests, with tokens signed by the app's JWT key."""
    with app.app_context():
        user = _token(DEMO_USER)
        admin = _token(DEMO_ADMIN, app.config["CREDITS_ADMIN_SCOPE"])
        gateway = _token(DEMO_GATEWAY, app.config["CREDITS_SERVICE_SCOPE"])
    return [
        DemoRequest(
            f"{DEMO_USER}'s own balance (user token)",
            "GET",
            "/api/billing/credits",
            {"Authorization": f"Bearer {user}"},
        ),
        DemoRequest(
            f"{DEMO_USER}'s balance read by an admin (scope credits:admin)",
            "GET",
            f"/api/billing/credits?user_id={DEMO_USER}",
            {"Authorization": f"Bearer {admin}"},
        ),
        DemoRequest(
            "charge 1.25 USDC as the API gateway (scope credits:charge); "
            "re-running replays the same response",
            "POST",
            "/api/billing/credits/charge",
            {
                "Authorization": f"Bearer {gateway}",
                "Content-Type": "application/json",
                "Idempotency-Key": "demo-charge-1",
            },
            f'{{"user_id": "{DEMO_USER}", "amount_usdc": "1.2500000"}}',
        ),
        DemoRequest(
            f"a paid call: the host's GET /api/quote costs {paid_api.QUOTE_PRICE_USDC} USDC, "
            f"charged to {DEMO_USER} (see X-Credits-Charged and X-Credits-Balance)",
            "GET",
            "/api/quote",
            {"Authorization": f"Bearer {user}"},
            show_headers=True,
        ),
        DemoRequest(
            f"a paid call that lowers its price: GET /api/echo holds "
            f"{paid_api.ECHO_PRICE_USDC} USDC, a short text costs "
            f"{paid_api.ECHO_SHORT_PRICE_USDC} (set_final_price)",
            "GET",
            "/api/echo?text=hello",
            {"Authorization": f"Bearer {user}"},
            show_headers=True,
        ),
        DemoRequest(
            f"{DEMO_USER}'s transaction history",
            "GET",
            "/api/billing/credits/transactions",
            {"Authorization": f"Bearer {user}"},
        ),
        DemoRequest("the OpenAPI document (no token)", "GET", "/api/billing/openapi.json"),
    ]


def billing_page_links(app: Flask, base_url: str) -> dict[str, str]:
    """The billing page's DEMO-ONLY sign-in links, by user: the demo has no
    login, so each link carries a token that the page keeps for the tab."""
    with app.test_request_context(base_url=base_url):
        tokens = {
            DEMO_USER: _token(DEMO_USER),
            DEMO_ADMIN: _token(DEMO_ADMIN, app.config["CREDITS_ADMIN_SCOPE"]),
        }
        return {
            user: url_for("billing_page.page", token=token, _external=True)
            for user, token in tokens.items()
        }


def print_quickstart(app: Flask, base_url: str) -> list[DemoRequest]:
    """Print the billing page's links, then the curl commands; return the
    requests the commands stand for."""
    requests = demo_requests(app)
    links = billing_page_links(app, base_url)
    print(f"\ncallora-credits demo on {base_url} (tokens valid {TOKEN_LIFETIME.days} days)")
    if app.config["JWT_SECRET_KEY"] == DEMO_JWT_SECRET_KEY:
        print("(signed with the public demo JWT key: set JWT_SECRET_KEY for anything real)")
    print("\n# the billing page (demo-only sign-in links: open one in a browser)")
    width = max(len(user) for user in links)
    for user, link in links.items():
        role = " (admin: can top up and give credit)" if user == DEMO_ADMIN else ""
        print(f"{user + ':':<{width + 1}} {link}{role}")
    for request in requests:
        print(f"\n# {request.title}\n{request.curl(base_url)}")
    print()
    return requests


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s [%(name)s] %(message)s")
    port = int(os.environ.get("PORT", 5000))
    app = create_app()
    apply_migrations(app)
    print(seed_balance(app))
    print_quickstart(app, f"http://127.0.0.1:{port}")
    app.run(host="127.0.0.1", port=port)


if __name__ == "__main__":
    main()
