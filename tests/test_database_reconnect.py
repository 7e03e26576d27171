"""Pooled PostgreSQL connections that died while idle (a database restart, a proxy's idle
timeout) are replaced before use, without a ping on every request."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask
from helpers import assert_problem, count, wait_for

pytestmark = pytest.mark.postgres


def kill_connections(app: Flask) -> int:
    """What a database restart does to every connection of this test's database: how many."""
    from app.database import db

    with app.app_context():
        url = db.engine.url
    engine = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as admin_conn:
        killed = admin_conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = :db AND pid <> pg_backend_pid()"
            ),
            {"db": url.database},
        ).scalar()
    engine.dispose()
    return killed or 0


def test_a_connection_killed_while_idle_is_replaced(app, client, admin, monkeypatch):
    from app import database
    from app.database import db

    assert client.get("/api/v1/me", headers=admin.headers).status_code == 200
    with app.app_context():
        pids = {row[0] for row in db.session.execute(sa.text("SELECT pg_backend_pid()"))}
        db.session.remove()
    killed = kill_connections(app)
    assert killed >= len(pids) >= 1
    monkeypatch.setattr(database, "PING_IDLE_SECONDS", 0.0)  # every pooled one counts as idle
    for _ in range(3):
        assert client.get("/api/v1/me", headers=admin.headers).status_code == 200


def test_a_kept_connection_is_reused_and_replaced_when_it_died_idle(app):
    """A worker keeps one connection for its hand-written statements (`KeptConnection`): the
    same connection serves use after use without the pool; an error inside a transaction
    discards it; and one whose server side died while it sat idle is replaced, not used."""
    import psycopg

    from app import database
    from app.database import db

    def backend(kept: database.KeptConnection) -> int:
        with kept.use() as driver:
            return driver.execute("SELECT pg_backend_pid()").fetchone()[0]

    with app.app_context():
        db.engine.dispose()  # no pooled connection an earlier test's kill left behind
        kept = database.KeptConnection()
        first = backend(kept)
        checked_out = db.engine.pool.checkedout()
        assert backend(kept) == first and db.engine.pool.checkedout() == checked_out

        with pytest.raises(psycopg.errors.DivisionByZero), kept.use() as driver:
            driver.execute("BEGIN")
            driver.execute("SELECT 1 / 0")
        second = backend(kept)
        assert second != first  # the spoiled one was discarded

        # the pool's other idle connections are taken, so it hands out the kept one next
        others = [db.engine.raw_connection() for _ in range(db.engine.pool.checkedin())]
        url = db.engine.url.set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (second,))
        # it sat idle: back to the pool, which tests it before handing it out again
        kept.used_at -= database.PING_IDLE_SECONDS + 1
        third = backend(kept)
        assert third not in (first, second)
        kept.release()
        for conn in others:
            conn.close()


def test_a_creation_on_a_connection_that_died_is_answered_and_made_once(app, client, admin):
    """A database restart kills the pooled connections while they are in use, too quick for
    the idle ping: the fast path's read fails with nothing written, the pool lets its other dead
    connections go, and the request is answered anyway (by the view, on a new connection)."""
    from app.database import db

    h = admin.headers
    assert client.post("/api/v1/projects", headers=h, json={"key": "p", "name": "P"}).status_code
    body = {"project": "p", "title": "t", "prompt": "echo", "target": "external"}
    assert client.post("/api/v1/tasks", headers=h, json=body).status_code == 201
    with app.app_context():  # the pool holds several, as a busy server's does: all will die
        held = [db.engine.raw_connection() for _ in range(4)]
        for conn in held:
            conn.close()
    assert kill_connections(app) >= 4
    for title in ("after", "again"):
        resp = client.post("/api/v1/tasks", headers=h, json={**body, "title": title})
        assert resp.status_code == 201, resp.get_json()
    with app.app_context():
        titles = db.session.scalars(sa.text("SELECT title FROM tasks ORDER BY id")).all()
        db.session.remove()
    assert titles == ["t", "after", "again"]


