"""Packaging of callora-credits.

The top-level ``migrations/`` folder is the one Alembic history; it ships in
the wheel as the ``callora_credits.migrations`` package.
"""

from setuptools import setup

setup(
    name="callora-credits",
    version="0.1.0",
    description="Prepaid USDC credits for API marketplaces, as a Flask blueprint",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "callora_credits",
        "callora_credits.core",
        "callora_credits.db",
        "callora_credits.http",
        "callora_credits.migrations",
        "callora_credits.migrations.versions",
    ],
    package_dir={
        "callora_credits": "callora_credits",
        "callora_credits.migrations": "migrations",
        "callora_credits.migrations.versions": "migrations/versions",
    },
    package_data={
        "callora_credits": ["py.typed"],
        "callora_credits.migrations": ["script.py.mako"],
    },
    install_requires=[
        "flask>=3.0",
        "flask-sqlalchemy>=3.1",
        "sqlalchemy>=2.0.20",
        "flask-jwt-extended>=4.6",
        "pydantic>=2.5",
        "alembic>=1.12",
        # Unpack for the typed keyword arguments of Ledger.top_up/charge on 3.10.
        "typing-extensions>=4.6",
    ],
    # The drivers of the URLs the docs show: postgresql+psycopg://… and
    # mysql+pymysql://… (a bare postgresql:// or mysql:// asks SQLAlchemy 2.0
    # for psycopg2 or mysqlclient, which these do not install).
    extras_require={
        "postgres": ["psycopg[binary]>=3.1"],
        "mysql": ["pymysql>=1.1"],
        # CREDITS_RATE_LIMIT: Flask-Limiter, with Redis for limits shared across workers.
        "ratelimit": ["flask-limiter[redis]>=3.8"],
        # Prometheus metrics (docs/operations.md).
        "metrics": ["prometheus-client>=0.20"],
    },
    # `flask credits` exists even when the app fails to import, so it can say
    # why (a missing driver) instead of "No such command 'credits'".
    entry_points={"flask.commands": ["credits = callora_credits.cli:cli"]},
    classifiers=[
        "Framework :: Flask",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Typing :: Typed",
    ],
)
