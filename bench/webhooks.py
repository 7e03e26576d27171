"""Webhook acknowledgement benchmark: signed, distinct GitHub deliveries under gunicorn.

Starts a real server (gunicorn + `switchboard worker`, so matching runs beside the receiver as it
would in production) on a fresh PostgreSQL database and a Redis db, adds a `github` source and a
rule, then `--clients` threads POST distinct deliveries of a real `issues.labeled` payload
(13 KB, from @octokit/webhooks-examples), each signed with HMAC-SHA256 as GitHub signs it.
Prints deliveries acknowledged per second, p50/p99 acknowledgement latency, and how long the
events queue took to match them all. Bounded in time; loopback only.

    .venv/bin/python bench/webhooks.py [--seconds 10] [--clients 8] \
        [--database-url postgresql://postgres@127.0.0.1/test] [--redis-url redis://127.0.0.1/13]
"""

from __future__ import annotations

import json
import os
import time
import uuid

import sqlalchemy as sa
from harness import ROOT, Server, backend_parser, fresh_database, pct, socket_load

from app.webhooks.signatures import sign

SECRET = "bench-webhook-secret"
PAYLOAD = json.loads((ROOT / "tests/fixtures/github/issues.labeled.json").read_text())


def deliveries(count: int, port: int) -> list[bytes]:
    """Distinct signed deliveries as complete HTTP/1.1 requests, built before the clock starts
    (the load generator shares the two cores with the server: it should cost little)."""
    out = []
    for i in range(count):
        payload = {**PAYLOAD, "issue": {**PAYLOAD["issue"], "number": i}}
        body = json.dumps(payload).encode()
        head = (
            "POST /api/v1/webhooks/gh HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            "User-Agent: GitHub-Hookshot/bench\r\n"
            "X-GitHub-Event: issues\r\n"
            f"X-GitHub-Delivery: {uuid.uuid4()}\r\n"
            f"X-Hub-Signature-256: {sign(SECRET, body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


def main() -> None:
    parser = backend_parser(redis_db=13)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=6000, help="deliveries prepared")
    parser.add_argument(
        "--reconnect-every",
        type=int,
        default=0,
        help="open a new connection every N deliveries (0: one keep-alive connection per client)",
    )
    args = parser.parse_args()

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    database_url = fresh_database(args.database_url, "switchboard_bench_webhooks")
    with Server(
        database_url=database_url,
        redis_url=args.redis_url,
        worker=True,
        SWITCHBOARD_WORKER_PROCESSES="1",
        SWITCHBOARD_RATE_LIMIT_WRITE="100000000/minute",
    ) as server:
        admin = server.client()
        status, body = admin.call(
            "POST",
            "/api/v1/webhook-sources",
            {"name": "gh", "kind": "github", "secret": SECRET},
        )
        assert status == 201, body
        admin.call("POST", "/api/v1/projects", {"key": "bench", "name": "Bench"})
        status, body = admin.call(
            "POST",
            "/api/v1/projects/bench/rules",
            {
                "name": "only the agent label",
                "source": "gh",
                "event": "issues",
                "actions": ["labeled"],
                "conditions": {"label": "agent"},  # the payload's label is `bug`: skipped
                "task": {"title": "{{ issue.title }}", "prompt": "{{ issue.body }}"},
            },
        )
        assert status == 201, body

        prepared = [deliveries(args.per_client, server.port) for _ in range(args.clients)]
        latencies, statuses, elapsed = socket_load(
            server.port, prepared, args.seconds, args.reconnect_every
        )
        began = time.monotonic() - elapsed
        acked = len(latencies)
        failures = [sum(1 for s in statuses if s != 202)]

        engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
        deadline = time.monotonic() + 300
        with engine.connect() as conn:
            while time.monotonic() < deadline:
                left = conn.execute(
                    sa.text("SELECT count(*) FROM webhook_events WHERE state = 'received'")
                ).scalar()
                conn.commit()
                if not left:
                    break
                time.sleep(0.2)
            matched_after = time.monotonic() - began
            stored = conn.execute(sa.text("SELECT count(*) FROM webhook_events")).scalar()
        engine.dispose()

        print(
            f"Switchboard webhook bench: PostgreSQL + Redis, {args.clients} clients, "
            f"{args.seconds:.0f}s, {len(prepared[0][0]) // 1024} KB signed deliveries, "
            f"WEB_CONCURRENCY={os.environ.get('WEB_CONCURRENCY', 'default')} "
            f"GUNICORN_THREADS={os.environ.get('GUNICORN_THREADS', 'default')}"
        )
        print(
            f"acknowledged: {acked / elapsed:.0f}/s  p50 {pct(latencies, 0.5):.1f} ms  "
            f"p99 {pct(latencies, 0.99):.1f} ms  failures {failures[0]}"
        )
        print(
            f"stored {stored} of {acked}; all matched {matched_after:.1f}s after the first "
            f"({'left behind' if left else 'none left'})"
        )


if __name__ == "__main__":
    main()