def test_a_creation_whose_connection_died_during_its_write_is_not_made_twice(app, client, admin):
    """Lost with the write sent, a creation may have been made: the fast path says the outcome
    is unknown (500 `outcome_unknown`, as the view would), and neither retries it nor hands it
    to the view."""
    import threading
    import time

    from app.database import db

    h = admin.headers
    assert client.post("/api/v1/projects", headers=h, json={"key": "p", "name": "P"}).status_code
    body = {"project": "p", "title": "t", "prompt": "echo", "target": "external"}
    with app.app_context():
        url = db.engine.url
    blocker = sa.create_engine(url)
    answers = []
    with blocker.connect() as conn, blocker.connect() as poll:
        poll.execution_options(isolation_level="AUTOCOMMIT")
        # the write's queue-count trigger waits for this lock: the write is sent and pending
        conn.execute(sa.text("LOCK TABLE task_queue_counts IN EXCLUSIVE MODE"))
        post = threading.Thread(
            target=lambda: answers.append(
                app.test_client().post("/api/v1/tasks", headers=h, json=body)
            )
        )
        post.start()
        deadline = time.monotonic() + 10
        waiting = []
        while not waiting and time.monotonic() < deadline:
            waiting = (  # another session: statistics stay as first read in a transaction
                poll.execute(
                    sa.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = :db"
                        " AND wait_event_type = 'Lock' AND query LIKE '%%INSERT INTO tasks%%'"
                    ),
                    {"db": url.database},
                )
                .scalars()
                .all()
            )
            time.sleep(0.02)
        assert waiting, "the write never waited for the lock"
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": waiting[0]})
        conn.rollback()
    blocker.dispose()
    post.join(10)
    resp = answers[0]
    assert resp.status_code == 500
    assert resp.content_type == "application/problem+json"
    # it says so: the outcome is unknown, look first or resend with an Idempotency-Key
    assert resp.get_json()["code"] == "outcome_unknown"
    assert "Idempotency-Key" in resp.get_json()["detail"] and resp.headers["Retry-After"] == "1"
    assert resp.get_json()["request_id"] == resp.headers["X-Request-ID"]
    with app.app_context():
        count = db.session.scalar(sa.text("SELECT count(*) FROM tasks"))
        db.session.remove()
    assert count == 0  # rolled back when its session ended, and not made again by the view


