"""callora-credits: prepaid USDC credits for API marketplaces, as a Flask blueprint.

from callora_credits import credits_bp
app.register_blueprint(credits_bp, url_prefix="/api/billing")
"""

from __future__ import annotations

from . import cli as _cli  # noqa: F401  (registers `flask credits`)
from .core import signals as signals
from .core.ledger import Ledger as Ledger
from .core.money import UNITS_PER_USDC as UNITS_PER_USDC
from .core.money import format_units as format_units
from .core.money import parse_amount as parse_amount
from .core.pagination import Page as Page
from .core.records import Balance as Balance
from .core.records import Entry as Entry
from .core.records import Grant as Grant
from .core.records import Hold as Hold
from .core.usage import DepletionEstimate as DepletionEstimate
from .core.usage import Usage as Usage
from .core.usage import UsageBucket as UsageBucket
from .db.models import metadata as metadata
from .errors import CreditsError as CreditsError
from .extension import current_ledger as current_ledger
from .http import views as _views  # noqa: F401  (registers the routes)
from .http.auth import Caller as Caller
from .http.auth import current_caller as current_caller
from .http.blueprint import credits_bp as credits_bp
from .http.blueprint import error_response as error_response
from .http.metering import charge_credits as charge_credits
from .http.metering import set_final_price as set_final_price
from .migrate import include_name as include_name

__all__ = [
    "UNITS_PER_USDC",
    "Balance",
    "Caller",
    "CreditsError",
    "DepletionEstimate",
    "Entry",
    "Grant",
    "Hold",
    "Ledger",
    "Page",
    "Usage",
    "UsageBucket",
    "charge_credits",
    "credits_bp",
    "current_caller",
    "current_ledger",
    "error_response",
    "format_units",
    "include_name",
    "metadata",
    "parse_amount",
    "set_final_price",
    "signals",
]

__version__ = "0.1.0"
