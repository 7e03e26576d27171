"""The fast path of task creation (`app/tasks/ingress.py` + `app/tasks/pg_fastpath.py`) must be
indistinguishable from the Flask view it stands in for: same rows, notifications, job, response
and write-limit accounting; and everything outside the plain case must reach the view."""

from __future__ import annotations

import json
import time
from datetime import UTC
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from helpers import Account, account


@pytest.fixture
def intake(app: Flask, client: FlaskClient) -> Any:
    from app.tasks import pg_fastpath
    from app.tasks.ingress import TaskIntake

    with app.app_context():
        if not pg_fastpath.supported():
            pytest.skip("the fast path runs on PostgreSQL only")
    found = app.wsgi_app
    while not isinstance(found, TaskIntake):
        found = found.wsgi_app
    found.served = 0
    return found


def post_task(
    client: FlaskClient, who: Account | dict, body: dict, via_flask: bool, intake: Any
) -> Any:
    """POST a task through the fast path, or (via_flask) straight to the Flask view."""
    before = intake.served
    headers = who if isinstance(who, dict) else who.headers
    with pytest.MonkeyPatch.context() as mp:
        if via_flask:
            mp.setattr(type(intake), "__call__", lambda self, env, start: self.wsgi_app(env, start))
        resp = client.post("/api/v1/tasks", json=body, headers=headers)
    assert intake.served == before + (resp.status_code == 201 and not via_flask)
    return resp


