"""Machines benchmark: runs on machines of your own, as a team would use them.

Starts a real server (gunicorn defaults) on a fresh PostgreSQL database and a Redis db, enrolls
machines with the real client (`switchboard machine run`, sandbox off: its cost is the pool's,
measured in docs/operations.md), and prints:
  - POST -> agent started on a connected machine, p50/p99, one task at a time (the agent prints
    `$EPOCHREALTIME` first), and POST -> the client sees the run completed (long-polling);
  - trivial remote runs completed per second with 4 machines x 4 slots (a burst of tasks), with
    the CPU each part spent per run, and how the runs were spread over the machines;
  - 500 connected idle machines heartbeating every 5 s (simulated connections that speak the
    real protocol, on a stream process as docs/operations.md recommends): the web processes'
    CPU (% of one core) and memory.
Bounded in time; loopback only.

    .venv/bin/python bench/machines.py [--database-url …] [--redis-url …] [--runs 200]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from harness import (
    BIN,
    Client,
    CpuMeter,
    Server,
    _cpu_of,
    backend_parser,
    cpu_check,
    fresh_postgres_database,
    pct,
)
from simple_websocket import Client as WsClient

from workers.process import child_pids

#: a burst of hundreds of creations is the bench's, not an abuse to limit
NO_LIMITS = {"SWITCHBOARD_RATE_LIMIT_ENABLED": "false"}


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _enroll(c: Client, uses: int, labels: list[str]) -> str:
    status, made = c.call("POST", "/api/v1/machine-tokens", {"uses": uses, "labels": labels})
    assert status == 201, made
    return made["token"]


def _start_machines(server: Server, token: str, count: int, slots: int, where: Path):
    procs = []
    env = {"PATH": os.environ["PATH"], "HOME": str(where), "LANG": "C.UTF-8"}
    for n in range(count):
        state = where / f"m{n}"
        subprocess.run(
            [str(BIN / "switchboard"), "machine", "register", "--server",
             f"http://127.0.0.1:{server.port}", "--token", token, "--name", f"bench-{n}",
             "--slots", str(slots), "--state-dir", str(state)],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [
                    str(BIN / "switchboard"),
                    "machine",
                    "run",
                    "--state-dir",
                    str(state),
                    "--sandbox",
                    "none",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    return procs


def _wait_online(c: Client, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, body = c.call("GET", "/api/v1/machines?state=online")
        if len(body["data"]) >= count:
            return
        time.sleep(0.2)
    raise SystemExit("machines did not come online")


def one_at_a_time(c: Client, runs: int) -> None:
    started, completed = [], []
    for _ in range(runs):
        t0 = time.time()
        status, task = c.call(
            "POST",
            "/api/v1/tasks",
            {
                "project": "m",
                "title": "t",
                "prompt": "echo $EPOCHREALTIME",
                "target": "labels:bench",
            },
        )
        assert status == 201, task
        while task["status"] not in ("completed", "failed"):
            _, task = c.call("GET", f"/api/v1/tasks/{task['id']}?wait=30&status={task['status']}")
        completed.append(time.time() - t0)
        _, log = c.call("GET", f"/api/v1/runs/{task['latest_run_id']}/log")
        started.append(float(log["text"].split()[0]) - t0)
    print(
        f"POST -> agent started on a machine: p50 {pct(started, 0.5):.1f} / "
        f"p99 {pct(started, 0.99):.1f} ms;  POST -> client sees it completed (long-poll): "
        f"p50 {pct(completed, 0.5):.1f} / p99 {pct(completed, 0.99):.1f} ms  ({runs} runs)"
    )


def burst(server: Server, c: Client, engine: sa.Engine, count: int) -> None:
    meter = CpuMeter(server)
    machines_cpu0 = _machines_cpu()
    body = {"project": "m", "title": "b", "prompt": "true", "target": "labels:bench"}
    first = c.call("POST", "/api/v1/tasks", body)[1]["id"]
    t0 = time.monotonic()

    def create(n: int) -> None:
        client = Client(server.port, c.token)
        for _ in range(n):
            assert client.call("POST", "/api/v1/tasks", body)[0] == 201

    threads = [threading.Thread(target=create, args=(count // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = 4 * (count // 4) + 1
    query = sa.text(
        "SELECT count(*) FROM runs WHERE task_id >= :first AND status IN ('succeeded','failed')"
    )
    deadline = time.monotonic() + 120
    with engine.connect() as conn:
        while conn.execute(query, {"first": first}).scalar() < total:
            if time.monotonic() > deadline:
                raise SystemExit("the burst did not complete")
            time.sleep(0.05)
        spread = Counter(
            dict(
                conn.execute(
                    sa.text(
                        "SELECT executor, count(*) FROM runs WHERE task_id >= :first "
                        "GROUP BY executor"
                    ),
                    {"first": first},
                ).all()
            )
        )
        failed = conn.execute(
            sa.text("SELECT count(*) FROM runs WHERE task_id >= :first AND status = 'failed'"),
            {"first": first},
        ).scalar()
    took = time.monotonic() - t0
    per_run = (_machines_cpu() - machines_cpu0) * 1000 / total
    print(
        f"burst of {total} trivial runs on 4 machines x 4 slots: {total / took:.0f} runs/s "
        f"({failed} failed); CPU per run: {meter.per(total)}  machines {per_run:.2f} ms"
    )
    shares = sorted(spread.values())
    spread_text = dict(sorted(spread.items()))
    print(f"  spread over machines: {spread_text} (min {shares[0]}, max {shares[-1]})")


_MACHINE_PIDS: list[int] = []


def _machines_cpu() -> float:
    pids = []
    for pid in _MACHINE_PIDS:
        pids += [pid, *child_pids(pid)]
    return sum(map(_cpu_of, pids))


def idle_swarm(args, database_url: str, count: int, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """`count` connected machines that only heartbeat, on a stream process (as docs say)."""
    settings = {
        **NO_LIMITS,
        "WEB_CONCURRENCY": "2",
        # gunicorn does not split connections evenly between its processes: each can hold all
        "GUNICORN_THREADS": str(count + 50),
        "SWITCHBOARD_STREAMS_PER_PROCESS": str(count + 40),
    }
    with Server(database_url=database_url, redis_url=args.redis_url, **settings) as server:
        c = server.client()
        token = _enroll(c, count, ["idle"])
        creds = []
        for n in range(count):
            status, reg = c.call(
                "POST",
                "/api/v1/machines/register",
                {"enrollment_token": token, "name": f"idle-{n}", "agents": {"shell": None}},
            )
            assert status == 201, reg
            creds.append(reg)
        stop = threading.Event()
        connected = [0]
        lock = threading.Lock()

        def machine(reg: dict) -> None:
            ws = WsClient.connect(f"ws://127.0.0.1:{server.port}/api/v1/machines/connect")
            ws.send(json.dumps({"type": "auth", "machine_id": reg["machine_id"],
                                "credential": reg["credential"], "resume": []}))  # fmt: skip
            assert json.loads(ws.receive(timeout=30))["type"] == "welcome"
            with lock:
                connected[0] += 1
            beat = json.dumps({"type": "heartbeat", "free_slots": 0, "load": 0.1})
            while not stop.wait(5.0):
                ws.send(beat)
                while ws.receive(timeout=0) is not None:
                    pass
            ws.close()

        threads = [threading.Thread(target=machine, args=(r,), daemon=True) for r in creds]
        for n, t in enumerate(threads):
            t.start()
            if n % 50 == 49:
                time.sleep(0.2)  # as machines come up: not all in the same millisecond
        deadline = time.monotonic() + 60
        while connected[0] < count and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(6)  # a full heartbeat round before measuring
        web = [server.web.pid, *child_pids(server.web.pid)]
        cpu0, t0 = sum(map(_cpu_of, web)), time.monotonic()
        time.sleep(seconds)
        used = sum(map(_cpu_of, [server.web.pid, *child_pids(server.web.pid)])) - cpu0
        elapsed = time.monotonic() - t0
        _, online = c.call("GET", "/api/v1/machines/healthz")
        print(
            f"{connected[0]} idle machines heartbeating every 5 s: web processes' CPU "
            f"{used / elapsed * 100:.1f}% of one core, memory {_rss_mb(web):.0f} MB "
            f"(RSS, {len(web)} processes); online {online['online']}"
        )
        stop.set()


def main() -> None:
    parser = backend_parser(redis_db=13)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--burst", type=int, default=800)
    parser.add_argument("--idle", type=int, default=500)
    args = parser.parse_args()
    print(f"CPU check {cpu_check():.0f} ms (a fixed loop: lower is a faster machine)")
    url = fresh_postgres_database(args.database_url, "sb_bench_machines")
    engine = sa.create_engine(url)
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="sbmachines-"))
    with Server(database_url=url, redis_url=args.redis_url, **NO_LIMITS) as server:
        c = server.client()
        status, _ = c.call(
            "POST", "/api/v1/projects", {"key": "m", "name": "m", "default_agent": "shell"}
        )
        assert status == 201
        procs = _start_machines(server, _enroll(c, 4, ["bench"]), 4, 4, where)
        _MACHINE_PIDS[:] = [p.pid for p in procs]
        try:
            _wait_online(c, 4)
            one_at_a_time(c, args.runs)
            burst(server, c, engine, args.burst)
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    engine.dispose()
    idle_swarm(
        args, fresh_postgres_database(args.database_url, "sb_bench_machines2"), args.idle, 20
    )
    print(f"CPU check at the end: {cpu_check():.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
