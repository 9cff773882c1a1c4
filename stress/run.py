"""Command line of the load harness.

    python -m stress.run --engine postgresql --seconds 20 --clients 2 --workers 4
    python -m stress.run --engine mysql --fault all --seconds 240
    python -m stress.run --engine pgbouncer --fault all --seconds 60
    python -m stress.run --engine galera --fault all --seconds 120

Creates a fresh database on the engine's server (``CREDITS_TEST_POSTGRES_URL``
/ ``CREDITS_TEST_MYSQL_URL``, or the local defaults), migrates it, runs the
stress host under gunicorn against it (``pgbouncer``: PostgreSQL through a
PgBouncer in transaction pooling mode started for the run; ``galera``: a
three-node cluster of its own, a host per node, clients spread over them),
drives it from
client processes (optionally while injecting faults), checks every
invariant, prints a summary, drops the database. Exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .harness import ENGINES, FAULTS, RunConfig, run

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stress.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        action="append",
        help="postgresql, mysql, or pgbouncer (PostgreSQL through a PgBouncer in "
        "transaction pooling mode); repeatable (default postgresql)",
    )
    parser.add_argument("--seconds", type=float, default=15.0, help="load duration (default 15)")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--threads", type=int, default=3, help="threads per client (default 3)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn workers (default 4)")
    parser.add_argument(
        "--worker-threads", type=int, default=4, help="gthread threads per worker (default 4)"
    )
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument(
        "--phase-seconds", type=float, default=15.0, help="length of each --fault all phase"
    )
    parser.add_argument("--cold-users", type=int, default=300)
    parser.add_argument("--hot-users", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--artifacts", type=Path, default=None, help="where logs are kept")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so gunicorn, the proxy and the database are
    # cleaned up by the harness's finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = False
    for engine in args.engine or ["postgresql"]:
        artifacts = None if args.artifacts is None else args.artifacts / engine
        report = run(
            RunConfig(
                engine=engine,
                seconds=args.seconds,
                clients=args.clients,
                client_threads=args.threads,
                workers=args.workers,
                worker_threads=args.worker_threads,
                fault=args.fault,
                phase_seconds=args.phase_seconds,
                cold_users=args.cold_users,
                hot_users=args.hot_users,
                seed=args.seed,
                run_cli_reconcile=True,
                artifacts=artifacts,
            )
        )
        print(report.summary(), flush=True)
        failed = failed or bool(report.problems())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
