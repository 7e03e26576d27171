"""Soak bench: memory of the web and worker processes over many runs.

Starts gunicorn and `switchboard worker` on a fresh PostgreSQL database and a Redis db, then
creates rounds of small shell tasks (each prints to stdout and stderr) through the worker pool and
prints, after each round, every process's resident memory: a process that leaks grows round after
round. Bounded by the rounds asked for; loopback only.

    .venv/bin/python bench/soak.py [--rounds 5] [--runs 2000]
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import redis
import sqlalchemy as sa
from harness import Client, Server, backend_parser, children, fresh_postgres_database


def rss_mb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def tree(pid: int) -> list[int]:
    """`pid` and its descendants."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children(current)
    return found


def main() -> None:
    parser = backend_parser(redis_db=14)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2000, help="runs per round")
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    redis.Redis.from_url(args.redis_url).flushdb()
    db_url = fresh_postgres_database(args.database_url, "sb_bench_soak")
    settings = {"SWITCHBOARD_RATE_LIMIT_ENABLED": "false"}
    with Server(database_url=db_url, redis_url=args.redis_url, worker=True, **settings) as server:
        c = server.client()
        status, body = c.call("POST", "/api/v1/projects", {"key": "soak", "name": "soak"})
        assert status == 201, body
        web, pool = server.procs[0].pid, server.procs[1].pid
        engine = sa.create_engine(db_url.replace("postgresql://", "postgresql+psycopg://", 1))
        prompt = "echo out; echo err >&2"
        task = {"project": "soak", "title": "s", "agent": "shell", "prompt": prompt}
        print(
            f"Switchboard soak bench: {args.rounds} rounds of {args.runs} runs "
            "(resident MB of each process after each round)"
        )

        def create(count: int) -> None:
            client = Client(server.port, c.token)
            for _ in range(count):
                status, body = client.call("POST", "/api/v1/tasks", task)
                assert status == 201, body

        total, started = 0, time.monotonic()
        for n in range(1, args.rounds + 1):
            share = args.runs // args.clients
            threads = [threading.Thread(target=create, args=(share,)) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total += share * args.clients
            deadline = time.monotonic() + 600
            while True:
                with engine.connect() as conn:
                    ended = conn.execute(
                        sa.text("SELECT count(*) FROM tasks WHERE status = 'completed'")
                    ).scalar()
                if ended >= total:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"only {ended} of {total} runs completed")
                time.sleep(0.5)
            print(
                f"round {n}: {total:,} runs completed ({time.monotonic() - started:.0f} s); "
                f"web {[rss_mb(p) for p in tree(web)]} MB; "
                f"worker pool {[rss_mb(p) for p in tree(pool)]} MB",
                flush=True,
            )
        engine.dispose()


if __name__ == "__main__":
    main()
