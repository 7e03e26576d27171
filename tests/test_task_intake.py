"""The fast path of task creation (`app/tasks/ingress.py` + `app/tasks/pg_fastpath.py`) must be
indistinguishable from the Flask view it stands in for: same rows, notifications, job, response
and write-limit accounting; and everything outside the plain case must reach the view."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
from fastpaths import (
    deliveries,
    hear,
    post_task,
    queue_counts,
    response_shape,
    rows,
    subscribe,
)
from flask import Flask
from flask.testing import FlaskClient
from helpers import Account, account, register_machine


@pytest.mark.postgres
@pytest.mark.parametrize("target", ["pool", "external", "labels:linux"])
def test_plain_creation_matches_the_flask_view(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict, target: str
) -> None:
    from rq import Queue

    from app.live import pubsub
    from app.queues import get_redis

    body = {
        "project": "demo",
        "title": "Fix the flaky test",
        "prompt": "echo hi",
        "target": target,
        "priority": "high",
        "timeout_s": 60,
        "max_attempts": 2,
        "config": {"model": "m"},
        "loop": {"max_iterations": 2, "done_marker": "DONE"},
    }
    with app.app_context():
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel())
        queue = Queue("runs-high", connection=get_redis())

    fast = post_task(client, member, body, False, intake)
    assert fast.status_code == 201, fast.get_json()
    assert intake.served == 1
    slow = post_task(client, member, body, True, intake)
    assert slow.status_code == 201, slow.get_json()

    assert response_shape(fast) == response_shape(slow)
    f, s = fast.get_json(), slow.get_json()
    assert (f["queue_position"], s["queue_position"]) == (1, 2)
    assert fast.headers["Location"] == f"/api/v1/tasks/{f['id']}"
    assert int(fast.headers["RateLimit-Remaining"]) == int(slow.headers["RateLimit-Remaining"]) + 1
    assert rows(app, f["id"]) == rows(app, s["id"])

    # the same notifications, in the same order, and the same job
    heard = [m for _channel, m in hear(listener, 6)]
    assert [m["kind"] for m in heard] == ["run.status", "task.status", "task.created"] * 2
    assert [m["data"]["task_id"] for m in heard] == [f["id"]] * 3 + [s["id"]] * 3
    jobs = queue.get_job_ids()
    if target == "pool":
        assert jobs == [f"run-{f['latest_run_id']}", f"run-{s['latest_run_id']}"]
        job = queue.fetch_job(jobs[0])
        assert (job.func_name, job.args) == ("workers.jobs.execute_run", (f["latest_run_id"],))
    else:
        assert jobs == []


@pytest.mark.postgres
def test_a_machine_task_is_assigned_as_the_fast_path_creates_it(
    app: Flask, client: FlaskClient, intake: Any, admin: Account, member: Account, project: dict
) -> None:
    """The fast path hands a machines' task to their scheduler as the view does: an online
    machine with a free slot gets it at once, told on its channel with the run's spec."""
    from app.database import db
    from app.live import pubsub
    from app.machines.models import Machine
    from app.queues import get_redis
    from app.timeutil import utcnow

    reg = register_machine(client, admin, slots=1)
    with app.app_context():
        machine = db.session.get(Machine, reg["machine_id"])
        machine.connection, machine.last_heartbeat_at = "its-connection", utcnow()
        db.session.commit()
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.machine_channel(reg["machine_id"]))
    body = {"project": "demo", "title": "t", "prompt": "echo hi", "target": "labels:linux"}
    first = post_task(client, member, body, False, intake).get_json()
    second = post_task(client, member, body, False, intake).get_json()  # no slot left
    run = client.get(f"/api/v1/runs/{first['latest_run_id']}", headers=member.headers).get_json()
    assert (run["status"], run["executor"]) == ("assigned", "machine:box")
    told = [m for _channel, m in hear(listener, 1)]
    assert told[0]["frame"]["run"]["run_id"] == first["latest_run_id"]
    assert told[0]["frame"]["run"]["prompt"] == "echo hi" and "sealed_env" in told[0]
    assert second["status_reason"] == (
        "waiting: every slot of the machines with labels linux is busy"
    )  # the answer says why, as the view's does
    waiting = client.get(f"/api/v1/tasks/{second['id']}", headers=member.headers).get_json()
    assert waiting["status"] == "queued"
    assert waiting["status_reason"] == (
        "waiting: every slot of the machines with labels linux is busy"
    )


