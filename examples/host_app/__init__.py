"""An example host app: its own models, migrations and JWT set-up, with
callora-credits mounted at ``/api/billing``.

Configuration comes from the environment:

- ``DATABASE_URL``: any SQLAlchemy URL (default: ``demo.sqlite3`` in the
  repository root);
- ``JWT_SECRET_KEY``: the key tokens are signed with (default: a demo-only
  key that is public, since it is in this file).

Two schema histories live side by side in one database: the host's, managed
with Flask-Migrate from ``examples/host_migrations`` (``flask db …``), and the
library's, shipped in the package (``flask credits db …``), each with its own
version table. ``include_name`` keeps the host's autogenerate off the
library's tables.

Beside its own ``/api/projects``, the host has paid endpoints made with
``@charge_credits`` (``paid_api.py``: ``/api/quote``, ``/api/echo``), a
billing page over the credits API (``billing_page.py``: ``/billing``) and,
when ``prometheus_client`` is installed, ``/metrics`` for Prometheus
(``metrics.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flask import Flask, jsonify
from flask_jwt_extended import JWTManager, get_jwt_identity, jwt_required
from flask_migrate import Migrate

import callora_credits
from callora_credits import credits_bp

from . import billing_page, metrics, paid_api
from .models import Project, db

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEMO_JWT_SECRET_KEY",
    "MIGRATIONS_DIR",
    "Project",
    "create_app",
    "db",
]

EXAMPLES_DIR = Path(__file__).resolve().parent.parent
MIGRATIONS_DIR = EXAMPLES_DIR / "host_migrations"
DEFAULT_DATABASE_URL = f"sqlite:///{EXAMPLES_DIR.parent / 'demo.sqlite3'}"

# DEMO ONLY: this key is public (it is in the repository), so anyone can
# mint tokens with it. Set JWT_SECRET_KEY to a secret of your own.
DEMO_JWT_SECRET_KEY = "demo-only-NOT-SECRET-set-JWT_SECRET_KEY-in-production"


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the host app; ``config`` overrides the environment's settings."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        JWT_SECRET_KEY=os.environ.get("JWT_SECRET_KEY", DEMO_JWT_SECRET_KEY),
    )
    app.config.update(config or {})

    db.init_app(app)
    JWTManager(app)
    Migrate(app, db, directory=str(MIGRATIONS_DIR), include_name=callora_credits.include_name)
    app.register_blueprint(credits_bp, url_prefix="/api/billing")
    app.register_blueprint(paid_api.bp)
    app.register_blueprint(billing_page.bp)
    metrics.add_metrics_endpoint(app)

    @app.get("/api/projects")
    @jwt_required()
    def list_projects() -> Any:
        """The host's own endpoint, on the same tokens as the credits API."""
        projects = db.session.scalars(
            db.select(Project).filter_by(owner_id=get_jwt_identity()).order_by(Project.id)
        )
        return jsonify([{"id": project.id, "name": project.name} for project in projects])

    return app
