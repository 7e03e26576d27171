"""Dispatch benchmark: task creation, agent start and run completion under gunicorn.

Starts a real server (gunicorn + `switchboard worker`) on a fresh PostgreSQL database and a Redis
db, then prints:
  - task creations per second (POST /api/v1/tasks, target external: API + database only);
  - POST -> agent process started and POST -> run completed, p50/p99, one run at a time, with a
    trivial agent (`echo $EPOCHREALTIME`: the agent prints the moment it started) and with the
    suite's fake Claude Code (stream-json parsed into events, cost, tokens, session, model);
  - runs completed per second for both (a burst of tasks through the worker pool, created on
    four keep-alive sockets with requests built beforehand, as the creations are), with the CPU
    each part of the system spent per run;
  - POST -> the client sees the run completed, for a client polling every 5 ms and for one
    long-polling (`GET /api/v1/runs/{id}?wait=30&status=…`);
  - POST latency with a few hundred and with 100,000 tasks stored (a twin server holds the
    few hundred; requests alternate between the two).
Bounded in time; loopback only.

    .venv/bin/python bench/dispatch.py \
        [--database-url postgresql://postgres@127.0.0.1/test] [--redis-url redis://127.0.0.1/14]
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import sqlalchemy as sa
from harness import (
    ROOT,
    Client,
    CpuMeter,
    Server,
    backend_parser,
    cpu_check,
    fresh_postgres_database,
    pct,
    read_response_body,
    socket_load,
)

from app.live.pubsub import unpack


class RunWatcher:
    """Hears runs end on the activity channel, subscribed before the task is created, so the
    wait costs the server nothing (a GET while the run starts would compete with it for the
    CPU and inflate the very latency being measured)."""

    def __init__(self, conn) -> None:  # type: ignore[no-untyped-def]
        db = conn.connection_pool.connection_kwargs.get("db", 0)  # channels carry the db number
        self.conn = conn  # a client that is collected closes its pool, the subscription too
        self.pubsub = conn.pubsub()
        self.pubsub.subscribe(f"sb:{db}:activity")
        self.ended: set[int] = set()
        deadline = time.monotonic() + 10
        while True:  # Redis's confirmation: only then are the messages that follow heard
            msg = self.pubsub.get_message(timeout=1)
            if msg is not None and msg["type"] == "subscribe":
                break
            if time.monotonic() > deadline:
                raise SystemExit("could not subscribe to the activity channel")

    def wait(self, run_id: int, timeout: float = 30) -> None:
        self.wait_all({run_id}, timeout)

    def wait_all(self, run_ids: set[int], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not run_ids <= self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SystemExit(f"{len(run_ids - self.ended)} runs did not finish")
            msg = self.pubsub.get_message(timeout=left)
            for entry in unpack(msg["data"]) if msg and msg["type"] == "message" else []:
                data = entry.get("data") or {}
                if entry.get("kind") == "run.status" and data.get("status") in RUN_ENDED:
                    self.ended.add(data["run_id"])


RUN_ENDED = ("succeeded", "failed", "cancelled", "timed_out", "lost")


def parse_time(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def sequential_runs(
    c: Client, watcher: RunWatcher, project: str, prompt: str, count: int, warm: int, name: str
) -> None:
    """POST -> agent started / run completed, one run at a time, after `warm` unmeasured runs
    (each worker process's first job meets cold caches). The shell agent prints the moment it
    started; for others the run's `started_at` (when the worker spawned it) is that moment."""
    started, completed = [], []
    for n in range(-warm, count):
        t0 = time.time()
        _, task = c.call(
            "POST", "/api/v1/tasks", {"project": project, "title": "s", "prompt": prompt}
        )
        watcher.wait(task["latest_run_id"])
        _, done = c.call("GET", f"/api/v1/tasks/{task['id']}")
        run = done["runs"][0]
        assert run["status"] == "succeeded", run
        if n < 0:
            continue
        if project == "pool":
            _, log = c.call("GET", f"/api/v1/runs/{run['id']}/log")
            started.append(float(log["text"].strip()) - t0)
        else:
            started.append(parse_time(run["started_at"]) - t0)
        completed.append(parse_time(run["finished_at"]) - t0)
    print(
        f"[{name}] POST -> agent started: p50 {pct(started, 0.5):.1f} ms  "
        f"p99 {pct(started, 0.99):.1f} ms  ({count} runs)"
    )
    print(
        f"[{name}] POST -> run completed: p50 {pct(completed, 0.5):.1f} ms  "
        f"p99 {pct(completed, 0.99):.1f} ms"
    )


def runs_per_second(
    server: Server, port: int, token: str, watcher: RunWatcher, project: str, burst: int, name: str
) -> None:
    """Runs completed per second: a burst of tasks through the worker pool, created on four
    keep-alive sockets with requests built beforehand, as the creations are (the creators share
    the cores); the ends are heard on the activity channel (asking the server would add its
    own load to what is measured)."""
    ids: list[int] = []
    prompt = "true" if project == "pool" else "Fix the bug in parser.py"
    body = json.dumps({"project": project, "title": "r", "prompt": prompt}).encode()
    request = (
        f"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    for sock in sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()

    def creator(sock: socket.socket, n: int) -> None:
        buffer = bytearray()
        for _ in range(n):
            sock.sendall(request)
            status, answer = read_response_body(sock, buffer)
            assert status == 201, answer
            ids.append(json.loads(answer)["latest_run_id"])
        sock.close()

    meter = CpuMeter(server)
    threads = [threading.Thread(target=creator, args=(s, burst // 4)) for s in sockets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    watcher.wait_all(set(ids), timeout=120)
    elapsed = time.monotonic() - t0
    print(
        f"[{name}] runs completed: {len(ids) / elapsed:.0f}/s "
        f"({len(ids)} runs in {elapsed:.1f} s, created by 4 clients meanwhile)"
    )
    print(f"[{name}]   CPU per run, its creation included: {meter.per(len(ids))}")


TERMINAL = ("succeeded", "failed", "cancelled", "timed_out", "lost")


def client_sees_the_end(c: Client, project: str, count: int, how: str) -> None:
    """POST -> the client knows the run ended, as a script waits: asking every 5 ms, or asking
    the server to answer when the run's status changes (`?wait=`)."""
    seen, after_end = [], []
    for n in range(-3, count):
        t0 = time.time()
        _, task = c.call(
            "POST", "/api/v1/tasks", {"project": project, "title": "w", "prompt": "Fix it"}
        )
        path, status = f"/api/v1/runs/{task['latest_run_id']}", "queued"
        while status not in TERMINAL:
            if how == "long-polling":
                _, run = c.call("GET", f"{path}?wait=30&status={status}")
            else:
                time.sleep(0.005)
                _, run = c.call("GET", path)
            status = run["status"]
        if n >= 0:
            now = time.time()
            seen.append(now - t0)
            after_end.append(now - parse_time(run["finished_at"]))
    print(
        f"[{project}, client {how}] POST -> client sees the run completed: "
        f"p50 {pct(seen, 0.5):.1f} ms  p99 {pct(seen, 0.99):.1f} ms  ({count} runs); "
        f"after the run's end: p50 {pct(after_end, 0.5):.1f} ms  p99 {pct(after_end, 0.99):.1f} ms"
    )


def main() -> None:
    parser = backend_parser(redis_db=14)
    parser.add_argument("--runs", type=int, default=200, help="sequential runs for latency")
    parser.add_argument("--burst", type=int, default=600, help="tasks for runs/s")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=16, help="connections creating tasks")
    parser.add_argument("--latency-requests", type=int, default=500, help="POSTs per store size")
    parser.add_argument(
        "--client-runs", type=int, default=100, help="runs per waiting client (polling, long-poll)"
    )
    parser.add_argument(
        "--workers", type=int, default=int(os.environ.get("SWITCHBOARD_WORKER_PROCESSES", 4))
    )
    args = parser.parse_args()

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    db_url = fresh_postgres_database(args.database_url, "sb_bench_dispatch")
    settings = {
        "SWITCHBOARD_RATE_LIMIT_ENABLED": "false",
        "SWITCHBOARD_WORKER_PROCESSES": str(args.workers),
        # the suite's fake Claude Code, found as `claude`
        "PATH": f"{ROOT / 'tests' / 'fake_agents'}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    with Server(database_url=db_url, redis_url=args.redis_url, worker=True, **settings) as server:
        port = server.port
        c = server.client()
        token = c.token
        for key, agent in (("ext", "shell"), ("pool", "shell"), ("claude", "claude")):
            status, body = c.call(
                "POST", "/api/v1/projects", {"key": key, "name": key, "default_agent": agent}
            )
            assert status == 201, body
        conn = redis.Redis.from_url(args.redis_url)

        speed = cpu_check()
        print(
            f"Switchboard dispatch bench: PostgreSQL + Redis, gunicorn "
            f"WEB_CONCURRENCY={os.environ.get('WEB_CONCURRENCY', 'default')}, "
            f"{args.workers} worker processes, {os.cpu_count()} CPUs; "
            f"CPU check {speed:.0f} ms (a fixed loop: lower is a faster machine)"
        )

        # 1. creations per second
        body = json.dumps(
            {"project": "ext", "title": "b", "prompt": "x", "target": "external"}
        ).encode()
        request = (
            f"POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        prepared = [[request] * 20000 for _ in range(args.clients)]
        meter = CpuMeter(server)
        lat, statuses, elapsed = socket_load(port, prepared, args.seconds)
        creation_cpu = meter.per(len(lat))
        failed = sum(1 for s in statuses if s != 201)
        assert failed == 0, f"{failed} creations failed"
        rate = len(lat) / elapsed
        print(
            f"task creations: {rate:.0f}/s ({args.clients} clients)  p50 {pct(lat, 0.5):.1f} ms  "
            f"p99 {pct(lat, 0.99):.1f} ms"
        )
        print(f"  CPU per creation: {creation_cpu}")

        # 2.-3. what a user's runs cost and take: the trivial shell agent, then the suite's fake
        # Claude Code (stream-json parsed into events, cost, tokens, session, model)
        watcher = RunWatcher(conn)
        for name, project, prompt in (
            ("shell", "pool", "echo $EPOCHREALTIME"),
            ("claude", "claude", "Fix the bug in parser.py"),
        ):
            sequential_runs(c, watcher, project, prompt, args.runs, 2 * args.workers, name)
            runs_per_second(server, port, token, watcher, project, args.burst, name)

        # 5. as a script sees a run end: polling every 5 ms, and long-polling (?wait=)
        for how in ("polling every 5 ms", "long-polling"):
            client_sees_the_end(c, "claude", args.client_runs, how)

        # 6. what one read of a run costs the web process (what every poll costs)
        _, task = c.call("POST", "/api/v1/tasks", {"project": "ext", "title": "r", "prompt": "x"})
        read = (
            f"GET /api/v1/runs/{task['latest_run_id']} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        meter = CpuMeter(server)
        lat, statuses, elapsed = socket_load(port, [[read] * 20000 for _ in range(4)], 3)
        assert set(statuses) == {200}, set(statuses)
        print(
            f"GET /api/v1/runs/{{id}}: {len(lat) / elapsed:.0f}/s (4 clients)  "
            f"p50 {pct(lat, 0.5):.1f} ms; CPU per read: {meter.per(len(lat))}"
        )

        # 4. POST latency with 100,000 stored tasks, against a twin server whose database holds a
        # few hundred: requests alternate between the two, so that this machine's changes of
        # speed (1.6x within seconds) fall on both measures alike
        body = {"project": "lat", "title": "l", "prompt": "x", "target": "external"}
        lat = {"key": "lat", "name": "lat", "default_agent": "shell"}
        c.call("POST", "/api/v1/projects", lat)
        engine = sa.create_engine(db_url)
        with engine.begin() as conn_db:
            pid = conn_db.execute(sa.text("SELECT id FROM projects WHERE key='lat'")).scalar()
            conn_db.execute(
                sa.text(
                    "INSERT INTO tasks (project_id, title, prompt, agent, target, priority,"
                    " priority_rank, status, max_attempts, attempts, source, created_at,"
                    " updated_at) SELECT :pid, 'bulk', 'x', 'shell', 'external', 'normal', 1,"
                    " 'completed', 1, 1, 'api', now(), now() FROM generate_series(1, 100000)"
                ),
                {"pid": pid},
            )
            conn_db.execute(sa.text("ANALYZE tasks"))
            stored = conn_db.execute(sa.text("SELECT count(*) FROM tasks")).scalar()
        engine.dispose()
        twin_db = fresh_postgres_database(args.database_url, "sb_bench_dispatch_twin")
        with Server(database_url=twin_db, redis_url=args.redis_url, **settings) as twin:
            t = twin.client()
            t.call("POST", "/api/v1/projects", lat)
            for _ in range(400):
                t.call("POST", "/api/v1/tasks", body)
            few, many = [], []
            for _ in range(args.latency_requests):
                for client, into in ((t, few), (c, many)):
                    started_at = time.perf_counter()
                    status, _ = client.call("POST", "/api/v1/tasks", body)
                    into.append(time.perf_counter() - started_at)
                    assert status == 201
        small, big = pct(few, 0.5), pct(many, 0.5)
        print(
            f"POST latency p50: {small:.2f} ms with ~400 tasks stored, {big:.2f} ms with "
            f"{stored:,} ({big / small:.2f}x; {args.latency_requests} requests each, alternating)"
        )
        print(f"CPU check at the end: {cpu_check():.0f} ms")


if __name__ == "__main__":
    main()