def asked(who: Account, bodies: list[dict]) -> list[Any]:
    """Creations as concurrent requests hand them to the combiner."""
    from app.agents.registry import known_agents
    from app.tasks import pg_fastpath
    from app.tasks.schemas import TaskCreateSchema

    caller = pg_fastpath.Caller(user_id=who.id, token_hash=None, request_id="r-1", ip="127.0.0.1")
    agents = frozenset(known_agents())
    return [
        pg_fastpath.Creation(caller, TaskCreateSchema().load(b), agents, lambda _u: True)
        for b in bodies
    ]


@pytest.mark.postgres
@pytest.mark.parametrize("target", ["pool", "external"])
def test_creations_written_together_match_those_written_alone(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict, target: str
) -> None:
    from rq import Queue

    from app.database import autocommit
    from app.live import pubsub
    from app.queues import get_redis
    from app.tasks import lifecycle, pg_fastpath

    body = {
        "project": "demo",
        "title": 'Fix “the” \\ "flaky" test ✓',  # what JSON and arrays escape
        "prompt": "line 1\nline 2\t'x' {a,b}",
        "target": target,
        "config": {"a": [1, {"b": None}]},
        "loop": {"max_iterations": 2, "done_marker": "DONE"},
    }
    alone = post_task(client, member, body, False, intake)
    assert alone.status_code == 201
    with app.app_context():
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel())
        queue = Queue(lifecycle.queue_name("normal"), connection=get_redis())
        queue.empty()
        priorities = ["normal", "high", "normal", "normal"]
        group = asked(member, [{**body, "priority": p} for p in priorities])
        someone_else = asked(member, [{**body, "project": "nope"}])  # declined: not written
        with autocommit() as driver:
            pg_fastpath.settle(driver, group[:2] + someone_else + group[2:])
    assert all(c.written is not None for c in group)
    assert someone_else[0].settled and someone_else[0].result() is None
    ids = [c.task["id"] for c in group]

    # the same rows as a task created alone (the priority aside)
    for creation, priority in zip(group, priorities, strict=True):
        wrote = rows(app, creation.task["id"])
        wrote["task"]["priority"], wrote["task"]["priority_rank"] = "normal", 1
        wrote["activities"] = [
            (k, {**d, "priority": "normal"} if k == "task.created" else d)
            for k, d in wrote["activities"]
        ]
        wrote["audit"] = [(*a[:6], {**a[6], "priority": "normal"}, a[7]) for a in wrote["audit"]]
        assert wrote == rows(app, alone.get_json()["id"]), priority
    # each position is the one counting the queue gives: the high one first, then by age
    positions = [c.written[1] + 1 for c in group]
    assert positions == [
        client.get(f"/api/v1/tasks/{i}", headers=member.headers).get_json()["queue_position"]
        for i in ids
    ]
    assert positions == [3, 1, 4, 5]
    # its activity ids are its own rows
    with app.app_context(), autocommit() as driver:
        for creation in group:
            found = driver.execute(
                "SELECT kind, id FROM activities WHERE (data ->> 'task_id')::bigint = %s",
                (creation.task["id"],),
            ).fetchall()
            assert dict(found) == creation.written[0]
    # the notifications of all of them, in order, and their jobs
    heard = [m for _channel, m in hear(listener, 12)]
    assert [m["kind"] for m in heard] == ["run.status", "task.status", "task.created"] * 4
    assert [m["data"]["task_id"] for m in heard] == [i for i in ids for _ in range(3)]
    with app.app_context():
        high = Queue(lifecycle.queue_name("high"), connection=get_redis())
        jobs = queue.get_job_ids() + high.get_job_ids()
    runs = [c.task["latest_run_id"] for c in group]
    expected = [runs[0], runs[2], runs[3], runs[1]] if target == "pool" else []
    assert jobs == [f"run-{r}" for r in expected]


