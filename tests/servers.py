"""Real server processes for the tests that need them: a `switchboard worker` pool and a
gunicorn, sharing the test's database and Redis; each stops for sure at the end."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TextIO

from flask import Flask
from helpers import free_port

from workers.process import child_pids

FAKE_AGENTS = Path(__file__).parent / "fake_agents"


def worker_env(app: Flask, **extra: str) -> dict[str, str]:
    """The environment a real `switchboard worker` needs to share the test's database/Redis."""
    cfg = app.config
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_ENV="testing",
        SECRET_KEY=cfg["SECRET_KEY"],
        DATABASE_URL=cfg["SWITCHBOARD_DATABASE_URL"],
        REDIS_URL=cfg["SWITCHBOARD_REDIS_URL"],
        SWITCHBOARD_INSTANCE_PATH=cfg["SWITCHBOARD_INSTANCE_PATH"],
        SWITCHBOARD_WORKSPACE_ROOT=cfg["SWITCHBOARD_WORKSPACE_ROOT"],
        SWITCHBOARD_WORKDIR_ROOTS=cfg["SWITCHBOARD_WORKDIR_ROOTS"],
        SWITCHBOARD_ALLOW_LOCAL_REPOS="true",
        SWITCHBOARD_SECRETS_KEY=cfg["SWITCHBOARD_SECRETS_KEY"],
        PATH=f"{FAKE_AGENTS}{os.pathsep}{os.environ.get('PATH', '')}",
        SWITCHBOARD_LEASE_SECONDS="4",
        SWITCHBOARD_LEASE_RENEW_SECONDS="1",
        SWITCHBOARD_SWEEP_INTERVAL="1",
        SWITCHBOARD_STOP_GRACE_SECONDS="3",
        SWITCHBOARD_LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Background:
    """A server process started for a test: its output, and a stop that always ends it."""

    proc: subprocess.Popen
    log: TextIO
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


class WorkerPool(Background):
    """A real `switchboard worker` (supervisor + worker processes) for one test."""

    def __init__(
        self, app: Flask, processes: int = 2, queues: str | None = None, **extra: str
    ) -> None:
        import sys

        self.log_path = Path(app.config["SWITCHBOARD_INSTANCE_PATH"]) / (
            f"worker-{os.getpid()}-{id(self)}.log"
        )
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        switchboard = Path(sys.executable).parent / "switchboard"
        argv = [str(switchboard), "worker", "--processes", str(processes)]
        if queues:
            argv += ["--queues", queues]
        self.proc = subprocess.Popen(
            argv,
            env=worker_env(app, **extra),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
            start_new_session=True,
        )

    def children(self) -> list[int]:
        return child_pids(self.proc.pid)


class LiveServer(Background):
    """A real gunicorn serving the test database and Redis, for what the test client cannot
    show: sockets, threads, streaming to a browser."""

    def __init__(self, app: Flask, port: int | None = None, **extra: str) -> None:
        """`port`: a port of its own, or the one a stopped server had (a restart)."""
        import sys

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(app.config["SWITCHBOARD_INSTANCE_PATH"]) / f"web-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        settings = {
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": "1",
            "GUNICORN_THREADS": "16",
            "SWITCHBOARD_STREAM_PING_SECONDS": "1",
        }
        env = worker_env(app, **{**settings, **extra})
        gunicorn = Path(sys.executable).parent / "gunicorn"
        self.proc = subprocess.Popen(
            [str(gunicorn), "-c", "gunicorn.conf.py", "wsgi:app"],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
            start_new_session=True,
        )
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/api/v1/health", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, self.log_path.read_text()
                time.sleep(0.1)

    def worker_pids(self) -> list[int]:
        return child_pids(self.proc.pid)

    def threads(self) -> int:
        total = 0
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    total += int(line.split()[1])
        return total
