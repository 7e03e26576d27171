"""Terminal bench: what a person at an attached terminal feels, and what viewers can take.

Starts gunicorn and `switchboard worker` on a fresh PostgreSQL database and a Redis db, then
prints, for a PTY task on the pool attached over real WebSockets:
  - keystroke -> echo round trip (p50, p99): one byte sent by the controller's socket, through
    gunicorn, the run's Redis inbox and the worker's PTY to `cat` (raw mode) and back through
    the run's channel to the same socket; one keystroke at a time, as a person types;
  - output throughput to each viewer (MB/s, first byte to last) while the agent prints lines
    as fast as it can, with 1 and with 20 viewers, and that every viewer got every byte.

    .venv/bin/python bench/terminal.py [--keystrokes 300] [--megabytes 20] [--viewers 1,20]
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time

from harness import Server, backend_parser, cpu_check, fresh_postgres_database, pct
from simple_websocket import Client as Socket
from simple_websocket import ConnectionClosed

LINE = b"the quick brown fox jumps over the lazy dog 0123456789\n"
END = b"END-OF-OUTPUT"


def run_task(c, prompt: str) -> int:  # type: ignore[no-untyped-def]
    status, task = c.call(
        "POST", "/api/v1/tasks", {"project": "t", "title": "bench", "prompt": prompt, "tty": True}
    )
    assert status == 201, task
    deadline = time.monotonic() + 30
    while True:
        status, run = c.call("GET", f"/api/v1/runs/{task['latest_run_id']}")
        if run["status"] == "running":
            return int(run["id"])
        assert time.monotonic() < deadline, run
        time.sleep(0.05)


def attach(c, port: int, run_id: int, mode: str) -> Socket:  # type: ignore[no-untyped-def]
    status, body = c.call("POST", f"/api/v1/runs/{run_id}/terminal-token", {"mode": mode})
    assert status == 201, body
    ws = Socket.connect(
        f"ws://127.0.0.1:{port}/api/v1/runs/{run_id}/terminal?token={body['token']}"
    )
    hello = json.loads(ws.receive(timeout=10))
    assert hello["type"] == "hello", hello
    return ws


def round_trips(c, port: int, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    run_id = run_task(c, "stty raw -echo; cat")
    ws = attach(c, port, run_id, "control")
    while ws.receive(timeout=0.5) is not None:  # the scrollback, if any
        pass
    delays = []
    for i in range(count):
        key = bytes([97 + i % 26])
        started = time.perf_counter()
        ws.send(key)
        got = b""
        while not got.endswith(key):
            data = ws.receive(timeout=10)
            assert data is not None, f"no echo of {key!r}"
            if isinstance(data, bytes):
                got += data
        delays.append(time.perf_counter() - started)
        time.sleep(0.02)  # a fast typist: 50 keys a second
    c.call("POST", f"/api/v1/runs/{run_id}/stop")
    ws.close()
    return delays


class Viewer(threading.Thread):
    def __init__(self, ws: Socket) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.data = bytearray()
        self.first = self.last = 0.0

    def run(self) -> None:
        while True:
            data = self.ws.receive(timeout=60)
            if data is None:
                return
            if isinstance(data, bytes):
                now = time.perf_counter()
                if not self.first and LINE[:10] in data:
                    self.first = now
                self.data += data
                self.last = now
                if END in self.data[-64:]:
                    return


def throughput(c, port: int, viewers: int, megabytes: int) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    size = megabytes * 1_000_000
    lines = size // len(LINE)
    run_id = run_task(
        c, f"sleep 3; yes '{LINE[:-1].decode()}' | head -n {lines}; echo {END.decode()}"
    )
    sockets = [attach(c, port, run_id, "view") for _ in range(viewers)]
    readers = [Viewer(ws) for ws in sockets]
    for r in readers:
        r.start()
    for r in readers:
        r.join(timeout=600)
    expected = LINE * lines + END
    rates, complete = [], 0
    for r in readers:
        got = bytes(r.data).replace(b"\r\n", b"\n")
        start = got.find(LINE)
        if got[start : start + len(expected)] == expected:
            complete += 1
        if r.last > r.first:
            rates.append(len(expected) / (r.last - r.first) / 1e6)
        with contextlib.suppress(OSError, ConnectionClosed):
            r.ws.close()
    return rates, complete


def main() -> None:
    parser = backend_parser(redis_db=13)
    parser.add_argument("--keystrokes", type=int, default=300)
    parser.add_argument("--megabytes", type=int, default=20)
    parser.add_argument("--viewers", default="1,20")
    args = parser.parse_args()

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    db_url = fresh_postgres_database(args.database_url, "sb_bench_terminal")
    # 20 viewers of one user: more than the per-user cap of streams allows by default
    settings = {
        "SWITCHBOARD_WORKER_PROCESSES": "2",
        "WEB_CONCURRENCY": "2",
        "SWITCHBOARD_STREAM_CAP": "100",
        "GUNICORN_THREADS": "64",  # each socket holds a thread
    }
    with Server(database_url=db_url, redis_url=args.redis_url, worker=True, **settings) as server:
        c = server.client()
        c.call("POST", "/api/v1/projects", {"key": "t", "name": "t", "default_agent": "shell"})
        print(
            f"Switchboard terminal bench: PostgreSQL + Redis, 2 gunicorn processes, 2 workers, "
            f"{os.cpu_count()} CPUs; CPU check {cpu_check():.0f} ms"
        )
        delays = round_trips(c, server.port, args.keystrokes)
        print(
            f"keystroke -> echo round trip, {len(delays)} keys: p50 {pct(delays, 0.5):.1f} ms, "
            f"p99 {pct(delays, 0.99):.1f} ms (target <= 10 / 30)"
        )
        for n in [int(v) for v in args.viewers.split(",")]:
            rates, complete = throughput(c, server.port, n, args.megabytes)
            rates.sort()
            print(
                f"output to {n} viewer(s), {args.megabytes} MB of lines: "
                f"slowest {rates[0]:.1f} MB/s, median {rates[len(rates) // 2]:.1f} MB/s "
                f"(target >= 5); every byte: {complete}/{n} viewers"
            )


if __name__ == "__main__":
    main()
