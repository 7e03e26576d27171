"""Security issue, item 3: any member could make a project, attach a catch-all rule to the shared
`gh` source and read every later delivery (private repositories' issues included), with other
projects' keys, rule ids and task ids. Sources are now granted to projects by an administrator;
only granted projects' maintainers attach rules; a reader sees an event only through their own
projects' matches, and only those matches (and their part of the error)."""

from __future__ import annotations

import sqlalchemy as sa
from helpers import account, assert_problem, grant_source
from test_webhooks import add_rule, deliver, event, fixture, settled

CATCH_ALL = {"name": "everything", "actions": [], "conditions": {}}


def _bob_with_a_project(client):
    bob = account(client.application, client, "bob")
    resp = client.post(
        "/api/v1/projects",
        headers=bob.headers,
        json={"key": "bobs", "name": "Bob's", "default_agent": "shell"},
    )
    assert resp.status_code == 201
    return bob


def test_attack_catch_all_rule_on_a_shared_source(client, admin, member, project, gh):
    bob = _bob_with_a_project(client)
    body = {**CATCH_ALL, "source": "gh", "event": "issues", "task": {"title": "t", "prompt": "p"}}
    refused = client.post("/api/v1/projects/bobs/rules", headers=bob.headers, json=body)
    assert_problem(refused, 422)
    nowhere = client.post(
        "/api/v1/projects/bobs/rules", headers=bob.headers, json={**body, "source": "nope"}
    )
    # a source that exists and one that does not read the same: nothing to learn
    assert (
        refused.get_json()["errors"]["source"][0].replace("'gh'", "'nope'")
        == (nowhere.get_json()["errors"]["source"][0])
    )
    listed = client.get("/api/v1/projects/bobs/rules", headers=bob.headers).get_json()
    assert listed["data"] == []
    assert client.get("/api/v1/projects/bobs/webhook-sources", headers=bob.headers).get_json() == {
        "data": []
    }
    shown = client.get("/api/v1/projects/demo/webhook-sources", headers=member.headers).get_json()
    assert [s["name"] for s in shown["data"]] == ["gh"]


def test_attack_reading_deliveries_through_another_projects_match(
    client, admin, member, project, gh, events_worker
):
    bob = _bob_with_a_project(client)
    theirs = add_rule(client, member)  # demo: issues labeled "bug"
    delivered = deliver(client, fixture("issues.labeled"), "issues").get_json()
    done = settled(client, admin, delivered["id"])
    assert done["state"] == "dispatched" and len(done["tasks"]) == 1
    # bob, who has no rule on the source, sees nothing of it
    assert_problem(client.get(f"/api/v1/events/{delivered['id']}", headers=bob.headers), 404)
    assert client.get("/api/v1/events", headers=bob.headers).get_json()["data"] == []
    assert client.get("/api/v1/events?project=demo", headers=bob.headers).get_json()["data"] == []

    # granted the source, bob's catch-all rule sees later deliveries, and only his part of them
    grant_source(client, admin, "gh", "bobs")
    mine = add_rule(
        client,
        bob,
        project="bobs",
        **CATCH_ALL,
        task={"title": "{{ issue.title }}", "prompt": "p", "target": "external"},
    )
    delivered = deliver(client, fixture("issues.labeled"), "issues").get_json()
    settled(client, admin, delivered["id"])
    seen = event(client, bob, delivered["id"])
    assert [m["project"] for m in seen["matches"]] == ["bobs"]
    assert [m["rule_id"] for m in seen["matches"]] == [mine["id"]]
    assert theirs["id"] not in [m["rule_id"] for m in seen["matches"]]
    assert len(seen["tasks"]) == 1
    assert len(event(client, admin, delivered["id"])["tasks"]) == 2  # the admin sees both
    # filtering by another project reveals nothing of where the event went
    assert client.get("/api/v1/events?project=demo", headers=bob.headers).get_json()["data"] == []
    assert [
        e["id"]
        for e in client.get("/api/v1/events?project=bobs", headers=bob.headers).get_json()["data"]
    ] == [delivered["id"]]


def test_attack_other_projects_rule_errors_in_an_event(
    client, admin, member, project, gh, events_worker
):
    bob = _bob_with_a_project(client)
    grant_source(client, admin, "gh", "bobs")
    theirs = add_rule(client, member, name="secret-plan-7", conditions={})
    with client.application.app_context():  # their template fails (saved before a check)
        from app.database import db
        from app.webhooks.models import Rule

        db.session.execute(
            sa.update(Rule)
            .where(Rule.id == theirs["id"])
            .values(task={"title": "{{ nope.nope }}", "prompt": "p", "target": "external"})
        )
        db.session.commit()
    add_rule(client, bob, project="bobs", **CATCH_ALL, task={"title": "t", "prompt": "p"})
    delivered = deliver(client, fixture("issues.labeled"), "issues").get_json()
    done = settled(client, admin, delivered["id"])
    assert done["state"] == "failed" and "secret-plan-7" in done["error"]
    seen = event(client, bob, delivered["id"])
    assert "secret-plan-7" not in seen["error"] and f"rule {theirs['id']}" not in seen["error"]
    assert seen["error"] == "failed for another project's rule or task"


def test_grants_are_an_administrators_and_revoking_stops_the_rules(
    client, admin, member, project, gh, events_worker
):
    bob = _bob_with_a_project(client)
    grants = "/api/v1/webhook-sources/gh/projects"
    assert_problem(client.post(grants, headers=member.headers, json={"project": "demo"}), 403)
    assert_problem(client.get(grants, headers=member.headers), 403)
    assert_problem(client.post(grants, headers=admin.headers, json={"project": "nope"}), 404)
    again = client.post(grants, headers=admin.headers, json={"project": "demo"})
    assert again.status_code == 200  # granted already (by the fixture)
    assert client.post(grants, headers=admin.headers, json={"project": "bobs"}).status_code == 201
    listed = client.get(grants, headers=admin.headers).get_json()["data"]
    assert [g["project"] for g in listed] == ["bobs", "demo"]
    rule = add_rule(client, bob, project="bobs", **CATCH_ALL, task={"title": "t", "prompt": "p"})
    assert rule["source_granted"] is True

    assert client.delete(f"{grants}/bobs", headers=admin.headers).status_code == 204
    assert_problem(client.delete(f"{grants}/bobs", headers=admin.headers), 404)
    shown = client.get(f"/api/v1/rules/{rule['id']}", headers=bob.headers).get_json()
    assert shown["source_granted"] is False
    delivered = deliver(client, fixture("issues.labeled"), "issues").get_json()
    assert settled(client, admin, delivered["id"])["state"] == "skipped"  # bob's rule is out
    # and saving the rule on it again is refused
    assert_problem(
        client.patch(f"/api/v1/rules/{rule['id']}", headers=bob.headers, json={"source": "gh"}),
        422,
    )