@contextlib.contextmanager
def database_away(app: Flask) -> Iterator[None]:
    """What a database restart looks like from here: every connection dropped, and new ones
    refused until the block ends."""
    from app.database import db

    with app.app_context():
        url = db.engine.url
    engine = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with engine.connect() as admin_conn:
        admin_conn.execute(sa.text(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false'))
        try:
            kill_connections(app)
            yield
        finally:
            admin_conn.execute(sa.text(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true'))
    engine.dispose()


def test_a_run_goes_on_through_a_database_restart(app, client, member, project, worker):
    """The agent is not stopped: its output is kept and written when the database is back, its
    end too; meanwhile the API answers 503 with Retry-After and creates nothing."""
    from test_execution import create, log_text, wait_status

    from app.tasks.models import Task

    t = create(client, member, prompt="for i in 1 2 3 4; do echo tick $i; sleep 0.3; done")
    wait_for(
        lambda: (
            (run := task_run(client, member, t["id"]))
            and log_text(client, member, run["id"])[0].startswith("tick 1")
        ),
        timeout=15,
    )
    with database_away(app):
        refused = client.post(
            "/api/v1/tasks",
            json={"project": "demo", "title": "t2", "prompt": "echo no"},
            headers=member.headers,
        )
        listed = client.get("/api/v1/tasks", headers=member.headers)
        time.sleep(1.5)  # the agent prints on, and ends, while the database is away
    for resp in (refused, listed):
        body = assert_problem(resp, 503, "service_unavailable")
        assert resp.headers["Retry-After"] == "1" and "nothing was changed" in body["detail"]
    done = wait_status(client, member, t["id"], ("completed", "failed"), timeout=20)
    assert done["status"] == "completed", done
    assert [(r["attempt"], r["status"], r["exit_code"]) for r in done["runs"]] == [
        (1, "succeeded", 0)
    ]
    text, page = log_text(client, member, done["runs"][0]["id"])
    assert text == "tick 1\ntick 2\ntick 3\ntick 4\n" and page["complete"]
    assert count(app, Task) == 1
    assert "the database is back" in worker.output()


def task_run(client, acct, task_id):
    runs = client.get(f"/api/v1/tasks/{task_id}", headers=acct.headers).get_json()["runs"]
    return runs[0] if runs and runs[0]["status"] == "running" else None


def test_a_webhook_delivered_while_the_database_is_away_is_refused_then_taken(app, client, admin):
    """The sender gets a 503 problem it may retry (not a dropped connection), and the same
    delivery sent again once the database is back is stored once."""
    from test_webhooks import SECRET, deliver, fixture

    from app.webhooks.models import WebhookEvent

    made = client.post(
        "/api/v1/webhook-sources",
        headers=admin.headers,
        json={"name": "gh", "kind": "github", "secret": SECRET},
    )
    assert made.status_code == 201, made.get_json()
    payload = fixture("issues.labeled")
    with database_away(app):
        refused = deliver(client, payload, "issues", delivery="d-1")
    assert_problem(refused, 503, "service_unavailable")
    assert count(app, WebhookEvent) == 0
    for _ in range(2):
        assert deliver(client, payload, "issues", delivery="d-1").status_code in (200, 202)
    assert count(app, WebhookEvent) == 1


def test_a_connection_lost_before_teardown_still_answers_problem_json_or_its_result(
    app, client, admin
):
    """Faults issue, item 1: the database ended the request's connection after the view made its
    answer; the session's ROLLBACK at teardown fails. Before, that escaped Flask and the server
    sent its own HTML 500 (no problem+json, no X-Request-ID). Now the answer goes out, the
    broken session is dropped, and the next request gets a working connection."""
    for _ in range(3):
        resp = client.get("/api/v1/_test/connection-dropped")
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.is_json and resp.headers.get("X-Request-ID")
        assert client.get("/api/v1/me", headers=admin.headers).status_code == 200


def test_a_stream_whose_replay_meets_the_database_away_ends_with_its_last_chunk(
    app, client, member, project, worker
):
    """Faults issue, item 2: a run's stream goes back to the database when it sees a gap; with
    the database away that read fails. Before, the error escaped the stream (a traceback, and a
    chunked body cut without its last chunk); now the stream ends cleanly and the client
    resumes with Last-Event-ID."""
    import http.client

    from servers import LiveServer
    from test_execution import create, wait_status
    from test_live_streams import _frames

    from app.live import pubsub

    live = LiveServer(app)
    try:
        t = create(client, member, prompt="echo first; sleep 30; echo second")
        run_id = wait_status(client, member, t["id"], "running")["latest_run_id"]
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=20)
        conn.request("GET", f"/api/v1/runs/{run_id}/stream", headers=member.headers)
        resp = conn.getresponse()
        assert resp.status == 200
        frames = _frames(resp)
        for frame in frames:
            if frame.event == "log" and "first" in frame.data["text"]:
                break
        with database_away(app), app.app_context():
            pubsub.run_log(run_id, 1_000_000, b"beyond: a gap, so the stream reads the database")
            rest = list(frames)  # to the end of the body: an IncompleteRead before
        assert all(f.event != "log" or "beyond" not in f.data["text"] for f in rest)
        conn.close()
        client.post(f"/api/v1/tasks/{t['id']}/cancel", headers=member.headers)
    finally:
        live.stop()
    output = live.output()
    assert "Traceback" not in output, output
    assert "a stream ended: the database is unavailable" in output
