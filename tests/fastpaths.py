"""What the fast-path tests share: posting through the fast path or straight to the view, a
subscription that makes the ORM path listen, the notifications heard, and rows compared."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from helpers import Account


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
