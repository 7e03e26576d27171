"""Authenticated API throughput and latency under gunicorn.

Starts a real gunicorn (and an embedded Redis unless REDIS_URL is set) on a temporary instance,
then prints: GET /api/v1/me requests per second with a personal access token and with a JWT
(p50/p99 latency), and login latency (argon2id dominates it). Bounded in time; loopback only.

    .venv/bin/python bench/api.py [--seconds 10] [--clients 16]
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

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: dict | None = None,
    headers: dict | None = None,
) -> tuple[int, bytes]:
    payload = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if payload else {}
    conn.request(method, path, body=payload, headers={**hdrs, **(headers or {})})
    resp = conn.getresponse()
    return resp.status, resp.read()


def hammer(port: int, headers: dict, seconds: float, clients: int) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine: list[float] = []
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            status, _ = request(conn, "GET", "/api/v1/me", headers=headers)
            mine.append(time.perf_counter() - t0)
            if status != 200:
                with lock:
                    errors[0] += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), latencies, errors[0]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()

    instance = Path(tempfile.mkdtemp(prefix="sbbench-"))
    port = free_port()
    env = {
        **os.environ,
        "SWITCHBOARD_INSTANCE_PATH": str(instance),
        "PORT": str(port),
        "SWITCHBOARD_ADMIN_USERNAME": "bench",
        "SWITCHBOARD_ADMIN_PASSWORD": "bench-password",
        "SWITCHBOARD_RATE_LIMIT_READ": "100000000/minute",
        "GUNICORN_ACCESSLOG": "",
        "SWITCHBOARD_LOG_LEVEL": "WARNING",
    }
    procs = []
    if not os.environ.get("REDIS_URL"):
        procs.append(
            subprocess.Popen(
                [str(BIN / "switchboard"), "embedded-redis"], env=env, start_new_session=True
            )
        )
        env["REDIS_URL"] = f"unix://{instance / 'redis.sock'}"
    subprocess.run(
        [str(BIN / "switchboard"), "bootstrap"], env=env, check=True, capture_output=True, cwd=ROOT
    )
    procs.append(
        subprocess.Popen(
            [
                str(BIN / "gunicorn"),
                "-c",
                "gunicorn.conf.py",
                "wsgi:app",
                "--access-logfile",
                "/dev/null",
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                if request(conn, "GET", "/api/v1/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        login_times = []
        for _ in range(20):
            t0 = time.perf_counter()
            status, body = request(
                conn,
                "POST",
                "/api/v1/auth/login",
                {"username": "bench", "password": "bench-password"},
            )
            login_times.append(time.perf_counter() - t0)
            assert status == 200, body
        jwt = json.loads(body)["access_token"]
        status, body = request(
            conn,
            "POST",
            "/api/v1/me/tokens",
            {"label": "bench", "abilities": ["projects:read"]},
            {"Authorization": f"Bearer {jwt}"},
        )
        pat = json.loads(body)["token"]
        db = "PostgreSQL" if "postgres" in env.get("DATABASE_URL", "") else "SQLite"
        print(
            f"Switchboard API bench: {db}, {args.clients} clients, {args.seconds:.0f}s each, "
            f"WEB_CONCURRENCY={env.get('WEB_CONCURRENCY', 'default')}"
        )
        print(f"login: p50 {pct(login_times, 0.5):.1f} ms  p99 {pct(login_times, 0.99):.1f} ms")
        for label, headers in (
            ("GET /me with PAT", {"X-API-Key": pat}),
            ("GET /me with JWT", {"Authorization": f"Bearer {jwt}"}),
        ):
            n, lat, errors = hammer(port, headers, args.seconds, args.clients)
            print(
                f"{label}: {n / args.seconds:.0f} req/s  p50 {pct(lat, 0.5):.1f} ms  "
                f"p99 {pct(lat, 0.99):.1f} ms  errors {errors}"
            )
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=30)


if __name__ == "__main__":
    main()
