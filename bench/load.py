"""A bounded HTTP load client, used by bench/run.py when wrk is not installed.

Threads with keep-alive ``http.client`` connections (reconnecting when the
server closes), loopback only, bounded by time and by request count. Prints
one line ``BENCH_RESULT {json}`` like bench/wrk/credits.lua.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--mode", choices=["get", "charge"], required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--nonce", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--max-requests", type=int, default=0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--prefix", default="acct_")
    args = parser.parse_args()

    expected = 201 if args.mode == "charge" else 200
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"responses": 0, "unexpected": 0, "socket_errors": 0}
    issued = 0
    deadline = time.monotonic() + args.seconds

    def take_ticket() -> int | None:
        nonlocal issued
        with lock:
            if args.max_requests and issued >= args.max_requests:
                return None
            issued += 1
            return issued

    def worker() -> None:
        conn: http.client.HTTPConnection | None = None
        mine: list[float] = []
        responses = unexpected = socket_errors = 0
        while time.monotonic() < deadline:
            ticket = take_ticket()
            if ticket is None:
                break
            headers = {"Authorization": f"Bearer {args.token}"}
            body = None
            method = "GET"
            if args.mode == "charge":
                method = "POST"
                headers["Content-Type"] = "application/json"
                headers["Idempotency-Key"] = f"{args.nonce}-py-{ticket}"
                user = f"{args.prefix}{ticket % args.accounts:04d}"
                body = json.dumps({"user_id": user, "amount_usdc": "0.0000001"})
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=10)
                conn.request(method, args.path, body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                socket_errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                continue
            mine.append(time.perf_counter() - started)
            responses += 1
            if response.status != expected:
                unexpected += 1
            if response.will_close:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()
        with lock:
            latencies.extend(mine)
            counts["responses"] += responses
            counts["unexpected"] += unexpected
            counts["socket_errors"] += socket_errors

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()

    def percentile(share: float) -> int:
        if not latencies:
            return 0
        return int(latencies[min(len(latencies) - 1, int(share * len(latencies)))] * 1e6)

    result = {
        "requests": counts["responses"],
        "responses": counts["responses"],
        "duration_us": int(elapsed * 1e6),
        "unexpected": counts["unexpected"],
        "socket_errors": counts["socket_errors"],
        "p50_us": percentile(0.50),
        "p99_us": percentile(0.99),
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
