"""Authenticated API throughput and latency under gunicorn.

Starts a real gunicorn (and an embedded Redis unless REDIS_URL is set) on a temporary instance,
then prints: GET /api/v1/me requests per second with a personal access token and with a JWT
(p50/p99 latency), and login latency (argon2id dominates it). Bounded in time; loopback only.

    .venv/bin/python bench/api.py [--seconds 10] [--clients 16]
"""

from __future__ import annotations

import argparse
import os
import time

from harness import ADMIN, Client, Server, load, pct


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    settings = {"SWITCHBOARD_RATE_LIMIT_READ": "100000000/minute"}
    with Server(
        database_url=os.environ.get("DATABASE_URL"),
        redis_url=os.environ.get("REDIS_URL"),
        **settings,
    ) as server:
        c = Client(server.port)
        login_times = []
        for _ in range(20):
            t0 = time.perf_counter()
            status, body = c.call("POST", "/api/v1/auth/login", ADMIN)
            login_times.append(time.perf_counter() - t0)
            assert status == 200, body
        jwt = body["access_token"]
        c.token = jwt
        _, created = c.call(
            "POST", "/api/v1/me/tokens", {"label": "bench", "abilities": ["projects:read"]}
        )
        pat = created["token"]
        db = "PostgreSQL" if "postgres" in server.env.get("DATABASE_URL", "") else "SQLite"
        print(
            f"Switchboard API bench: {db}, {args.clients} clients, {args.seconds:.0f}s each, "
            f"WEB_CONCURRENCY={os.environ.get('WEB_CONCURRENCY', 'default')}"
        )
        print(f"login: p50 {pct(login_times, 0.5):.1f} ms  p99 {pct(login_times, 0.99):.1f} ms")
        for label, headers in (
            ("GET /me with PAT", {"X-API-Key": pat}),
            ("GET /me with JWT", {"Authorization": f"Bearer {jwt}"}),
        ):
            lat, errors = load(
                server.port, None, args.seconds, args.clients, "GET", "/api/v1/me", headers=headers
            )
            n = len(lat)
            print(
                f"{label}: {n / args.seconds:.0f} req/s  p50 {pct(lat, 0.5):.1f} ms  "
                f"p99 {pct(lat, 0.99):.1f} ms  errors {errors}"
            )


if __name__ == "__main__":
    main()
