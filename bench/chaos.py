"""Faults under load: five ways a deployment breaks, each while tasks are created and followed.

A real server (gunicorn, `switchboard worker`, PostgreSQL, a Redis server of its own that can be
killed) takes two task creations a second of a 50-line agent while a client follows the activity
stream (resuming with Last-Event-ID) and another reads a task every 30 ms. Then, one at a time:

  redis     the Redis server killed, started again empty 3 s later
  database  every connection of the database terminated every 50 ms for 10 s
  web       a gunicorn worker process killed (-9)
  worker    the worker process running a run killed (-9)
  sigterm   the worker pool stopped with SIGTERM, a new one started

and prints, per fault: tasks created, lost (never created though answered 201), run twice to
completion, stuck (not ended 60 s after the load), log gaps or repeats (a 50-line run whose log
is not the 50 lines once), activity stream gaps and repeats, 5xx answers by status (and how many
lacked Retry-After), and tracebacks in the processes' logs.

    .venv/bin/python bench/chaos.py [--database-url …] [--seconds-between 6]
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from harness import BIN, Client, Server, backend_parser, fresh_postgres_database
from helpers import PrivateRedis

from workers.process import child_pids

LINES = 50
PROMPT = f"for i in $(seq {LINES}); do echo line $i; done"
FAULTS = ("redis", "database", "web", "worker", "sigterm")


class LoggedServer(Server):
    """The harness's server with each process's output kept (tracebacks are counted)."""

    def _start(self, *argv: str, quiet: bool = False) -> subprocess.Popen[bytes]:
        name = Path(argv[0]).name + (f"-{argv[1]}" if len(argv) > 1 else "")
        log = open(self.instance / f"{name}-{len(self.procs)}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            list(argv),
            env=self.env,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def __exit__(self, *exc: object) -> None:
        self.procs = [p for p in self.procs if p.poll() is None]  # a pool stopped by a fault
        super().__exit__(*exc)

    def tracebacks(self) -> int:
        return sum(
            p.read_text(errors="replace").count("Traceback") for p in self.instance.glob("*.log")
        )


class Load:
    """Creations at a steady rate, a reader and a stream follower; what each saw, by fault."""

    def __init__(self, server: LoggedServer, token: str, rate: float) -> None:
        self.server, self.token, self.rate = server, token, rate
        self.fault = "before"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.created: dict[str, list[int]] = {}
        self.answers: dict[str, Counter[str]] = {}
        self.activity: list[int] = []
        self.threads = [
            threading.Thread(target=f, daemon=True)
            for f in (self._create, self._read, self._follow)
        ]

    def note(self, status: int, retry_after: bool) -> None:
        if status >= 500:
            key = f"{status}" + ("" if retry_after else " (no Retry-After)")
            with self.lock:
                self.answers.setdefault(self.fault, Counter())[key] += 1

    def _call(self, conn_box: list, method: str, path: str, body: dict | None = None):
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        for _ in range(2):
            try:
                conn = conn_box[0]
                conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
                self.note(resp.status, resp.getheader("Retry-After") is not None)
                return resp.status, raw
            except (OSError, http.client.HTTPException):
                conn_box[0] = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        return 0, b""

    def _create(self) -> None:
        box = [http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)]
        n = 0
        while not self.stop.is_set():
            n += 1
            status, raw = self._call(
                box,
                "POST",
                "/api/v1/tasks",
                {"project": "chaos", "title": f"t{n}", "prompt": PROMPT, "max_attempts": 3},
            )
            if status == 201:
                with self.lock:
                    self.created.setdefault(self.fault, []).append(json.loads(raw)["id"])
            time.sleep(1 / self.rate)

    def _read(self) -> None:
        box = [http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)]
        while not self.stop.is_set():
            ids = [i for ids in list(self.created.values()) for i in ids]
            if ids:
                self._call(box, "GET", f"/api/v1/tasks/{ids[-1]}")
            time.sleep(0.03)

    def _follow(self) -> None:
        last: str | None = None
        while not self.stop.is_set():
            headers = {"Authorization": f"Bearer {self.token}"}
            if last:
                headers["Last-Event-ID"] = last
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=20)
                conn.request("GET", "/api/v1/stream", headers=headers)
                resp = conn.getresponse()
                self.note(resp.status, resp.getheader("Retry-After") is not None)
                if resp.status != 200:
                    resp.read()
                    time.sleep(0.5)
                    continue
                buf = b""
                while not self.stop.is_set():
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    buf += chunk
                    while b"\n\n" in buf:
                        block, buf = buf.split(b"\n\n", 1)
                        for line in block.decode().split("\n"):
                            if line.startswith("id: "):
                                last = line[4:]
                                with self.lock:
                                    self.activity.append(int(last))
            except (OSError, http.client.HTTPException):
                time.sleep(0.5)


def _fault(name: str, server: LoggedServer, redis_server: PrivateRedis, db_url: str) -> None:
    if name == "redis":
        redis_server.stop()
        time.sleep(3)
        redis_server.start()
    elif name == "database":
        engine = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
        database = sa.engine.make_url(db_url).database
        end = time.monotonic() + 10
        with engine.connect() as conn:
            while time.monotonic() < end:
                conn.execute(
                    sa.text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                )
                time.sleep(0.05)
        engine.dispose()
    elif name == "web":
        os.kill(child_pids(server.web.pid)[0], signal.SIGKILL)
    elif name == "worker":
        assert server.pool is not None
        busy = [p for p in child_pids(server.pool.pid) if child_pids(p)] or child_pids(
            server.pool.pid
        )
        os.kill(busy[0], signal.SIGKILL)
    elif name == "sigterm":
        assert server.pool is not None
        os.killpg(server.pool.pid, signal.SIGTERM)
        server.pool.wait(timeout=30)
        server.pool = server._start(str(BIN / "switchboard"), "worker")


def main() -> None:
    parser = backend_parser(redis_db=0)
    parser.add_argument("--rate", type=float, default=2.0, help="task creations per second")
    parser.add_argument("--seconds-between", type=float, default=6.0)
    args = parser.parse_args()
    db_url = fresh_postgres_database(args.database_url, "sb_bench_chaos")
    redis_server = PrivateRedis()
    redis_server.start()
    settings = {
        "SWITCHBOARD_WORKER_PROCESSES": "2",
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
        # the clients here are the bench's own: its reads and writes are not to be limited
        "SWITCHBOARD_RATE_LIMIT_READ": "1000000/minute",
        "SWITCHBOARD_RATE_LIMIT_WRITE": "1000000/minute",
    }
    try:
        with LoggedServer(
            database_url=db_url, redis_url=redis_server.url, worker=True, **settings
        ) as server:
            admin = server.client()
            status, body = admin.call(
                "POST",
                "/api/v1/projects",
                {"key": "chaos", "name": "Chaos", "default_agent": "shell"},
            )
            assert status == 201, body
            load = Load(server, admin.token or "", args.rate)
            for t in load.threads:
                t.start()
            traces = {"before": server.tracebacks()}
            time.sleep(args.seconds_between)
            for name in FAULTS:
                load.fault = name
                before = server.tracebacks()
                _fault(name, server, redis_server, db_url)
                time.sleep(args.seconds_between)
                traces[name] = server.tracebacks() - before
                print(f"fault {name}: done", flush=True)
            load.fault = "after"
            time.sleep(2)
            load.stop.set()
            report(admin, load, traces, db_url)
    finally:
        redis_server.stop()


def report(admin: Client, load: Load, traces: dict[str, int], db_url: str) -> None:
    deadline = time.monotonic() + 60
    every = [i for ids in load.created.values() for i in ids]
    tasks: dict[int, dict] = {}
    while time.monotonic() < deadline:
        for task_id in every:
            if task_id not in tasks or tasks[task_id]["status"] not in (
                "completed",
                "failed",
                "cancelled",
            ):
                status, body = admin.call("GET", f"/api/v1/tasks/{task_id}")
                if status == 200:
                    tasks[task_id] = body
        if all(t.get("status") in ("completed", "failed", "cancelled") for t in tasks.values()):
            break
        time.sleep(1)
    seen = Counter(load.activity)
    repeats = sum(c - 1 for c in seen.values() if c > 1)
    ids = sorted(seen)
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:  # ids a rolled-back transaction took are no gap
        stored = set(
            conn.scalars(
                sa.text("SELECT id FROM activities WHERE id BETWEEN :a AND :b"),
                {"a": ids[0] if ids else 0, "b": ids[-1] if ids else 0},
            )
        )
    engine.dispose()
    missed = len(stored - set(ids))
    print(
        f"\nactivity stream: {len(ids)} events followed; of those stored between its first "
        f"and last, {missed} never reached it; {repeats} reached it twice"
    )
    print("\n| fault | created | lost | run twice | stuck | log gaps/repeats | 5xx | tracebacks |")
    print("|---|---|---|---|---|---|---|---|")
    for fault in ("before", *FAULTS, "after"):
        created = load.created.get(fault, [])
        lost = [i for i in created if i not in tasks]
        twice = stuck = bad_log = 0
        for task_id in created:
            task = tasks.get(task_id)
            if task is None:
                continue
            succeeded = [r for r in task["runs"] if r["status"] == "succeeded"]
            twice += len(succeeded) > 1
            stuck += task["status"] not in ("completed", "failed", "cancelled")
            for run in succeeded[:1]:
                _, log = admin.call("GET", f"/api/v1/runs/{run['id']}/log")
                expected = "".join(f"line {i}\n" for i in range(1, LINES + 1))
                bad_log += log.get("text") != expected
        fives = (
            ", ".join(f"{k}: {v}" for k, v in sorted(load.answers.get(fault, {}).items())) or "0"
        )
        print(
            f"| {fault} | {len(created)} | {len(lost)} | {twice} | {stuck} | {bad_log} | {fives} "
            f"| {traces.get(fault, '')} |"
        )


if __name__ == "__main__":
    main()
