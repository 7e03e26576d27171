"""Security issue, item 5: a token without `runs:start` cannot start agents through a rule. A
rule keeps the abilities it was saved with; its tasks are made with no more than those and than
its author's role allows now; a rule whose author lost access stops matching, saying why."""

from __future__ import annotations

import sqlalchemy as sa
from helpers import account, assert_problem, count
from test_webhooks import deliver, fixture, settled

from app.tasks.models import Task

RULE = {
    "name": "agent label",
    "source": "gh",
    "event": "issues",
    "actions": ["labeled"],
    "conditions": {"label": "bug"},
    "task": {"title": "Fix: {{ issue.title }}", "prompt": "{{ issue.body }}", "target": "external"},
}


def _pat(client, acct, abilities):
    resp = client.post(
        "/api/v1/me/tokens", headers=acct.headers, json={"label": "t", "abilities": abilities}
    )
    return {"Authorization": f"Bearer {resp.get_json()['token']}"}


def test_attack_token_without_runs_start_saves_a_rule(app, client, member, project, gh):
    weak = _pat(client, member, ["projects:read", "projects:write"])
    resp = client.post("/api/v1/projects/demo/rules", headers=weak, json=RULE)
    assert_problem(resp, 403)
    assert "runs:start" in resp.get_json()["detail"]
    strong = _pat(client, member, ["projects:read", "projects:write", "runs:start"])
    rule = client.post("/api/v1/projects/demo/rules", headers=strong, json=RULE).get_json()
    assert_problem(
        client.patch(f"/api/v1/rules/{rule['id']}", headers=weak, json={"name": "again"}), 403
    )


def test_attack_rule_saved_without_runs_start_makes_no_task(
    app, client, admin, member, project, gh, events_worker
):
    rule = client.post("/api/v1/projects/demo/rules", headers=member.headers, json=RULE)
    assert rule.status_code == 201
    with app.app_context():  # as a token without runs:start saved it, before the check
        from app.database import db
        from app.webhooks.models import Rule

        db.session.execute(
            sa.update(Rule).values(author_abilities=["projects:read", "projects:write"])
        )
        db.session.commit()
    delivered = deliver(client, fixture("issues.labeled"), "issues").get_json()
    done = settled(client, admin, delivered["id"])
    assert done["state"] == "failed" and "without the runs:start ability" in done["error"]
    assert count(app, Task) == 0


def test_a_rule_whose_author_lost_access_stops_making_tasks(
    app, client, admin, member, project, gh, events_worker
):
    bob = account(app, client, "bob")
    client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": bob.username, "role": "maintainer"},
    )
    assert (
        client.post("/api/v1/projects/demo/rules", headers=bob.headers, json=RULE).status_code
        == 201
    )
    removed = client.delete(f"/api/v1/projects/demo/members/{bob.id}", headers=member.headers)
    assert removed.status_code == 204
    delivered = deliver(client, fixture("issues.labeled"), "issues").get_json()
    done = settled(client, admin, delivered["id"])
    assert done["state"] == "failed" and "demo" in done["error"], done
    assert count(app, Task) == 0
