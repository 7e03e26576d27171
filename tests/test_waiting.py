"""Waiting without polling: run and task reads carry ETags (304 while current) and long-poll with
`?wait=`, answered by the change itself, holding no database connection while they wait."""

from __future__ import annotations

import threading
import time
from typing import Any

from helpers import account, assert_problem, wait_for


def external_task(client: Any, who: Any) -> dict:
    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    resp = client.post("/api/v1/tasks", headers=who.headers, json=body)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def claim(client: Any, who: Any, task: dict) -> dict:
    resp = client.post(
        f"/api/v1/tasks/{task['id']}/claim", headers=who.headers, json={"executor": "e1"}
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def in_thread(app: Any, path: str, headers: dict) -> tuple[threading.Thread, dict]:
    """GET `path` from a thread of its own (its own test client): the answer lands in `got`."""
    got: dict = {}

    def ask() -> None:
        resp = app.test_client().get(path, headers=headers)
        got.update(status=resp.status_code, body=resp.get_json())

    thread = threading.Thread(target=ask)
    thread.start()
    return thread, got


def waiters(app: Any, channel: str) -> int:
    from app.live.hub import hub

    with app.app_context():
        h = hub()
        with h.lock:
            return len(h.subscribers.get(channel, ()))


def test_a_run_read_has_an_etag_and_is_not_modified_while_current(client, member, project):
    task = external_task(client, member)
    path = f"/api/v1/runs/{task['latest_run_id']}"
    first = client.get(path, headers=member.headers)
    tag = first.headers["ETag"]
    assert first.status_code == 200 and tag
    same = client.get(path, headers={**member.headers, "If-None-Match": tag})
    assert same.status_code == 304 and same.get_data() == b""
    claim(client, member, task)  # queued → assigned: the representation changes
    changed = client.get(path, headers={**member.headers, "If-None-Match": tag})
    assert changed.status_code == 200 and changed.headers["ETag"] != tag
    assert changed.get_json()["status"] == "assigned"
    detail = client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers)
    again = client.get(
        f"/api/v1/tasks/{task['id']}",
        headers={**member.headers, "If-None-Match": detail.headers["ETag"]},
    )
    assert again.status_code == 304


def test_a_long_poll_is_answered_by_the_change_not_by_the_timeout(app, client, member, project):
    """A client waiting 30 s on a run's status gets the new status as soon as it changes."""
    from app.live import pubsub

    task = external_task(client, member)
    run_id = task["latest_run_id"]
    with app.app_context():
        channel = pubsub.run_channel(run_id)
    thread, got = in_thread(app, f"/api/v1/runs/{run_id}?wait=30&status=queued", member.headers)
    wait_for(lambda: waiters(app, channel) == 1, timeout=5)  # it waits
    assert got == {}
    claim(client, member, task)  # the change
    thread.join(timeout=5)
    assert not thread.is_alive(), "the long-poll was not answered by the change"
    assert got["status"] == 200 and got["body"]["status"] == "assigned"
    assert waiters(app, channel) == 0


def test_a_long_poll_answers_at_once_when_the_client_is_behind(client, member, project):
    task = external_task(client, member)
    resp = client.get(
        f"/api/v1/runs/{task['latest_run_id']}?wait=30&status=running", headers=member.headers
    )
    assert resp.status_code == 200 and resp.get_json()["status"] == "queued"


def test_a_long_poll_ends_with_the_current_state_when_nothing_changes(client, member, project):
    task = external_task(client, member)
    resp = client.get(f"/api/v1/tasks/{task['id']}?wait=0.3", headers=member.headers)
    assert resp.status_code == 200 and resp.get_json()["status"] == "queued"


def test_a_task_long_poll_follows_its_run(app, client, member, project):
    from app.live import pubsub

    task = external_task(client, member)
    with app.app_context():
        channel = pubsub.run_channel(task["latest_run_id"])
    path = f"/api/v1/tasks/{task['id']}?wait=30"
    thread, got = in_thread(app, path, member.headers)
    wait_for(lambda: waiters(app, channel) == 1, timeout=5)
    claim(client, member, task)
    beat = client.post(  # an external executor's first heartbeat: the run is running
        f"/api/v1/runs/{task['latest_run_id']}/heartbeat",
        headers=member.headers,
        json={"executor": "e1"},
    )
    assert beat.status_code == 200, beat.get_json()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert got["body"]["status"] == "running" and got["body"]["runs"][0]["status"] == "running"


