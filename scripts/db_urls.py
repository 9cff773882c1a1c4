"""Print `export` lines for the test database servers that answer.

Used by `make test`: PostgreSQL and MariaDB tests run when their server is up.
Under CI=true a server that does not answer is an error, never a skip.
"""

from __future__ import annotations

import os
import sys

import sqlalchemy as sa

CANDIDATES = {
    "CREDITS_TEST_POSTGRES_URL": "postgresql+psycopg://postgres@127.0.0.1:5432/test",
    "CREDITS_TEST_MYSQL_URL": "mysql+pymysql://root@127.0.0.1:3306/test",
}


def answers(url: str) -> bool:
    connect_args = {"connect_timeout": 3}
    engine = sa.create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except Exception as exc:
        print(f"# {url}: {type(exc).__name__}", file=sys.stderr)
        return False
    finally:
        engine.dispose()


def main() -> int:
    failed = False
    for var, default in CANDIDATES.items():
        url = os.environ.get(var) or default
        if answers(url):
            print(f"export {var}='{url}'")
        elif os.environ.get("CI") == "true":
            print(f"# CI=true and {var} ({url}) does not answer", file=sys.stderr)
            failed = True
        else:
            print(f"# {var}: server not reachable, its tests are skipped", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
