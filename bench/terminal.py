"""Terminal bench: what a person at an attached terminal feels, and what viewers can take.

Starts gunicorn and `switchboard worker` on a fresh PostgreSQL database and a Redis db, then
prints, for a PTY task on the pool attached over real WebSockets:
  - keystroke -> echo round trip (p50, p99): one byte sent by the controller's socket, through
    gunicorn, the run's Redis inbox and the worker's PTY to `cat` (raw mode) and back through
    the run's channel to the same socket; one keystroke at a time, as a person types;
  - output throughput to each viewer (MB/s, first byte to last) while the agent prints lines
    as fast as it can, with 1 and with 20 viewers, and that every viewer got every byte. The
    viewers are read as a browser would, natively: raw sockets, frames parsed by hand, one
    selector for all (a Python WebSocket library would measure itself: 20 of them took both
    cores at 4-7 MB/s each).

    .venv/bin/python bench/terminal.py [--keystrokes 300] [--megabytes 20] [--viewers 1,20]
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import socket
import struct
import time

from harness import Server, backend_parser, cpu_check, fresh_postgres_database, pct
from simple_websocket import Client as Socket

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


class Viewer:
    """A viewer's socket read without a thread of its own and without a WebSocket library
    (a browser parses frames natively; a Python one would measure itself): the handshake by
    hand, then the server's (unmasked) frames."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(4096)
        head, self.raw = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.sock.setblocking(False)
        self.data = bytearray()
        self.first = self.last = 0.0
        self.done = False

    def feed(self, chunk: bytes, now: float) -> None:
        self.raw += chunk
        while len(self.raw) >= 2:
            opcode, size, at = self.raw[0] & 0x0F, self.raw[1] & 0x7F, 2
            if size == 126:
                if len(self.raw) < 4:
                    return
                size, at = struct.unpack(">H", self.raw[2:4])[0], 4
            elif size == 127:
                if len(self.raw) < 10:
                    return
                size, at = struct.unpack(">Q", self.raw[2:10])[0], 10
            if len(self.raw) < at + size:
                return
            payload, self.raw = self.raw[at : at + size], self.raw[at + size :]
            if opcode in (0, 2):  # output
                if not self.first and LINE[:10] in payload:
                    self.first = now
                self.data += payload
                self.last = now
            elif (opcode == 1 and b'"exit"' in payload) or opcode == 8:
                self.done = True


def throughput(c, port: int, viewers: int, megabytes: int) -> tuple[list[float], int]:  # type: ignore[no-untyped-def]
    size = megabytes * 1_000_000
    lines = size // len(LINE)
    run_id = run_task(
        c, f"sleep 3; yes '{LINE[:-1].decode()}' | head -n {lines}; echo {END.decode()}"
    )
    readers = []
    for _ in range(viewers):
        status, body = c.call("POST", f"/api/v1/runs/{run_id}/terminal-token", {"mode": "view"})
        assert status == 201, body
        readers.append(Viewer(port, f"/api/v1/runs/{run_id}/terminal?token={body['token']}"))
    sel = selectors.DefaultSelector()
    for r in readers:
        sel.register(r.sock, selectors.EVENT_READ, r)
    deadline = time.monotonic() + 600
    while not all(r.done for r in readers) and time.monotonic() < deadline:
        for key, _ in sel.select(1):
            try:
                chunk = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                key.data.done = True
                sel.unregister(key.fileobj)
                continue
            key.data.feed(chunk, time.perf_counter())
    sel.close()
    expected = LINE * lines + END
    rates, complete = [], 0
    for r in readers:
        got = bytes(r.data).replace(b"\r\n", b"\n")
        start = got.find(LINE)
        if got[start : start + len(expected)] == expected:
            complete += 1
        if r.last > r.first:
            rates.append(len(expected) / (r.last - r.first) / 1e6)
        r.sock.close()
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
