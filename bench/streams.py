"""Live stream benchmark: delay from an agent printing a line to a subscriber receiving it.

Starts gunicorn (one process, many threads: each open stream holds one) and `switchboard worker`
on a fresh PostgreSQL database and a Redis db, then prints:
  - print -> receive delay (p50, p99) with one subscriber per run over many runs;
  - the same with 100, 500 and 1,000 subscribers of one run, and how many streams stalled
    (missed bytes or waited more than a second);
  - lines per second ingested for one run printing as fast as it can, and that none were lost;
  - the web process's memory idle and with 1,000 idle streams.
The agent stamps each line with `$EPOCHREALTIME`, so the delay is measured end to end on one
clock. Bounded in time; loopback only.

    .venv/bin/python bench/streams.py [--runs 1000] [--parallel 4] [--fanout 100,500,1000]
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import time
from pathlib import Path

from harness import Server, backend_parser, children, fresh_postgres_database, pct


class Stream:
    """One SSE connection read without a thread of its own."""

    def __init__(self, port: int, path: str, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        self.sock.setblocking(False)
        self.buf = b""
        self.raw = b""
        self.need: int | None = None
        self.header_done = False
        self.text = ""
        self.partial = ""
        self.done = False
        #: the stream replayed and is live (its first `status` arrived)
        self.ready = False
        self.delays: list[float] = []

    def feed(self, data: bytes, now: float) -> None:
        self.raw += data
        if not self.header_done:
            if b"\r\n\r\n" not in self.raw:
                return
            self.raw = self.raw.split(b"\r\n\r\n", 1)[1]
            self.header_done = True
        while True:  # HTTP/1.1 chunked transfer encoding
            if self.need is None:
                if b"\r\n" not in self.raw:
                    break
                size, self.raw = self.raw.split(b"\r\n", 1)
                self.need = int(size.split(b";")[0], 16)
            if len(self.raw) < self.need + 2:
                break
            self.buf += self.raw[: self.need]
            self.raw = self.raw[self.need + 2 :]
            self.need = None
        self.frames(now)

    def frames(self, now: float) -> None:
        import json

        while b"\n\n" in self.buf:
            block, self.buf = self.buf.split(b"\n\n", 1)
            event, payload = None, None
            for line in block.split(b"\n"):
                if line.startswith(b"event: "):
                    event = line[7:].decode()
                elif line.startswith(b"data: "):
                    payload = json.loads(line[6:])
            if event == "log":
                self.text += payload["text"]
                lines = (self.partial + payload["text"]).split("\n")
                self.partial = lines.pop()
                for stamp in lines:
                    with contextlib.suppress(ValueError):
                        self.delays.append(now - float(stamp))
            elif event == "status":
                self.ready = True
            elif event == "done":
                self.done = True


def pump(streams: list[Stream], until, timeout: float) -> None:  # type: ignore[no-untyped-def]
    sel = selectors.DefaultSelector()
    for s in streams:
        sel.register(s.sock, selectors.EVENT_READ, s)
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            try:
                data = key.fileobj.recv(262144)
            except BlockingIOError:
                continue
            now = time.time()
            if data:
                key.data.feed(data, now)
            else:
                sel.unregister(key.fileobj)
    sel.close()


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children; NaN when it is gone (it crashed)."""
    total = 0
    for p in [pid, *children(pid)]:
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            return float("nan")
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def main() -> None:
    parser = backend_parser(redis_db=15)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=4, help="runs followed at once")
    parser.add_argument("--fanout", default="100,500,1000")
    parser.add_argument("--ingest-lines", type=int, default=1_000_000)
    args = parser.parse_args()

    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    db_url = fresh_postgres_database(args.database_url, "sb_bench_streams")
    settings = {
        "SWITCHBOARD_RATE_LIMIT_ENABLED": "false",
        "SWITCHBOARD_STREAM_CAP": "5000",
        # a process that serves only streams: every thread may hold one
        "SWITCHBOARD_STREAMS_PER_PROCESS": "1200",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "1200",
        "SWITCHBOARD_WORKER_PROCESSES": "2",
    }
    with Server(database_url=db_url, redis_url=args.redis_url, worker=True, **settings) as server:
        port = server.port
        c = server.client()
        token = c.token
        c.call("POST", "/api/v1/projects", {"key": "s", "name": "s", "default_agent": "shell"})
        web_pid = children(server.web.pid)[0]
        idle = rss_mb(web_pid)
        print(
            f"Switchboard stream bench: PostgreSQL + Redis, 1 gunicorn process x 1200 "
            f"threads, {os.cpu_count()} CPUs"
        )

        stamp_script = "for i in $(seq 1 {n}); do echo $EPOCHREALTIME; sleep {gap}; done"

        # 1. one subscriber per run
        delays, stalled = [], 0
        for first in range(0, args.runs, args.parallel):
            batch = []
            for _ in range(min(args.parallel, args.runs - first)):
                _, t = c.call(
                    "POST",
                    "/api/v1/tasks",
                    {
                        "project": "s",
                        "title": "s",
                        # a moment for the subscriber to connect: lines printed before it
                        # listens reach it from the database replay, not what this measures
                        "prompt": "sleep 0.2; " + stamp_script.format(n=10, gap=0.01),
                    },
                )
                batch.append(Stream(port, f"/api/v1/runs/{t['latest_run_id']}/stream", token))
            pump(batch, lambda b=batch: all(s.done for s in b), 30)
            for s in batch:
                delays += s.delays
                stalled += (not s.done) or any(d > 1 for d in s.delays)
                s.sock.close()
        print(
            f"1 subscriber per run ({args.runs} runs, {len(delays)} lines): "
            f"p50 {pct(delays, 0.5):.2f} ms  p99 {pct(delays, 0.99):.2f} ms  "
            f"stalled streams {stalled}"
        )

        # 2. many subscribers of one run: the agent waits until every subscriber is live (a
        # thousand connections take seconds to open; lines printed meanwhile would measure
        # that, not the fan-out), then prints 100 stamped lines 20 ms apart
        for n in [int(x) for x in args.fanout.split(",")]:
            go = server.instance / f"go-{n}"
            _, t = c.call(
                "POST",
                "/api/v1/tasks",
                {
                    "project": "s",
                    "title": "f",
                    "prompt": f"while [ ! -e {go} ]; do sleep 0.01; done; "
                    + stamp_script.format(n=100, gap=0.02),
                },
            )
            opened = time.monotonic()
            streams = [
                Stream(port, f"/api/v1/runs/{t['latest_run_id']}/stream", token) for _ in range(n)
            ]
            pump(streams, lambda ss=streams: all(s.ready for s in ss), 120)
            took = time.monotonic() - opened
            open_rss = rss_mb(web_pid)  # every stream open, live and idle
            go.touch()
            pump(streams, lambda ss=streams: all(s.done for s in ss), 120)
            lines = [d for s in streams for d in s.delays]
            expected = streams[0].text if streams else ""
            bad = sum(
                1
                for s in streams
                if not s.done or s.text != expected or any(d > 1 for d in s.delays)
            )
            print(
                f"{n} subscribers of one run: p50 {pct(lines, 0.5):.2f} ms  "
                f"p99 {pct(lines, 0.99):.2f} ms  stalled streams {bad}  "
                f"(all live {took:.1f} s after connecting)"
            )
            if n == max(int(x) for x in args.fanout.split(",")):
                print(
                    f"web process memory: {idle:.0f} MB idle, {open_rss:.0f} MB "
                    f"with {n} idle streams open"
                )
            for s in streams:
                s.sock.close()

        # 3. ingest
        _, t = c.call(
            "POST",
            "/api/v1/tasks",
            {"project": "s", "title": "i", "prompt": f"seq 1 {args.ingest_lines}"},
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            _, task = c.call("GET", f"/api/v1/tasks/{t['id']}")
            if task["status"] in ("completed", "failed"):
                break
            time.sleep(0.2)
        run = task["runs"][0]
        from datetime import datetime

        took = datetime.fromisoformat(
            run["finished_at"].replace("Z", "+00:00")
        ) - datetime.fromisoformat(run["started_at"].replace("Z", "+00:00"))
        expected = sum(len(str(i)) + 1 for i in range(1, args.ingest_lines + 1))
        print(
            f"ingest: {args.ingest_lines / took.total_seconds():,.0f} lines/s "
            f"({args.ingest_lines:,} lines in {took.total_seconds():.2f} s), stored "
            f"{run['log_size']:,} of {expected:,} bytes"
        )


if __name__ == "__main__":
    main()
