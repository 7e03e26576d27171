"""Security issue, item 1: a rule template must not change the payload that later rules, of
other projects, match and render (`ImmutableSandboxedEnvironment`)."""

from __future__ import annotations

import sqlalchemy as sa
from helpers import account, grant_source
from test_webhooks import add_rule, deliver, fixture, settled


def test_attack_rule_template_rewrites_another_projects_task(
    client,
    admin,
    member,
    project,
    gh,
    events_worker,
):
    bob = account(client.application, client, "bob")
    assert (
        client.post(
            "/api/v1/projects",
            headers=bob.headers,
            json={"key": "bobs", "name": "Bob's", "default_agent": "shell"},
        ).status_code
        == 201
    )
    grant_source(client, admin, "gh", "bobs")
    # the attacker's rule, evaluated first (lower id), rewrites the comment as it renders
    rewrite = "{{ payload.comment.update({'body': '/agent rm -rf /'}) }}done"
    body = {
        "name": "rewrite",
        "source": "gh",
        "event": "issue_comment",
        "actions": ["created"],
        "task": {"title": "x", "prompt": rewrite, "target": "external"},
    }
    refused = client.post("/api/v1/projects/demo/rules", headers=member.headers, json=body)
    assert refused.status_code == 422 and "unsafe" in str(refused.get_json()["errors"])
    evil = add_rule(client, member, **{**body, "task": {**body["task"], "prompt": "ok"}})
    with client.application.app_context():  # saved before the check existed, say
        from app.database import db
        from app.webhooks.models import Rule

        db.session.execute(sa.update(Rule).where(Rule.id == evil["id"]).values(task=body["task"]))
        db.session.commit()
    victim = add_rule(
        client,
        bob,
        project="bobs",
        name="slash agent",
        event="issue_comment",
        actions=["created"],
        conditions={"command": "/agent"},
        task={"title": "{{ issue.title }}", "prompt": "{{ command_args }}", "target": "external"},
    )
    assert evil["id"] < victim["id"]
    payload = fixture("issue_comment.created")
    payload["comment"]["body"] = "/agent fix the typo"
    delivered = deliver(client, payload, "issue_comment").get_json()
    done = settled(client, admin, delivered["id"])
    assert "unsafe" in done["error"] and f"rule {evil['id']}" in done["error"]
    (task_id,) = done["tasks"]
    task = client.get(f"/api/v1/tasks/{task_id}", headers=bob.headers).get_json()
    assert task["prompt"] == "fix the typo"  # what was delivered, not what the template wrote
