"""`make run`'s command end to end: a live gunicorn, worker and embedded Redis, stopped by Ctrl-C.

This is the README's promise checked the way a newcomer would: start it with the admin in the
environment, wait for readiness, log in over real HTTP, press Ctrl-C, and find no process left.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from helpers import free_port, wait_for
from rq import Worker

from workers.process import find_tagged

ROOT = Path(__file__).parent.parent


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _exercise(base: str, instance: Path) -> None:
    wait_for(lambda: _get(f"{base}/health/ready") == 200, timeout=90, interval=0.2)
    assert _get(f"{base}/health") == 200
    req = urllib.request.Request(
        f"{base}/auth/login",
        method="POST",
        data=json.dumps({"username": "admin", "password": "first-admin-pw"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200 and json.load(resp)["access_token"]
    # the worker pool's processes are connected to the embedded Redis too
    conn = redis.Redis(unix_socket_path=str(instance / "redis.sock"))
    wait_for(lambda: Worker.count(connection=conn) == 3, timeout=30)  # 2 for runs, 1 for events
    # honcho, redis, gunicorn master and worker, the RQ worker (and their shells)
    assert len(find_tagged(f"SWITCHBOARD_INSTANCE_PATH={instance}")) >= 5


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_dev_server_starts_serves_and_stops_cleanly():
    instance = Path(tempfile.mkdtemp(prefix="sbdev-"))
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "SWITCHBOARD_ENV")
    }
    env.update(
        SWITCHBOARD_INSTANCE_PATH=str(instance),
        PORT=str(port),
        SWITCHBOARD_ADMIN_USERNAME="admin",
        SWITCHBOARD_ADMIN_PASSWORD="first-admin-pw",
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS="4",
        SWITCHBOARD_WORKER_PROCESSES="2",
    )
    with open(instance / "dev.log", "w+") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "switchboard"), "dev"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _exercise(f"http://127.0.0.1:{port}/api/v1", instance)
        finally:
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
            proc.wait(timeout=30)
            log.seek(0)
            output = log.read()
    try:
        wait_for(lambda: not find_tagged(f"SWITCHBOARD_INSTANCE_PATH={instance}"), timeout=15)
    except AssertionError:
        leftover = find_tagged(f"SWITCHBOARD_INSTANCE_PATH={instance}")
        for pid in leftover:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"processes left behind: {leftover}\n{output}") from None
    assert "first-admin-pw" not in output
    shutil.rmtree(instance, ignore_errors=True)
