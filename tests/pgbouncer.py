"""PgBouncer for the tests: :func:`start_pgbouncer` starts one in transaction
pooling mode in front of the test server (the launcher is
:mod:`stress.pgbouncer`, shared with ``make stress --engine pgbouncer``).

Without the ``pgbouncer`` binary the test is skipped, with the reason;
under ``CI=true`` it fails instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # for `stress`, the harness beside the package

from stress.pgbouncer import PgBouncer, find_pgbouncer  # noqa: E402

__all__ = [
    "POOL_SIZE",
    "PgBouncer",
    "find_pgbouncer",
    "skip_or_fail_without_pgbouncer",
    "start_pgbouncer",
]

#: Server connections per database and user: few, so clients share them and a
#: client's next transaction often runs on another one.
POOL_SIZE = 2


def skip_or_fail_without_pgbouncer() -> NoReturn:
    """Skip the test, with the reason; under ``CI=true``, fail it."""
    reason = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def start_pgbouncer(server_url: str, *, pool_size: int = POOL_SIZE) -> PgBouncer:
    """A running PgBouncer in front of ``server_url``'s server (stop it after)."""
    if find_pgbouncer() is None:
        skip_or_fail_without_pgbouncer()
    server = make_url(server_url)
    return PgBouncer(server.host or "127.0.0.1", server.port or 5432, pool_size=pool_size).start()
