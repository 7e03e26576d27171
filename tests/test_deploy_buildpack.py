"""A deploy the way a Heroku-style platform does it, from a copy of the source tree: a fresh
venv with `pip install -r requirements.txt`, the Procfile's `release:` from another directory
against a fresh PostgreSQL database, then `honcho start -f Procfile web worker` with the config
vars only. The admin from the config vars logs in, a task runs end to end, and SIGTERM to honcho
with an activity stream open ends every process within 10 s."""

from __future__ import annotations

import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import (
    PrivateRedis,
    descendants,
    drop_postgres_database,
    free_port,
    fresh_postgres_database,
    wait_for,
)

ROOT = Path(__file__).parent.parent
ADMIN_PASSWORD = "config-var-admin-password"


def _source_copy(dest: Path) -> Path:
    """The tracked (and new, unignored) files of the checkout: what a push delivers."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _call(base: str, method: str, path: str, body=None, token: str | None = None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=40) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except OSError:  # not listening (yet)
        return 0, None


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.postgres
def test_buildpack_release_and_procfile_serve_a_task_and_stop_within_10s(tmp_path):
    app_dir = _source_copy(tmp_path / "app")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "-r", "requirements.txt"],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    # the app runs from the installed package, not from the source tree
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import app.extensions as e; print(e.MIGRATIONS)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert "site-packages" in where and Path(where, "versions").is_dir()

    name = f"sb_deploy_{uuid.uuid4().hex[:10]}"
    url = fresh_postgres_database(os.environ["DATABASE_URL"], name)
    redis_server = PrivateRedis()
    redis_server.start()
    port = free_port()
    config_vars = {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "PORT": str(port),
        "SWITCHBOARD_ENV": "production",
        "SECRET_KEY": "a-production-secret-key-of-48-characters-or-more!",
        "SWITCHBOARD_SECRETS_KEY": "x9mU2lZ1QvKk6bqS3n7uXyR0cT4wV8eH5aJdFgPiLoM=",
        # a platform's add-on hands out postgres:// URLs
        "DATABASE_URL": "postgres://" + url.split("://", 1)[1],
        "REDIS_URL": redis_server.url,
        "SWITCHBOARD_ADMIN_USERNAME": "owner",
        "SWITCHBOARD_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "SWITCHBOARD_ADMIN_EMAIL": "owner@example.com",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "8",
        "SWITCHBOARD_WORKER_PROCESSES": "1",
        "PYTHONUNBUFFERED": "1",
    }
    procfile = dict(
        line.split(": ", 1) for line in (app_dir / "Procfile").read_text().splitlines() if line
    )
    log_path = tmp_path / "honcho.log"
    honcho = None
    try:
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        release = subprocess.run(
            shlex.split(procfile["release"]),
            cwd=elsewhere,
            env=config_vars,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert release.returncode == 0, release.stdout + release.stderr
        assert "created admin user 'owner'" in release.stdout
        assert ADMIN_PASSWORD not in release.stdout + release.stderr

        with open(log_path, "w") as log:
            honcho = subprocess.Popen(
                [str(venv / "bin" / "honcho"), "start", "-f", "Procfile", "web", "worker"],
                cwd=app_dir,
                env=config_vars,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}/api/v1"
        wait_for(lambda: _call(base, "GET", "/health/ready")[0] == 200, timeout=60, interval=0.2)
        assert f"Listening at: http://0.0.0.0:{port}" in log_path.read_text()

        status, tokens = _call(
            base, "POST", "/auth/login", {"username": "owner", "password": ADMIN_PASSWORD}
        )
        assert status == 200, tokens
        token = tokens["access_token"]
        status, project = _call(
            base,
            "POST",
            "/projects",
            {"key": "deployed", "name": "Deployed", "default_agent": "shell"},
            token,
        )
        assert status == 201, project
        status, task = _call(
            base,
            "POST",
            "/tasks",
            {"project": "deployed", "title": "hello", "prompt": "echo hello from the release"},
            token,
        )
        assert status == 201, task
        deadline = time.monotonic() + 60
        while task["status"] not in ("completed", "failed", "cancelled"):
            assert time.monotonic() < deadline, (task, log_path.read_text()[-3000:])
            status, task = _call(
                base, "GET", f"/tasks/{task['id']}?wait=20&status={task['status']}", token=token
            )
        assert task["status"] == "completed", (task, log_path.read_text()[-3000:])
        status, log_text = _call(base, "GET", f"/runs/{task['latest_run_id']}/log", token=token)
        assert status == 200 and log_text["text"] == "hello from the release\n"
        # nothing of the deploy was written under the installed package
        assert not list(venv.glob("lib/python*/site-packages/instance"))

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/api/v1/stream", headers={"Authorization": f"Bearer {token}"})
        stream = conn.getresponse()
        assert stream.status == 200 and stream.read1(100).startswith(b": stream open")

        everything = descendants(honcho.pid) | {honcho.pid}
        stopped_at = time.monotonic()
        honcho.send_signal(signal.SIGTERM)
        honcho.wait(timeout=10)
        wait_for(
            lambda: not _alive(everything), timeout=max(0.1, 10 - (time.monotonic() - stopped_at))
        )
        print(
            f"honcho and its {len(everything) - 1} processes ended "
            f"{time.monotonic() - stopped_at:.2f} s after SIGTERM"
        )
        conn.close()
    finally:
        if honcho is not None and honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
        redis_server.stop()
        drop_postgres_database(os.environ["DATABASE_URL"], name)
        print(log_path.read_text() if log_path.exists() else "")
