"""Inbound webhooks: signed deliveries from GitHub (real payloads from @octokit/webhooks-examples)
and generic senders become events, and project rules turn events into tasks on the `events`
queue of a real worker."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import urlencode

import pytest
from helpers import (
    GH_SECRET,
    account,
    assert_problem,
    count,
    grant_source,
    unreachable_redis,
    wait_for,
)
from servers import WorkerPool

from app.webhooks.signatures import sign

FIXTURES = Path(__file__).parent / "fixtures" / "github"
SECRET = GH_SECRET


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def deliver(client, payload, event, *, source="gh", secret=SECRET, delivery=None, form=False):
    """POST the way GitHub does: the signature covers the exact bytes sent."""
    if form:
        body = urlencode({"payload": json.dumps(payload)}).encode()
        content_type = "application/x-www-form-urlencoded"
    else:
        body = json.dumps(payload).encode()
        content_type = "application/json"
    headers = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": sign(secret, body),
        "User-Agent": "GitHub-Hookshot/test",
    }
    return client.post(
        f"/api/v1/webhooks/{source}", data=body, headers=headers, content_type=content_type
    )


def add_rule(client, who, project="demo", **overrides) -> dict:
    body = {
        "name": "agent label",
        "source": "gh",
        "event": "issues",
        "actions": ["labeled"],
        "conditions": {"label": "bug"},
        "task": {
            "title": "Fix: {{ issue.title }}",
            "prompt": "Issue #{{ issue.number }}: {{ issue.title }}\n\n{{ issue.body }}",
            "target": "external",
        },
    }
    body.update(overrides)
    resp = client.post(f"/api/v1/projects/{project}/rules", headers=who.headers, json=body)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def event(client, who, event_id) -> dict:
    resp = client.get(f"/api/v1/events/{event_id}", headers=who.headers)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def settled(client, who, event_id, states=("skipped", "dispatched", "completed", "failed")):
    return wait_for(
        lambda: (e := event(client, who, event_id))["state"] in states and e, timeout=15
    )


def test_githubs_published_test_vector():
    assert (
        sign("It's a Secret to Everybody", b"Hello, World!")
        == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )


def test_sources_are_admin_only_and_secrets_are_shown_once(client, admin, member, gh):
    assert gh["secret"] == SECRET and gh["url"].endswith("/api/v1/webhooks/gh")
    listed = client.get("/api/v1/webhook-sources", headers=admin.headers).get_json()["data"]
    assert [s["name"] for s in listed] == ["gh"] and "secret" not in listed[0]
    generated = client.post(
        "/api/v1/webhook-sources", headers=admin.headers, json={"name": "ci", "kind": "generic"}
    ).get_json()
    assert len(generated["secret"]) >= 32
    assert_problem(
        client.post(
            "/api/v1/webhook-sources", headers=admin.headers, json={"name": "gh", "kind": "github"}
        ),
        409,
    )
    assert_problem(
        client.post(
            "/api/v1/webhook-sources", headers=member.headers, json={"name": "x", "kind": "github"}
        ),
        403,
    )


def test_bad_or_missing_signature_is_401_and_stores_nothing(app, client, gh):
    from app.webhooks.models import WebhookEvent

    payload = fixture("issues.labeled")
    assert_problem(deliver(client, payload, "issues", secret="wrong-secret"), 401, "bad_signature")
    body = json.dumps(payload).encode()
    unsigned = client.post(
        "/api/v1/webhooks/gh",
        data=body,
        content_type="application/json",
        headers={"X-GitHub-Event": "issues", "X-GitHub-Delivery": "d-1"},
    )
    assert_problem(unsigned, 401)
    tampered = client.post(
        "/api/v1/webhooks/gh",
        data=body + b" ",
        content_type="application/json",
        headers={"X-GitHub-Event": "issues", "X-Hub-Signature-256": sign(SECRET, body)},
    )
    assert_problem(tampered, 401)
    assert count(app, WebhookEvent) == 0
    assert_problem(deliver(client, payload, "issues", source="nope"), 404)


def test_ping_answers_200(client, gh):
    resp = deliver(client, fixture("ping"), "ping")
    assert resp.status_code == 200 and resp.get_json()["state"] == "skipped"


def test_labeled_issue_makes_one_task_even_when_delivered_twice(
    app, client, admin, member, project, gh, events_worker
):
    from app.tasks.models import Task

    add_rule(client, member)
    payload = fixture("issues.labeled")
    first = deliver(client, payload, "issues", delivery="delivery-1")
    assert first.status_code == 202, first.get_json()
    receipt = first.get_json()
    assert receipt["duplicate"] is False and receipt["state"] == "received"
    again = deliver(client, payload, "issues", delivery="delivery-1")
    assert again.status_code == 200 and again.get_json() == {**receipt, "duplicate": True}

    done = settled(client, admin, receipt["id"])
    assert done["state"] == "dispatched", done
    assert len(done["tasks"]) == 1 and done["matches"][0]["project"] == "demo"
    assert "signature" not in json.dumps(done["headers"]).lower()
    task = client.get(f"/api/v1/tasks/{done['tasks'][0]}", headers=member.headers).get_json()
    issue = payload["issue"]
    assert task["title"] == f"Fix: {issue['title']}"
    assert issue["title"] in task["prompt"] and issue["body"] in task["prompt"]
    assert task["source"] == "webhook" and task["status"] == "queued"
    assert count(app, Task) == 1
    # the member sees the event through the project; a stranger does not
    mine = client.get("/api/v1/events?project=demo", headers=member.headers).get_json()["data"]
    assert [e["id"] for e in mine] == [receipt["id"]]
    bob = account(app, client, "bob")
    assert client.get("/api/v1/events", headers=bob.headers).get_json()["data"] == []
    assert_problem(client.get(f"/api/v1/events/{receipt['id']}", headers=bob.headers), 404)


def test_a_nul_in_a_payload_reaches_the_task_as_a_replacement_character(
    client, admin, member, project, gh, events_worker
):
    """PostgreSQL's text holds no NUL: the rendered title and prompt carry U+FFFD instead, as
    logs do with bytes that are not UTF-8, and the event is stored as it came."""
    add_rule(client, member)
    payload = fixture("issues.labeled")
    payload["issue"]["title"] = "Crash on \x00 in input"
    receipt = deliver(client, payload, "issues").get_json()
    done = settled(client, admin, receipt["id"])
    assert done["state"] == "dispatched", done
    assert done["payload"]["issue"]["title"] == "Crash on \x00 in input"
    task = client.get(f"/api/v1/tasks/{done['tasks'][0]}", headers=member.headers).get_json()
    assert task["title"] == "Fix: Crash on \ufffd in input"
    assert "Crash on \ufffd in input" in task["prompt"]


def test_three_rules_three_tasks_unmatched_skipped_and_template_errors_fail(
    app, client, admin, member, project, gh, events_worker
):
    from app.tasks.models import Task

    for name in ("one", "two", "three"):
        add_rule(client, member, name=name)
    labeled = deliver(client, fixture("issues.labeled"), "issues").get_json()
    assert len(settled(client, admin, labeled["id"])["tasks"]) == 3

    push = deliver(client, fixture("push"), "push").get_json()
    assert settled(client, admin, push["id"])["state"] == "skipped"

    add_rule(
        client,
        member,
        name="broken",
        event="pull_request",
        actions=["opened"],
        conditions={},
        task={"title": "{{ issue.title }}", "prompt": "x", "target": "external"},
    )
    pr = deliver(client, fixture("pull_request.opened"), "pull_request").get_json()
    failed = settled(client, admin, pr["id"])
    assert failed["state"] == "failed" and "'issue' is undefined" in failed["error"], failed
    assert count(app, Task) == 3

    # replay (admin) matches again: still one task per rule
    replayed = client.post(f"/api/v1/events/{labeled['id']}/replay", headers=admin.headers)
    assert replayed.status_code == 200 and len(replayed.get_json()["tasks"]) == 3
    assert count(app, Task) == 3
    assert_problem(
        client.post(f"/api/v1/events/{labeled['id']}/replay", headers=member.headers), 403
    )


def test_form_encoded_push_and_branch_condition(client, admin, member, project, gh, events_worker):
    add_rule(
        client,
        member,
        name="on push",
        event="push",
        actions=[],
        conditions={"branch": "master", "repository": "codertocat/*"},
        task={
            "title": "Review {{ after[:7] }}",
            "prompt": "{{ head_commit.message }}",
            "target": "external",
        },
    )
    payload = fixture("push")
    receipt = deliver(client, payload, "push", form=True).get_json()
    done = settled(client, admin, receipt["id"])
    assert done["state"] == "dispatched" and done["payload"] == payload
    task = client.get(f"/api/v1/tasks/{done['tasks'][0]}", headers=member.headers).get_json()
    assert task["title"] == f"Review {payload['after'][:7]}"


def test_comment_command_and_bots_ignored(client, admin, member, project, gh, events_worker):
    add_rule(
        client,
        member,
        name="slash agent",
        event="issue_comment",
        actions=["created"],
        conditions={"command": "/agent"},
        task={
            "title": "{{ issue.title }}",
            "prompt": "{{ command_args }}",
            "target": "external",
        },
    )
    payload = fixture("issue_comment.created")
    plain = deliver(client, payload, "issue_comment").get_json()
    assert settled(client, admin, plain["id"])["state"] == "skipped"

    payload["comment"]["body"] = "Thanks!\n/agent fix the spelling please"
    asked = deliver(client, payload, "issue_comment").get_json()
    done = settled(client, admin, asked["id"])
    task = client.get(f"/api/v1/tasks/{done['tasks'][0]}", headers=member.headers).get_json()
    assert task["prompt"] == "fix the spelling please"

    payload["sender"] = {**payload["sender"], "login": "switchboard[bot]", "type": "Bot"}
    bot = deliver(client, payload, "issue_comment").get_json()
    assert settled(client, admin, bot["id"])["state"] == "skipped"


def test_event_follows_its_tasks_to_completed(client, admin, member, project, gh, events_worker):
    add_rule(client, member)
    receipt = deliver(client, fixture("issues.labeled"), "issues").get_json()
    task_id = settled(client, admin, receipt["id"])["tasks"][0]
    run = client.post(
        f"/api/v1/tasks/{task_id}/claim", headers=member.headers, json={"executor": "ext-1"}
    ).get_json()
    resp = client.post(
        f"/api/v1/runs/{run['id']}/complete",
        headers=member.headers,
        json={"executor": "ext-1", "status": "succeeded", "exit_code": 0},
    )
    assert resp.status_code == 200, resp.get_json()
    assert event(client, admin, receipt["id"])["state"] == "completed"


def test_generic_source_and_stale_events_are_picked_up(app, client, admin, member, project):
    """A generic sender; the delivery is stored while no worker runs, and a worker started later
    matches it (the sweep kicks events left `received`)."""
    from app.queues import get_redis
    from app.webhooks.receiving import DRAIN_FLAG

    secret = client.post(
        "/api/v1/webhook-sources",
        headers=admin.headers,
        json={"name": "ci", "kind": "generic", "secret": "generic-secret-1"},
    ).get_json()["secret"]
    grant_source(client, admin, "ci", "demo")
    add_rule(
        client,
        member,
        source="ci",
        event="build.failed",
        actions=[],
        conditions={},
        task={
            "title": "Fix build {{ build.id }}",
            "prompt": "{{ build.log }}",
            "target": "external",
        },
    )
    body = json.dumps({"build": {"id": 42, "log": "error: x"}}).encode()
    headers = {
        "X-Switchboard-Event": "build.failed",
        "X-Switchboard-Signature-256": sign(secret, body),
    }
    resp = client.post(
        "/api/v1/webhooks/ci", data=body, content_type="application/json", headers=headers
    )
    assert resp.status_code == 202, resp.get_json()
    receipt = resp.get_json()
    assert receipt["delivery_id"].startswith("sha256:")  # no id sent: the body names it
    # Redis lost the queued drain (a restart): only the flag and queue are gone, not the event
    with app.app_context():
        get_redis().flushdb()
        assert not get_redis().exists(DRAIN_FLAG)
    pool = WorkerPool(app, processes=1, queues="events", SWITCHBOARD_SWEEP_INTERVAL="1")
    try:
        done = wait_for(
            lambda: (e := event(client, admin, receipt["id"]))["state"] == "dispatched" and e,
            timeout=20,
        )
    finally:
        pool.stop()
    task = client.get(f"/api/v1/tasks/{done['tasks'][0]}", headers=member.headers).get_json()
    assert task["title"] == "Fix build 42" and task["prompt"] == "error: x"


def test_rule_validation_and_roles(app, client, admin, member, project, gh):
    bad = client.post(
        "/api/v1/projects/demo/rules",
        headers=member.headers,
        json={
            "name": "x",
            "source": "nope",
            "event": "issues",
            "task": {"title": "{{ issue.title", "prompt": "x", "agent": "nobody"},
        },
    )
    body = assert_problem(bad, 422)
    assert set(body["errors"]) == {"source", "task.title", "task.agent"}
    viewer = account(app, client, "val")
    client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": viewer.username, "role": "developer"},
    )
    denied = client.post(
        "/api/v1/projects/demo/rules",
        headers=viewer.headers,
        json={
            "name": "x",
            "source": "gh",
            "event": "issues",
            "task": {"title": "t", "prompt": "p"},
        },
    )
    assert_problem(denied, 403)
    rule = add_rule(client, member)
    assert (
        client.get("/api/v1/projects/demo/rules", headers=viewer.headers).get_json()["data"][0][
            "id"
        ]
        == rule["id"]
    )
    patched = client.patch(
        f"/api/v1/rules/{rule['id']}", headers=member.headers, json={"enabled": False}
    )
    assert patched.status_code == 200 and patched.get_json()["enabled"] is False
    assert_problem(client.delete("/api/v1/webhook-sources/gh", headers=admin.headers), 409)
    assert client.delete(f"/api/v1/rules/{rule['id']}", headers=member.headers).status_code == 204
    assert client.delete("/api/v1/webhook-sources/gh", headers=admin.headers).status_code == 204


def test_receivers_take_large_bodies_and_are_not_rate_limited(app, client, gh, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_WRITE", "2/minute")
    payload = fixture("issues.labeled")
    payload["issue"]["body"] = "x" * (2 * 1024 * 1024)  # over the API's 1 MB, under 25 MB
    for _ in range(3):
        resp = deliver(client, payload, "issues")
        assert resp.status_code == 202, resp.get_json()
    monkeypatch.setitem(app.config, "SWITCHBOARD_WEBHOOK_MAX_BODY_BYTES", 1024)
    assert_problem(deliver(client, payload, "issues"), 413)


def test_fast_path_and_flask_view_answer_alike(client, gh):
    """JSON deliveries are answered by the WSGI fast path, form-encoded ones by the Flask view."""
    answers = []
    for form in (False, True):
        resp = deliver(client, fixture("push"), "push", form=form, delivery=f"d-{form}")
        assert resp.status_code == 202 and resp.mimetype == "application/json"
        assert resp.headers["Cache-Control"] == "no-store" and resp.headers["X-Request-ID"]
        answers.append(resp.get_json())
    assert answers[0].keys() == answers[1].keys()
    assert [a["state"] for a in answers] == ["received", "received"]
    body = json.dumps({"zen": "hi"}).encode()
    mine = client.post(
        "/api/v1/webhooks/gh",
        data=body,
        content_type="application/json",
        headers={
            "X-GitHub-Event": "ping",
            "X-Hub-Signature-256": sign(SECRET, body),
            "X-Request-ID": "trace-123",
        },
    )
    assert mine.status_code == 200 and mine.headers["X-Request-ID"] == "trace-123"


def test_templates_are_sandboxed():
    from jinja2 import TemplateError

    from app.webhooks.matching import render_task

    def render(prompt):
        return render_task(
            {"title": "t", "prompt": prompt},
            event_type="issues",
            action="labeled",
            delivery_id="d",
            payload={"issue": {"title": "x"}},
            extra={},
        )["prompt"]

    assert render("{{ issue.title * 3 }} {{ event }}/{{ action }}") == "xxx issues/labeled"
    for evil in (
        "{{ issue.__class__.__mro__ }}",
        "{{ 'x' * 10**9 }}",
        "{{ 2 ** 100000 }}",
        "{{ issue.nope }}",
    ):
        with pytest.raises(TemplateError):
            render(evil)


def test_deliveries_are_kept_while_redis_is_away(app, client, gh, monkeypatch):
    """Stored and acknowledged without Redis (the sweep has them matched later), and without
    every delivery waiting for Redis again."""
    from app.webhooks.models import WebhookEvent

    dead, asked = unreachable_redis()
    monkeypatch.setitem(app.extensions, "switchboard_redis", dead)
    monkeypatch.setitem(app.extensions, "switchboard_queues", {})
    seen = []
    for _ in range(3):
        resp = deliver(client, fixture("issues.labeled"), "issues")
        assert resp.status_code == 202, resp.get_json()
        seen.append(len(asked))
    assert seen[0] > 0 and seen[1:] == [seen[0]] * 2, seen  # after one failure, not asked again
    assert count(app, WebhookEvent) == 3


def test_retention_forgets_old_finished_events_and_deliveries(app, client, gh):
    from datetime import timedelta

    import sqlalchemy as sa

    from app.database import db
    from app.runs.sweep import retention
    from app.subscriptions.models import Delivery, DeliveryAttempt, Subscription
    from app.timeutil import utcnow
    from app.webhooks.models import WebhookEvent

    ids = [deliver(client, fixture("push"), "push").get_json()["id"] for _ in range(4)]
    old = utcnow() - timedelta(days=31)
    with app.app_context():
        states = dict(zip(ids, ("skipped", "failed", "received", "skipped"), strict=True))
        for event_id, state in states.items():
            db.session.execute(
                sa.update(WebhookEvent)
                .where(WebhookEvent.id == event_id)
                .values(state=state, received_at=old if event_id != ids[3] else utcnow())
            )
        sub = Subscription(url="https://example.com/", secret="s" * 16, events=["*"])
        db.session.add(sub)
        db.session.flush()
        for n, state in enumerate(("delivered", "dead", "pending")):
            d = Delivery(subscription_id=sub.id, guid=f"g{n}", event="x", body={}, state=state)
            d.created_at = old
            db.session.add(d)
            db.session.flush()
            db.session.add(DeliveryAttempt(delivery_id=d.id, number=1, duration_ms=1))
        db.session.commit()
        assert retention() == {"events_pruned": 2, "deliveries_pruned": 2}
        assert retention() == {}  # at most once an hour
        left = db.session.scalars(sa.select(WebhookEvent.id).order_by(WebhookEvent.id)).all()
        assert left == [ids[2], ids[3]]  # still being matched, or recent
        assert db.session.scalars(sa.select(Delivery.state)).all() == ["pending"]
        assert db.session.scalar(sa.select(sa.func.count(DeliveryAttempt.id))) == 1
