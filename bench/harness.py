"""What every benchmark needs: a real server on a temporary instance, an HTTP client, figures.

`Server` bootstraps a fresh instance (database upgraded, an admin `bench`), starts gunicorn and,
when asked, `switchboard worker` and an embedded Redis, waits until ready and stops everything on
exit. Loopback only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from workers.process import child_pids as children

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the suite's helpers serve the benchmarks too
from helpers import free_port, fresh_postgres_database  # noqa: E402, F401 - bench/ uses them

BIN = Path(sys.executable).parent
ADMIN = {"username": "bench", "password": "bench-password"}


def backend_parser(redis_db: int) -> argparse.ArgumentParser:
    """Options naming the PostgreSQL server and the Redis db a benchmark may wipe."""
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", f"redis://127.0.0.1:6379/{redis_db}"),
    )
    return parser


def cpu_check() -> float:
    """Milliseconds a fixed pure-Python loop takes now: virtual machines change speed under
    their host's load (here by 1.6x within seconds), so figures are printed with it."""
    started = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i
    return (time.perf_counter() - started) * 1000


def _cpu_of(pid: int) -> float:
    """CPU seconds (user + system) a live process has used."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _named(name: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class CpuMeter:
    """CPU seconds used by each part of the system between two readings: the web processes,
    the worker pool, PostgreSQL and Redis (all of this machine's, which serve only the bench).
    A cost per operation that the machine's changes of speed move far less than a rate."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.before = self.read()

    def read(self) -> dict[str, float]:
        web = [self.server.web.pid, *children(self.server.web.pid)]
        pool = self.server.pool
        workers = [pool.pid, *children(pool.pid)] if pool is not None else []
        return {
            "web": sum(map(_cpu_of, web)),
            "worker": sum(map(_cpu_of, workers)),
            "postgres": sum(map(_cpu_of, _named("postgres"))),
            "redis": sum(map(_cpu_of, _named("redis-server"))),
        }

    def per(self, count: int) -> str:
        """Milliseconds per operation since the last reading, by part; starts a new reading."""
        now = self.read()
        costs = {k: (now[k] - self.before[k]) * 1000 / max(count, 1) for k in now}
        self.before = now
        parts = "  ".join(f"{k} {v:.2f}" for k, v in costs.items() if v >= 0.005)
        return f"{sum(costs.values()):.2f} ms ({parts})"


def pct(values: list[float], p: float) -> float:
    """The p-quantile of durations in seconds, in milliseconds."""
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


class Client:
    """A keep-alive JSON client that reconnects when an idle connection was closed."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.token = token

    def call(
        self, method: str, path: str, body: dict | None = None, headers: dict | None = None
    ) -> tuple[int, Any]:
        hdrs = {"Content-Type": "application/json"} if body is not None else {}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        hdrs.update(headers or {})
        payload = json.dumps(body) if body is not None else None
        try:
            self.conn.request(method, path, body=payload, headers=hdrs)
            resp = self.conn.getresponse()
        except (ConnectionError, http.client.HTTPException):  # idle keep-alive was closed
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            self.conn.request(method, path, body=payload, headers=hdrs)
            resp = self.conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw else {})

    def login(self) -> str:
        status, tokens = self.call("POST", "/api/v1/auth/login", ADMIN)
        assert status == 200, tokens
        self.token = tokens["access_token"]
        return self.token


def load(
    port: int,
    token: str | None,
    seconds: float,
    clients: int,
    method: str,
    path: str,
    body: dict | None = None,
    headers: dict | None = None,
) -> tuple[list[float], int]:
    """`clients` threads sending the same request for `seconds`: latencies and failures."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        c = Client(port, token)
        mine, bad = [], 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            status, _ = c.call(method, path, body, headers)
            mine.append(time.perf_counter() - t0)
            bad += status >= 300
        with lock:
            latencies.extend(mine)
            failures[0] += bad

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, failures[0]


def read_response(sock: socket.socket, buffer: bytearray) -> int:
    """Read one response on a keep-alive connection; its status code."""
    return read_response_body(sock, buffer)[0]


def read_response_body(sock: socket.socket, buffer: bytearray) -> tuple[int, bytes]:
    """Read one response on a keep-alive connection; its status code and body."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        buffer += chunk
    head_end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:head_end]).decode("latin-1")
    length = 0
    for line in head.split("\r\n")[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    while len(buffer) < head_end + length:
        buffer += sock.recv(65536)
    body = bytes(buffer[head_end : head_end + length])
    del buffer[: head_end + length]
    return int(head.split(" ", 2)[1]), body


def socket_load(
    port: int, prepared: list[list[bytes]], seconds: float, reconnect_every: int = 0
) -> tuple[list[float], list[int], float]:
    """One thread per list of complete HTTP/1.1 requests (built before the clock starts: the
    load generator shares the cores with the server and should cost little), each on its own
    keep-alive connection, for at most `seconds`: latencies, statuses and the time it took."""
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(len(prepared) + 1)
    stop_at = [0.0]

    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def client(batch: list[bytes]) -> None:
        sock, buffer = connect(), bytearray()
        mine, codes = [], []
        start.wait()
        for n, request in enumerate(batch, 1):
            if time.monotonic() >= stop_at[0]:
                break
            t0 = time.perf_counter()
            if reconnect_every and n % reconnect_every == 0:
                sock.close()  # as some senders do: a new connection now and then
                sock, buffer = connect(), bytearray()
            sock.sendall(request)
            codes.append(read_response(sock, buffer))
            mine.append(time.perf_counter() - t0)
        sock.close()
        with lock:
            latencies.extend(mine)
            statuses.extend(codes)

    threads = [threading.Thread(target=client, args=(b,)) for b in prepared]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for t in threads:
        t.join()
    return latencies, statuses, time.monotonic() - began


class Server:
    def __init__(
        self,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        worker: bool = False,
        **settings: str,
    ) -> None:
        self.instance = Path(tempfile.mkdtemp(prefix="sbbench-"))
        self.port = free_port()
        self.worker = worker
        self.env = {
            **os.environ,
            "SWITCHBOARD_INSTANCE_PATH": str(self.instance),
            "PORT": str(self.port),
            "SWITCHBOARD_ADMIN_USERNAME": ADMIN["username"],
            "SWITCHBOARD_ADMIN_PASSWORD": ADMIN["password"],
            "SWITCHBOARD_LOG_LEVEL": "WARNING",
            # no access log: formatting lines nobody reads costs ~8% of a short request
            "GUNICORN_ACCESSLOG": os.environ.get("GUNICORN_ACCESSLOG", ""),
            **settings,
        }
        if database_url:
            self.env["DATABASE_URL"] = database_url
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        self.procs: list[subprocess.Popen[bytes]] = []

    def _start(self, *argv: str, quiet: bool = False) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv),
            env=self.env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL if quiet else None,
        )
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Server:
        if "REDIS_URL" not in self.env:
            self._start(str(BIN / "switchboard"), "embedded-redis")
            self.env["REDIS_URL"] = f"unix://{self.instance / 'redis.sock'}"
        subprocess.run(
            [str(BIN / "switchboard"), "release"],
            env=self.env,
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        self.web = self._start(
            str(BIN / "gunicorn"),
            "-c",
            "gunicorn.conf.py",
            "wsgi:app",
            "--log-level",
            "warning",
        )
        self.pool = None
        if self.worker:
            self.pool = self._start(str(BIN / "switchboard"), "worker", quiet=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if Client(self.port).call("GET", "/api/v1/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        if self.worker:
            # the run processes, and one more for the `events` queue
            self.wait_for_workers(int(self.env.get("SWITCHBOARD_WORKER_PROCESSES", 4)) + 1)
        return self

    def wait_for_workers(self, count: int) -> None:
        import redis
        from rq import Worker

        conn = redis.Redis.from_url(self.env["REDIS_URL"])
        deadline = time.monotonic() + 60
        while Worker.count(connection=conn) < count and time.monotonic() < deadline:
            time.sleep(0.1)

    def client(self) -> Client:
        c = Client(self.port)
        c.login()
        return c

    def __exit__(self, *_exc: object) -> None:
        for proc in reversed(self.procs):
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