def test_waiting_reads_hold_no_database_connection(app, client, member, project):
    """Many clients waiting at once: each holds a thread and a place in the process's one Redis
    listener, none a database connection."""
    from app.database import db
    from app.live import pubsub

    task = external_task(client, member)
    run_id = task["latest_run_id"]
    with app.app_context():
        channel = pubsub.run_channel(run_id)
    path = f"/api/v1/runs/{run_id}?wait=30&status=queued"
    threads = [in_thread(app, path, member.headers) for _ in range(20)]
    wait_for(lambda: waiters(app, channel) == 20, timeout=10)

    def none_held() -> bool:
        with app.app_context():
            return db.engine.pool.checkedout() == 0

    # a waiter that has just subscribed reads the run once more, then lets its connection go
    # before it waits: within moments none is held, and a waiter that kept one would keep it
    # for the whole 30 s
    wait_for(none_held, timeout=5)
    claim(client, member, task)
    for thread, got in threads:
        thread.join(timeout=10)
        assert got["body"]["status"] == "assigned"


def test_a_long_poll_of_anothers_run_is_a_404(app, client, member, project):
    """Waiting does not skip the check: a run of a project one cannot see is not found."""
    task = external_task(client, member)
    other = account(app, client, "mallory")
    resp = client.get(f"/api/v1/runs/{task['latest_run_id']}?wait=5", headers=other.headers)
    assert_problem(resp, 404)
    bad = client.get(f"/api/v1/runs/{task['latest_run_id']}?wait=600", headers=member.headers)
    assert_problem(bad, 422)


def test_a_change_made_while_subscribing_is_not_missed(app, client, member, project, monkeypatch):
    """The run changes after the first read and before the subscription listens (its message is
    lost to this client): the read after subscribing sees it, fresh from the database."""
    from app.live import waiting

    task = external_task(client, member)
    real_hub = waiting.hub

    class ChangingHub:
        def subscribe(self, channels: list[str]) -> Any:
            # committed and announced before we listen, by another request (its own thread)
            other = threading.Thread(target=claim, args=(app.test_client(), member, task))
            other.start()
            other.join()
            return real_hub().subscribe(channels)

    monkeypatch.setattr(waiting, "hub", ChangingHub)
    asked = time.monotonic()
    resp = client.get(
        f"/api/v1/runs/{task['latest_run_id']}?wait=20&status=queued", headers=member.headers
    )
    assert resp.status_code == 200 and resp.get_json()["status"] == "assigned"
    assert time.monotonic() - asked < 10  # seen at once, not when the 20 s wait ran out


def test_the_cli_creates_a_task_and_waits_for_its_end(app, client, member, project, worker, live):
    """`switchboard tasks create --wait` against a live server: it returns once the task has
    ended, with the ended task, and its exit code says how it ended."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    switchboard = Path(sys.executable).parent / "switchboard"
    env = {**os.environ, "SWITCHBOARD_URL": live.url, "SWITCHBOARD_TOKEN": member.access_token}

    def create(prompt: str) -> subprocess.CompletedProcess:
        argv = [str(switchboard), "tasks", "create", "--project", "demo", "--prompt", prompt]
        return subprocess.run(
            [*argv, "--wait"], env=env, capture_output=True, text=True, timeout=60
        )

    done = create("echo hi; sleep 0.5; echo bye")
    assert done.returncode == 0, done.stderr
    task = json.loads(done.stdout)
    assert task["status"] == "completed" and task["runs"][0]["status"] == "succeeded"
    failed = create("exit 3")
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "failed"
    nobody = subprocess.run(
        [str(switchboard), "tasks", "create", "--project", "nope", "--prompt", "x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert nobody.returncode == 1 and "422" in nobody.stderr