def subscribe(
    app: Flask, client: FlaskClient, headers: dict, event: str, mp: pytest.MonkeyPatch
) -> dict:
    """An active subscription to `event` (at a loopback address nobody listens on)."""
    mp.setitem(app.config, "SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    resp = client.post(
        "/api/v1/subscriptions",
        headers=headers,
        json={"url": "http://127.0.0.1:9/hook", "events": [event]},
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def deliveries(client: FlaskClient, headers: dict, sub: dict) -> list[str]:
    sent = client.get(f"/api/v1/subscriptions/{sub['id']}/deliveries", headers=headers)
    return [d["event"] for d in sent.get_json()["data"]]


def hear(listener: Any, count: int) -> list[tuple[str, dict]]:
    """The next `count` messages (channel, message), waiting at most 5 s; closes `listener`."""
    from app.live import pubsub

    heard: list[tuple[str, dict]] = []
    deadline = time.monotonic() + 5
    while len(heard) < count and time.monotonic() < deadline:
        msg = listener.get_message(timeout=0.5)
        if msg:
            heard += [(msg["channel"].decode(), m) for m in pubsub.unpack(msg["data"])]
    listener.close()
    return heard


def rows(app: Flask, task_id: int) -> dict[str, Any]:
    """Everything a creation wrote, without ids and clock readings."""
    from app.database import db

    with app.app_context(), db.engine.connect() as conn:
        task = conn.execute(sa.text("SELECT * FROM tasks WHERE id = :i"), {"i": task_id}).one()
        run = conn.execute(sa.text("SELECT * FROM runs WHERE task_id = :i"), {"i": task_id}).one()
        activities = conn.execute(
            sa.text(
                "SELECT kind, data FROM activities WHERE data::jsonb ->> 'task_id' = :i ORDER BY id"
            ),
            {"i": str(task_id)},
        ).all()
        audit = conn.execute(
            sa.text(
                "SELECT actor_id, actor_name, via, action, target_type, ip, payload,"
                " request_id IS NOT NULL AS has_request_id"
                " FROM audit_logs WHERE target_type = 'task' AND target_id = :i"
            ),
            {"i": str(task_id)},
        ).all()
    ids = {task_id: "<task>", task.latest_run_id: "<run>"}
    task_cols = {
        k: v
        for k, v in task._mapping.items()
        if k not in ("id", "latest_run_id", "created_at", "updated_at")
    }
    run_cols = {
        k: (v is not None if k == "dispatched_at" else v)
        for k, v in run._mapping.items()
        if k not in ("id", "task_id", "queued_at")
    }
    return {
        "task": task_cols,
        "run": run_cols,
        "run_is_latest": run.id == task.latest_run_id,
        "activities": [
            (kind, {k: ids.get(v, v) if k in ("task_id", "run_id") else v for k, v in d.items()})
            for kind, d in (
                (a.kind, a.data if isinstance(a.data, dict) else json.loads(a.data))
                for a in activities
            )
        ],
        "audit": [tuple(a) for a in audit],
    }


def response_shape(resp: Any) -> tuple[int, dict, dict]:
    body = dict(resp.get_json())
    for key in ("id", "latest_run_id", "created_at", "updated_at", "queue_position"):
        body.pop(key)
    headers = {
        k: v
        for k, v in resp.headers.items()
        if k
        not in (
            "Location",
            "X-Request-ID",
            "Content-Length",
            "RateLimit-Remaining",
            "RateLimit-Reset",
        )
    }
    return resp.status_code, body, headers


@pytest.mark.parametrize("target", ["pool", "external"])
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


def test_everything_else_reaches_the_flask_view(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    viewer = account(app, client, "vic")
    resp = client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"user_id": viewer.id, "role": "viewer"},
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


def queue_counts(app: Flask) -> tuple[dict, dict]:
    """(what the trigger kept, what counting says) per project and priority."""
    from app.database import db

    with app.app_context(), db.engine.connect() as conn:
        kept = conn.execute(
            sa.text(
                "SELECT project_id, priority_rank, sum(queued) FROM task_queue_counts"
                " GROUP BY 1, 2 HAVING sum(queued) <> 0"
            )
        ).all()
        counted = conn.execute(
            sa.text(
                "SELECT project_id, priority_rank, count(*) FROM tasks WHERE status = 'queued'"
                " GROUP BY 1, 2"
            )
        ).all()
    return {(p, r): n for p, r, n in kept}, {(p, r): n for p, r, n in counted}


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


def test_who_may_create_is_decided_as_the_view_decides(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """The fast path decides in SQL who may create; every caller the view would refuse must
    reach the view (which refuses), and an admin creates anywhere. Tokens are used once first
    (GET) so that their last use is recent and the fast path may take them."""
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


def test_a_runs_start_in_one_statement_matches_the_orm_path(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`runs.pg_fastpath.start` (the worker's mark_running on PostgreSQL) writes and sends what the
    ORM path does, and leaves the case with a listening subscription to it."""
    from app.database import db
    from app.live import pubsub
    from app.queues import get_redis
    from app.runs import pg_fastpath
    from app.runs import service as runs
    from app.tasks.models import Task

    body = {"project": "demo", "title": "t", "prompt": "p"}
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(3)]

    def start(task_id: int, fast: bool) -> bool:
        with app.app_context():
            run_id = db.session.get(Task, task_id).latest_run_id
            run, task, _project = runs.take(run_id, "e1", 30)
            try:
                return runs.mark_running(
                    run, pid=4242, agent_version="bash 5", lease_s=30, task=task if fast else None
                )
            finally:
                db.session.remove()

    with app.app_context():
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel())
    assert [start(ids[0], True), start(ids[1], False)] == [True, True]
    a, b = (rows(app, i) for i in ids[:2])
    for r in (a, b):
        assert (r["run"]["status"], r["run"]["pid"], r["run"]["agent_version"]) == (
            "running",
            4242,
            "bash 5",
        )
        assert r["run"]["started_at"] is not None and r["task"]["status"] == "running"
        r["run"].pop("started_at"), r["run"].pop("lease_expires_at")
    assert a == b
    kept, counted = queue_counts(app)
    assert kept == counted  # the third task is still queued; the trigger followed both starts
    heard = [m for _channel, m in hear(listener, 4)]
    assert [(m["kind"], m["data"]["status"], m["data"]["task_id"]) for m in heard] == [
        ("run.status", "running", ids[0]),
        ("task.status", "running", ids[0]),
        ("run.status", "running", ids[1]),
        ("task.status", "running", ids[1]),
    ]

    # a listening subscription: the one statement writes nothing and the ORM path takes over
    admin_headers = account(app, client, "root", "admin").headers
    sub = subscribe(app, client, admin_headers, "run.started", monkeypatch)
    with app.app_context():
        run_id = db.session.get(Task, ids[2]).latest_run_id
        run, task, _project = runs.take(run_id, "e1", 30)
        assert pg_fastpath.start(run, task, pid=1, agent_version=None, lease_s=30) is None
        assert runs.mark_running(run, pid=1, agent_version=None, lease_s=30, task=task)
        db.session.remove()
    assert deliveries(client, admin_headers, sub) == ["run.started"]


def test_a_take_in_one_round_trip_loads_what_the_orm_would(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """`runs.pg_fastpath.take` builds the run, its task and its project from one row: they must
    equal what the ORM loads (UTC-aware times, JSON, every column), be persistent in the session
    (the executor's output batches and facts are ORM writes on them), and a second take gets
    None."""
    from sqlalchemy.orm import object_session

    from app.database import db
    from app.projects.models import Project
    from app.runs import pg_fastpath
    from app.runs.models import Run
    from app.tasks.models import Task

    body = {
        "project": "demo",
        "title": "t",
        "prompt": "p",
        "priority": "high",
        "timeout_s": 90,
        "max_attempts": 2,
        "config": {"env": {"A": "1"}},
        "loop": {"max_iterations": 3, "done_marker": "DONE"},
    }
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(2)]

    def columns(instance: Any) -> dict[str, Any]:
        return {c.key: getattr(instance, c.key) for c in sa.inspect(type(instance)).column_attrs}

    with app.app_context():
        run_id = db.session.get(Task, ids[0]).latest_run_id
        db.session.remove()
        taken = pg_fastpath.take(run_id, "e1", 30)
        assert taken is not None
        fast = [columns(i) for i in taken]
        assert all(object_session(i) is db.session() and not db.session.dirty for i in taken)
        run = taken[0]
        assert (run.status, run.executor, run.lease_expires_at.tzinfo) == ("assigned", "e1", UTC)
        run.model = "m-1"  # a fact from the agent's output, written as the executor does
        db.session.commit()
        db.session.remove()
        loaded = [
            db.session.get(entity, instance["id"])
            for entity, instance in zip((Run, Task, Project), fast, strict=True)
        ]
        assert loaded[0].model == "m-1"
        fast[0]["model"] = "m-1"
        assert [columns(i) for i in loaded] == fast
        assert fast[1]["config"] == {"env": {"A": "1"}} and fast[1]["loop"]["done_marker"]
        assert pg_fastpath.take(run_id, "e2", 30) is None  # taken already
        db.session.remove()

        # a session that holds the run already gets that instance, brought up to date
        other = db.session.get(Task, ids[1]).latest_run_id
        held = db.session.get(Run, other)
        taken = pg_fastpath.take(other, "e1", 30)
        assert taken is not None and taken[0] is held and held.status == "assigned"
        assert not db.session.dirty
        db.session.remove()


def started(app: Flask, task_id: int) -> int:
    """Take and start the task's run as executor e1; its id."""
    from app.database import db
    from app.runs import service as runs
    from app.tasks.models import Task

    with app.app_context():
        run, task, _project = runs.take(db.session.get(Task, task_id).latest_run_id, "e1", 30)
        assert runs.mark_running(run, pid=4242, agent_version=None, lease_s=30, task=task)
        db.session.remove()
        return run.id


def end_fast(
    app: Flask, run_id: int, code: int, log: tuple[int, bytes], meanwhile: str = "", **values: Any
) -> bool:
    """`pg_fastpath.finish` as the worker calls it, with the run and task it loaded; `meanwhile`:
    SQL that changes the run (:i) after they were loaded."""
    from app.database import db
    from app.runs import pg_fastpath
    from app.runs.models import Run
    from app.tasks.models import Task

    with app.app_context():
        run = db.session.get(Run, run_id)
        task = db.session.get(Task, run.task_id)
        db.session.commit()
        if meanwhile:
            with db.engine.begin() as conn:
                conn.execute(sa.text(meanwhile), {"i": run_id})
        status = "succeeded" if code == 0 else "failed"
        try:
            return pg_fastpath.finish(run, task, status, exit_code=code, log=log, values=values)
        finally:
            db.session.remove()


def end_orm(app: Flask, run_id: int, code: int, log: tuple[int, bytes], **values: Any) -> None:
    """What the executor does when the end is not the plain case."""
    from app.database import db
    from app.runs import service as runs

    with app.app_context():
        run = runs.get_run(run_id)
        runs.append_log(run, log[0], log[1], commit=False)
        extra = {k: values.pop(k) for k in ("branch", "commit_sha", "diff_stat") if k in values}
        for key, value in values.items():
            setattr(run, key, value)
        status = "succeeded" if code == 0 else "failed"
        runs.finish(run_id, status, exit_code=code, executor="e1", **extra)
        db.session.remove()


def ended_rows(app: Flask, task_id: int) -> dict[str, Any]:
    from app.database import db

    found = rows(app, task_id)
    for key in ("started_at", "finished_at", "lease_expires_at"):
        found["run"].pop(key)
    found["task"].pop("finished_at")
    with app.app_context(), db.engine.connect() as conn:
        found["log"] = conn.execute(
            sa.text(
                "SELECT c.offset, c.size, c.data FROM run_log_chunks c JOIN runs r"
                " ON r.id = c.run_id WHERE r.task_id = :i ORDER BY c.offset"
            ),
            {"i": task_id},
        ).all()
    return found


@pytest.mark.parametrize("code", [0, 3])
def test_a_runs_end_in_one_round_trip_matches_the_orm_path(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict, code: int
) -> None:
    """`runs.pg_fastpath.finish` (the worker's end of a run whose agent exited by itself) writes and
    sends what the ORM path does: the last output, the run's and the task's end, the activity."""
    from app.live import pubsub
    from app.queues import get_redis

    body = {"project": "demo", "title": "t", "prompt": "p", "max_attempts": 1}
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(2)]
    run_ids = [started(app, i) for i in ids]
    values = {"cost_usd": 0.25, "input_tokens": 7, "branch": "switchboard/t-1"}
    log = (0, "done: héllo\n".encode())
    with app.app_context():
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel(), *map(pubsub.run_channel, run_ids))
    assert end_fast(app, run_ids[0], code, log, **values) is True
    end_orm(app, run_ids[1], code, log, **values)

    fast, orm = ended_rows(app, ids[0]), ended_rows(app, ids[1])
    assert fast == orm
    status = "succeeded" if code == 0 else "failed"
    assert (fast["run"]["status"], fast["run"]["exit_code"], fast["run"]["log_size"]) == (
        status,
        code,
        len(log[1]),
    )
    assert fast["task"]["status"] == ("completed" if code == 0 else "failed")
    assert fast["run"]["cost_usd"] == 0.25 and fast["run"]["branch"] == "switchboard/t-1"
    assert fast["log"] == [(0, len(log[1]), log[1])]
    heard = hear(listener, 6)
    shapes = [
        (m["kind"], m["data"]["status"], m["data"]["task_id"]) if "kind" in m else (m, ch)
        for ch, m in heard
    ]
    with app.app_context():
        channels = [pubsub.run_channel(r) for r in run_ids]
    task_status = "completed" if code == 0 else "failed"
    assert shapes == [
        ("run.status", status, ids[0]),
        ("task.status", task_status, ids[0]),
        ({"type": "status", "status": status, "exit_code": code}, channels[0]),
        ("run.status", status, ids[1]),
        ("task.status", task_status, ids[1]),
        ({"type": "status", "status": status, "exit_code": code}, channels[1]),
    ]


@pytest.mark.parametrize("code", [0, 3])
def test_an_agent_gone_before_its_start_was_written_ends_as_if_it_had_been(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict, code: int
) -> None:
    """An agent that exits within its first tick has its start written with its end
    (`pg_fastpath.finish(started=…)`, one round trip): the same rows as the start and then the end
    (the start's time, pid and version; both activity pairs, in order), the same messages."""
    from datetime import timedelta

    from app.database import db
    from app.live import pubsub
    from app.queues import get_redis
    from app.runs import pg_fastpath
    from app.runs import service as runs
    from app.tasks.models import Task
    from app.timeutil import naive_utc, utcnow

    body = {"project": "demo", "title": "t", "prompt": "p", "max_attempts": 1}
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(2)]
    orm_run = started(app, ids[1])
    spawned = utcnow() - timedelta(milliseconds=5)
    log = (0, b"bye\n")
    with app.app_context():
        run, task, _project = runs.take(db.session.get(Task, ids[0]).latest_run_id, "e1", 30)
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel(), *map(pubsub.run_channel, (run.id, orm_run)))
        channels = [pubsub.run_channel(r) for r in (run.id, orm_run)]
        status = "succeeded" if code == 0 else "failed"
        assert pg_fastpath.finish(
            run,
            task,
            status,
            exit_code=code,
            log=log,
            values={},
            started=pg_fastpath.Started(spawned, 4242, None),
        )
        db.session.remove()
    end_orm(app, orm_run, code, log)

    fast, orm = ended_rows(app, ids[0]), ended_rows(app, ids[1])
    assert fast == orm
    task_status = "completed" if code == 0 else "failed"
    assert [(a[0], a[1]["status"]) for a in fast["activities"][-4:]] == [
        ("run.status", "running"),
        ("task.status", "running"),
        ("run.status", status),
        ("task.status", task_status),
    ]
    with app.app_context(), db.engine.connect() as conn:
        times = conn.execute(
            sa.text(
                "SELECT r.started_at, array_agg(a.created_at ORDER BY a.id) FROM runs r"
                " JOIN activities a ON a.data::jsonb ->> 'run_id' = r.id::text"
                " WHERE r.id = :i GROUP BY r.started_at"
            ),
            {"i": run.id},
        ).one()
    started_at, (_queued, running, end) = times
    assert started_at == naive_utc(spawned) == running
    assert end > running  # the end's own time

    heard = hear(listener, 9)
    shapes = [
        (m["kind"], m["data"]["status"], m["data"]["task_id"]) if "kind" in m else (m, ch)
        for ch, m in heard
    ]
    fast_heard = [s for s in shapes if s[-1] in (ids[0], channels[0])]
    orm_heard = [s for s in shapes if s[-1] in (ids[1], channels[1])]
    assert orm_heard == [  # its start was sent before the subscription
        ("run.status", status, ids[1]),
        ("task.status", task_status, ids[1]),
        ({"type": "status", "status": status, "exit_code": code}, channels[1]),
    ]
    assert fast_heard == [
        ("run.status", "running", ids[0]),
        ("task.status", "running", ids[0]),
        ("run.status", status, ids[0]),
        ("task.status", task_status, ids[0]),
        ({"type": "status", "status": "running", "exit_code": None}, channels[0]),
        ({"type": "status", "status": status, "exit_code": code}, channels[0]),
    ]


def test_a_runs_end_outside_the_plain_case_writes_nothing(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries left, a task waiting on this one, a log that moved, a run that is no longer the
    executor's, a listening subscription: the one round trip declines and changes nothing, and
    the ORM path then ends the run."""
    from app.database import db

    def post(**extra: Any) -> int:
        body = {"project": "demo", "title": "t", "prompt": "p", **extra}
        return post_task(client, member, body, False, intake).get_json()["id"]

    def untouched(run_id: int) -> None:
        with app.app_context(), db.engine.connect() as conn:
            status, size, chunks = conn.execute(
                sa.text(
                    "SELECT status, log_size, (SELECT count(*) FROM run_log_chunks"
                    " WHERE run_id = :i) FROM runs WHERE id = :i"
                ),
                {"i": run_id},
            ).one()
        assert (status, size, chunks) == ("running", 0, 0)

    retry = started(app, post(max_attempts=2))
    assert end_fast(app, retry, 1, (0, b"x")) is False
    untouched(retry)
    end_orm(app, retry, 1, (0, b"x"))
    with app.app_context(), db.engine.connect() as conn:
        attempts = conn.execute(
            sa.text("SELECT attempts FROM tasks t JOIN runs r ON r.task_id = t.id WHERE r.id = :i"),
            {"i": retry},
        ).scalar()
    assert attempts == 2  # the ORM path queued the retry

    awaited = post()
    awaited_run = started(app, awaited)
    dependent = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "d", "prompt": "p", "depends_on": [awaited]},
    ).get_json()
    assert dependent["status"] == "blocked"
    assert end_fast(app, awaited_run, 0, (0, b"x")) is False
    untouched(awaited_run)
    end_orm(app, awaited_run, 0, (0, b"x"))
    released = client.get(f"/api/v1/tasks/{dependent['id']}", headers=member.headers)
    assert released.get_json()["status"] == "queued"

    moved = started(app, post())
    assert end_fast(app, moved, 0, (5, b"x")) is False  # 5 bytes stored? none are
    untouched(moved)

    taken_over = "UPDATE runs SET executor = 'e2' WHERE id = :i"
    assert end_fast(app, moved, 0, (0, b"x"), meanwhile=taken_over) is False  # no longer e1's
    untouched(moved)

    listened = started(app, post())
    admin_headers = account(app, client, "root", "admin").headers
    sub = subscribe(app, client, admin_headers, "run.finished", monkeypatch)
    assert end_fast(app, listened, 0, (0, b"x")) is False
    untouched(listened)
    end_orm(app, listened, 0, (0, b"x"))
    assert deliveries(client, admin_headers, sub) == ["run.finished"]


def test_a_runs_end_sees_a_dependent_committed_while_it_waited(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """A dependent's creation locks the task it depends on while it reads its status. The end
    waits for that lock and must then see the new dependent (and leave it to the ORM path, which
    releases it); reading with a snapshot from before the wait would leave it blocked."""
    import threading

    from app.database import db

    ending = post_task(
        client, member, {"project": "demo", "title": "a", "prompt": "p"}, False, intake
    ).get_json()["id"]
    run_id = started(app, ending)
    other = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "x", "prompt": "p", "target": "external"},
    ).get_json()
    waiting = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "b", "prompt": "p", "depends_on": [other["id"]]},
    ).get_json()
    assert waiting["status"] == "blocked"
    answer: list[bool] = []
    with app.app_context():
        creator = db.engine.connect()
        creator.execute(
            sa.text("SELECT id FROM tasks WHERE id = :i FOR SHARE"), {"i": ending}
        )  # what `tasks.service._dependencies` does, then it adds the dependency
        creator.execute(
            sa.text("INSERT INTO task_dependencies (task_id, depends_on_id) VALUES (:b, :a)"),
            {"a": ending, "b": waiting["id"]},
        )
        ender = threading.Thread(target=lambda: answer.append(end_fast(app, run_id, 0, (0, b""))))
        ender.start()
        with db.engine.connect() as watcher:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the end waits on the creator's lock
                if watcher.execute(
                    sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")
                ).scalar():
                    break
                time.sleep(0.01)
            else:
                pytest.fail("the end never waited for the creator's lock")
        creator.commit()
        creator.close()
    ender.join(10)
    assert answer == [False]


def test_a_run_is_found_by_its_primary_key_whatever_the_queue_holds(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """The worker's statements find a run by id and check its status. Before the table's
    statistics exist PostgreSQL answered such a check from the status index, reading every
    queued run to find one: a take cost more the longer the queue."""
    from app.database import db
    from app.runs.pg_fastpath import _take_sql

    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    task_id = post_task(client, member, body, False, intake).get_json()["id"]
    with app.app_context():
        conn = db.session.connection()
        conn.execute(
            sa.text(
                "INSERT INTO runs (task_id, project_id, attempt, status, agent, queued_at,"
                " log_size, event_count) SELECT task_id, project_id, n, 'queued', agent, now(),"
                " 0, 0 FROM runs, generate_series(2, 3000) n WHERE task_id = :t"
            ),
            {"t": task_id},
        )
        # what a table looks like before its first ANALYZE
        conn.execute(sa.text("DELETE FROM pg_statistic WHERE starelid = 'runs'::regclass"))
        conn.execute(sa.text("UPDATE pg_class SET reltuples = -1 WHERE oid = 'runs'::regclass"))
        run_id = conn.execute(
            sa.text("SELECT min(id) FROM runs WHERE task_id = :t"), {"t": task_id}
        ).scalar()
        cursor = conn.connection.driver_connection.cursor()
        params = {"run_id": run_id, "executor": "e1", "lease": None}
        cursor.execute("EXPLAIN " + _take_sql(), params)
        plan = [row[0] for row in cursor]
        db.session.rollback()
    assert any("pk_runs" in line for line in plan), plan


def test_a_failed_end_writes_nothing_and_spoils_no_pooled_connection(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database refusing the end's statement: the caller gets that error (the worker then
    ends the run through its failure path), nothing is written, and the next end works."""
    import psycopg

    from app.database import db
    from app.runs import pg_fastpath

    body = {"project": "demo", "title": "t", "prompt": "p"}
    run_id = started(app, post_task(client, member, body, False, intake).get_json()["id"])
    with monkeypatch.context() as mp:
        mp.setattr(
            pg_fastpath,
            "_end_sql",
            lambda _starting: "SELECT 1 / (%(log_size)s - %(log_size)s)",
        )
        with pytest.raises(psycopg.errors.DivisionByZero):
            end_fast(app, run_id, 0, (0, b"x"))
    with app.app_context(), db.engine.connect() as conn:
        status, size = conn.execute(
            sa.text("SELECT status, log_size FROM runs WHERE id = :i"), {"i": run_id}
        ).one()
    assert (status, size) == ("running", 0)
    assert end_fast(app, run_id, 0, (0, b"x")) is True