@pytest.mark.postgres
def test_a_group_that_fails_writes_nothing_and_leaves_each_creation_to_its_thread(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    from app.database import autocommit
    from app.tasks import pg_fastpath

    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    with app.app_context():
        group = asked(member, [body, body, body])
        group[1].data["title"] = "x" * 400  # too long for its column: the statement fails
        pg_fastpath.settle_group(group)
        assert [(c.settled, c.written, c.error) for c in group] == [(False, None, None)] * 3
        with autocommit() as driver:
            found = driver.execute("SELECT count(*) FROM tasks").fetchone()
            assert found == (0,)
            # alone, each meets its own fate: the first is written, the second's error is its own
            pg_fastpath.settle_group(group[:1])
            assert group[0].settled and group[0].result()["queue_position"] == 1
            pg_fastpath.settle_group(group[1:2])
            assert group[1].error is not None and "too long" in str(group[1].error)
            assert driver.execute("SELECT count(*) FROM tasks").fetchone() == (1,)
    # the pooled connections are as good as before, and the next creation is written
    resp = post_task(client, member, body, False, intake)
    assert resp.status_code == 201 and resp.get_json()["queue_position"] == 2


@pytest.mark.postgres
def test_concurrent_creations_are_written_together_and_each_answered(
    app: Flask, intake: Any, member: Account, project: dict
) -> None:
    import threading

    from app.tasks import pg_fastpath

    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    first = app.test_client().post("/api/v1/tasks", json=body, headers=member.headers)
    assert first.status_code == 201
    with app.app_context():
        combiner = pg_fastpath._combiner()
    write, waiting = combiner._write, 6

    def held(group: list) -> None:
        """The first write waits for the others to queue up behind it."""
        deadline = time.monotonic() + 10
        while len(combiner._queue) < 1 + waiting and time.monotonic() < deadline:
            time.sleep(0.005)
        combiner._write = write
        write(group)

    combiner._write = held
    before = (combiner.batches, combiner.items)
    answers: list[Any] = []

    def post() -> None:
        resp = app.test_client().post("/api/v1/tasks", json=body, headers=member.headers)
        answers.append((resp.status_code, resp.get_json()))

    threads = [threading.Thread(target=post) for _ in range(1 + waiting)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [code for code, _ in answers] == [201] * (1 + waiting)
    assert (combiner.batches - before[0], combiner.items - before[1]) == (2, 1 + waiting)
    assert intake.served == 2 + waiting
    # every position is distinct and what counting the queue says
    positions = sorted(a["queue_position"] for _, a in answers)
    assert positions == list(range(2, 3 + waiting))
    client = app.test_client()
    for _, a in answers:
        got = client.get(f"/api/v1/tasks/{a['id']}", headers=member.headers).get_json()
        assert got["queue_position"] == a["queue_position"]


@pytest.mark.postgres
def test_everything_else_reaches_the_flask_view(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    viewer = account(app, client, "vic")
    resp = client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": viewer.username, "role": "viewer"},
    )
    assert resp.status_code == 201, resp.get_json()
    plain = {"project": "demo", "title": "t", "prompt": "p"}

    cases = [
        (viewer, plain, {}, 403),
        (member, {**plain, "project": "nope"}, {}, 422),
        (member, {**plain, "agent": "nobody"}, {}, 422),
        (member, {**plain, "title": ""}, {}, 422),
        (member, {**plain, "surprise": 1}, {}, 422),
        (member, {**plain, "depends_on": [999]}, {}, 422),
        (member, plain, {"Idempotency-Key": "k1"}, 201),
    ]
    for who, body, headers, status in cases:
        resp = client.post("/api/v1/tasks", json=body, headers={**who.headers, **headers})
        assert resp.status_code == status, (body, resp.get_json())
        if status >= 400:
            assert resp.mimetype == "application/problem+json"
    again = client.post(
        "/api/v1/tasks", json=plain, headers={**member.headers, "Idempotency-Key": "k1"}
    )
    assert again.headers.get("Idempotent-Replayed") == "true"
    # a capped pool project: the cap decides dispatch, so the view does it
    client.patch("/api/v1/projects/demo", headers=member.headers, json={"max_concurrent_runs": 1})
    resp = client.post("/api/v1/tasks", json=plain, headers=member.headers)
    assert resp.status_code == 201
    assert intake.served == 0
    # an external task in a capped project is plain again
    resp = client.post(
        "/api/v1/tasks", json={**plain, "target": "external"}, headers=member.headers
    )
    assert resp.status_code == 201
    assert intake.served == 1


@pytest.mark.postgres
def test_an_active_subscription_takes_the_flask_view(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    admin: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sub = subscribe(app, client, admin.headers, "task.created", monkeypatch)
    resp = client.post(
        "/api/v1/tasks",
        json={"project": "demo", "title": "t", "prompt": "p"},
        headers=admin.headers,
    )
    assert resp.status_code == 201
    assert intake.served == 0
    assert deliveries(client, admin.headers, sub) == ["task.created"]


@pytest.mark.postgres
def test_the_write_limit_counts_both_paths_once(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_WRITE", "4/minute")
    plain = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    remaining = []
    for via_flask in (False, True, False, True):
        resp = post_task(client, member, plain, via_flask, intake)
        assert resp.status_code == 201
        remaining.append(int(resp.headers["RateLimit-Remaining"]))
    assert remaining == [3, 2, 1, 0]
    refused = client.post("/api/v1/tasks", json=plain, headers=member.headers)
    assert refused.status_code == 429
    assert refused.mimetype == "application/problem+json"
    assert intake.served == 2


@pytest.mark.postgres
def test_queue_counts_follow_every_change(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    from app.runs.sweep import sweep

    h = member.headers
    client.post("/api/v1/projects", headers=h, json={"key": "other", "name": "Other"})
    made = []
    for i, priority in enumerate(["low", "normal", "high", "normal", "urgent", "normal"]):
        body = {
            "project": "demo" if i % 3 else "other",
            "title": f"t{i}",
            "prompt": "p",
            "priority": priority,
            "target": "external",
            "agent": "shell",
        }
        resp = post_task(client, member, body, bool(i % 2), intake)
        assert resp.status_code == 201, resp.get_json()
        made.append(resp.get_json())
        # the fast path's position is what counting the queue says
        assert (
            resp.get_json()["queue_position"]
            == client.get(f"/api/v1/tasks/{made[-1]['id']}", headers=h).get_json()["queue_position"]
        )
    kept, counted = queue_counts(app)
    assert kept == counted and sum(counted.values()) == 6

    client.post(f"/api/v1/tasks/{made[0]['id']}/cancel", headers=h)
    client.patch(f"/api/v1/tasks/{made[1]['id']}", headers=h, json={"priority": "urgent"})
    client.delete(f"/api/v1/tasks/{made[2]['id']}", headers=h)
    claimed = client.post(
        f"/api/v1/tasks/{made[3]['id']}/claim", headers=h, json={"executor": "e1"}
    )
    assert claimed.status_code == 200
    run_id = claimed.get_json()["id"]
    client.post(f"/api/v1/runs/{run_id}/heartbeat", headers=h, json={"executor": "e1"})
    done = client.post(
        f"/api/v1/runs/{run_id}/complete",
        headers=h,
        json={"executor": "e1", "status": "failed", "exit_code": 1},
    )
    assert done.status_code == 200, done.get_json()
    kept, counted = queue_counts(app)
    assert kept == counted and sum(counted.values()) == 3  # cancelled, deleted, failed left

    # what ended sessions wrote is folded into shard 0 and still adds up
    with app.app_context():
        from app.database import db

        db.engine.dispose()  # every pooled session ends
        assert sweep()["queue_counts_folded"] >= 1
        shards = db.session.execute(sa.text("SELECT DISTINCT shard FROM task_queue_counts")).all()
        db.session.commit()
    assert [s for (s,) in shards] == [0]
    kept, counted = queue_counts(app)
    assert kept == counted


@pytest.mark.postgres
def test_personal_access_tokens_take_the_fast_path_too(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    def token(abilities: list[str]) -> dict:
        resp = client.post(
            "/api/v1/me/tokens",
            headers=member.headers,
            json={"label": "ci", "abilities": abilities},
        )
        assert resp.status_code == 201, resp.get_json()
        return resp.get_json()

    pat = token(["projects:read", "runs:start"])
    bearer = {"Authorization": f"Bearer {pat['token']}"}
    body = {"project": "demo", "title": "From CI", "prompt": "make test", "target": "external"}
    # first use: the token's last_used_at is due, which the view writes
    first = client.post("/api/v1/tasks", json=body, headers=bearer)
    assert first.status_code == 201 and intake.served == 0
    fast = post_task(client, bearer, body, False, intake)
    assert fast.status_code == 201 and intake.served == 1
    slow = post_task(client, bearer, body, True, intake)
    assert response_shape(fast) == response_shape(slow)
    assert rows(app, fast.get_json()["id"]) == rows(app, slow.get_json()["id"])
    assert rows(app, fast.get_json()["id"])["audit"][0][2] == f"pat:{pat['id']}"
    api_key = post_task(client, {"X-API-Key": pat["token"]}, body, False, intake)
    assert api_key.status_code == 201 and intake.served == 2

    # what the token may not do, the view refuses
    reader = token(["projects:read"])
    refused = client.post(
        "/api/v1/tasks", json=body, headers={"Authorization": f"Bearer {reader['token']}"}
    )
    assert refused.status_code == 403
    client.delete(f"/api/v1/me/tokens/{pat['id']}", headers=member.headers)
    revoked = client.post("/api/v1/tasks", json=body, headers=bearer)
    assert revoked.status_code == 401
    assert intake.served == 2


@pytest.mark.postgres
def test_a_group_reads_each_callers_own_rights(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """One read for a group of callers: a session, a token that may start runs, one that may
    not and one that does not exist; each is decided as it would be alone."""
    from app.agents.registry import known_agents
    from app.auth import tokens
    from app.database import autocommit
    from app.tasks import pg_fastpath
    from app.tasks.schemas import TaskCreateSchema

    def token(abilities: list[str]) -> dict:
        asked = {"label": "ci", "abilities": abilities}
        made = client.post("/api/v1/me/tokens", headers=member.headers, json=asked).get_json()
        used = client.get("/api/v1/projects", headers={"X-API-Key": made["token"]})
        assert used.status_code == 200  # its last_used_at is written: the fast path may take it
        return made

    starter, reader = token(["projects:read", "runs:start"]), token(["projects:read"])
    body = TaskCreateSchema().load({"project": "demo", "title": "t", "prompt": "p"})
    agents = frozenset(known_agents())

    def asking(user_id: int | None, secret: str | None) -> Any:
        digest = None if secret is None else tokens.digest(secret)
        caller = pg_fastpath.Caller(user_id=user_id, token_hash=digest, request_id="r", ip=None)
        return pg_fastpath.Creation(caller, dict(body), agents, lambda _u: True)

    group = [
        asking(member.id, None),
        asking(None, reader["token"]),
        asking(None, starter["token"]),
        asking(None, "sbp_no_such_token"),
    ]
    with app.app_context(), autocommit() as driver:
        pg_fastpath.settle(driver, group)
    made = [c.result() for c in group]
    assert [m is not None for m in made] == [True, False, True, False]
    assert [m["queue_position"] for m in made if m] == [1, 2]
    vias = [rows(app, m["id"])["audit"][0][2] for m in made if m]
    assert vias == ["session", f"pat:{starter['id']}"]


@pytest.mark.postgres
def test_who_may_create_is_decided_as_the_view_decides(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """The fast path decides in SQL who may create; every caller the view would refuse must
    reach the view (which refuses), and an admin creates anywhere. Tokens are used once first
    (GET) so that their last use is recent and the fast path may take them."""
    from app.auth.cache import remembered
    from app.database import db

    root = account(app, client, "root", "admin")
    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}

    def pat(who: Account, abilities: list[str]) -> dict[str, str]:
        resp = client.post(
            "/api/v1/me/tokens", headers=who.headers, json={"label": "x", "abilities": abilities}
        )
        assert resp.status_code == 201, resp.get_json()
        headers = {"Authorization": f"Bearer {resp.get_json()['token']}"}
        assert client.get("/api/v1/me", headers=headers).status_code == 200  # its first use
        return headers

    admin_full = pat(root, ["projects:read", "runs:start", "admin"])
    admin_limited = pat(root, ["projects:read", "runs:start"])  # no admin: a non-member here
    reader = pat(member, ["projects:read"])
    expired = pat(member, ["projects:read", "runs:start"])
    with app.app_context():
        db.session.execute(
            sa.text(
                "UPDATE personal_access_tokens SET expires_at = now() - interval '1 minute'"
                " WHERE id = (SELECT max(id) FROM personal_access_tokens)"
            )
        )
        db.session.commit()
        remembered().forget()  # a change behind the API's back is not announced
    cases = [  # caller, status, taken by the fast path
        (root.headers, 201, True),
        (admin_full, 201, True),
        (admin_limited, 422, False),  # it cannot see the project
        (reader, 403, False),
        (expired, 401, False),
        (member.headers, 201, True),
    ]
    for headers, status, fast in cases:
        before = intake.served
        resp = client.post("/api/v1/tasks", json=body, headers=headers)
        assert (resp.status_code, intake.served - before) == (status, int(fast)), resp.get_json()

    # a deactivated user (whose access token is still unexpired) and an archived project
    resp = client.patch(f"/api/v1/users/{member.id}", headers=root.headers, json={"active": False})
    assert resp.status_code == 200, resp.get_json()
    before = intake.served
    assert client.post("/api/v1/tasks", json=body, headers=member.headers).status_code == 401
    with app.app_context():  # archived (the API refuses it while runs are active)
        db.session.execute(sa.text("UPDATE projects SET archived_at = now() WHERE key = 'demo'"))
        db.session.commit()
    assert client.post("/api/v1/tasks", json=body, headers=root.headers).status_code >= 400
    assert intake.served == before
