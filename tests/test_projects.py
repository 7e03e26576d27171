"""Projects, members and the roles enforced on every project-scoped route."""

from helpers import account, assert_problem, at_once


def test_create_get_update_archive(client, member, project):
    assert project["key"] == "demo" and project["default_agent"] == "shell"
    got = client.get("/api/v1/projects/demo", headers=member.headers)
    assert got.status_code == 200 and got.get_json()["name"] == "Demo"
    upd = client.patch(
        "/api/v1/projects/demo",
        json={"max_concurrent_runs": 2, "description": "d"},
        headers=member.headers,
    )
    assert upd.status_code == 200 and upd.get_json()["max_concurrent_runs"] == 2
    listed = client.get("/api/v1/projects", headers=member.headers).get_json()["data"]
    assert [p["key"] for p in listed] == ["demo"]
    assert client.delete("/api/v1/projects/demo", headers=member.headers).status_code == 204
    assert client.get("/api/v1/projects", headers=member.headers).get_json()["data"] == []
    archived = client.get("/api/v1/projects?archived=true", headers=member.headers).get_json()
    assert archived["data"][0]["archived_at"]
    assert_problem(
        client.post(
            "/api/v1/tasks",
            json={"project": "demo", "title": "t", "prompt": "x"},
            headers=member.headers,
        ),
        409,
    )


def test_bad_project_input(client, member, project):
    assert_problem(
        client.post(
            "/api/v1/projects", json={"key": "demo", "name": "again"}, headers=member.headers
        ),
        409,
    )
    body = assert_problem(
        client.post(
            "/api/v1/projects", json={"key": "Bad Key!", "name": "x"}, headers=member.headers
        ),
        422,
    )
    assert "key" in body["errors"]
    body = assert_problem(
        client.post(
            "/api/v1/projects",
            json={"key": "p2", "name": "x", "default_agent": "nope"},
            headers=member.headers,
        ),
        422,
    )
    assert "default_agent" in body["errors"]


def test_roles_are_enforced(client, app, member, project):
    viewer = account(app, client, "vera")
    dev = account(app, client, "dan")
    outsider = account(app, client, "olga")
    for acct, role in ((viewer, "viewer"), (dev, "developer")):
        resp = client.post(
            "/api/v1/projects/demo/members",
            headers=member.headers,
            json={"username": acct.username, "role": role},
        )
        assert resp.status_code == 201 and resp.get_json()["role"] == role
    task_body = {"project": "demo", "title": "t", "prompt": "echo hi"}
    # outsiders do not learn the project exists
    assert_problem(client.get("/api/v1/projects/demo", headers=outsider.headers), 404)
    assert client.get("/api/v1/projects", headers=outsider.headers).get_json()["data"] == []
    assert_problem(client.post("/api/v1/tasks", json=task_body, headers=outsider.headers), 422)
    # viewers read but cannot create tasks or manage
    assert client.get("/api/v1/projects/demo", headers=viewer.headers).status_code == 200
    assert_problem(client.post("/api/v1/tasks", json=task_body, headers=viewer.headers), 403)
    assert_problem(
        client.patch("/api/v1/projects/demo", json={"name": "x"}, headers=viewer.headers), 403
    )
    # developers create tasks but do not manage the project
    created = client.post("/api/v1/tasks", json=task_body, headers=dev.headers)
    assert created.status_code == 201
    assert (
        client.get(f"/api/v1/tasks/{created.get_json()['id']}", headers=viewer.headers).status_code
        == 200
    )
    assert_problem(
        client.get(f"/api/v1/tasks/{created.get_json()['id']}", headers=outsider.headers), 404
    )
    assert_problem(
        client.post(f"/api/v1/tasks/{created.get_json()['id']}/cancel", headers=viewer.headers), 403
    )
    assert_problem(
        client.post(
            "/api/v1/projects/demo/members",
            headers=dev.headers,
            json={"username": outsider.username, "role": "viewer"},
        ),
        403,
    )
    members = client.get("/api/v1/projects/demo/members", headers=viewer.headers).get_json()
    assert {m["username"]: m["role"] for m in members["data"]} == {
        "alice": "maintainer",
        "vera": "viewer",
        "dan": "developer",
    }
    one = client.get(f"/api/v1/projects/demo/members/{dev.id}", headers=viewer.headers)
    assert one.get_json()["role"] == "developer"
    assert_problem(
        client.get(f"/api/v1/projects/demo/members/{outsider.id}", headers=viewer.headers), 404
    )
    assert (
        client.delete(
            f"/api/v1/projects/demo/members/{viewer.id}", headers=member.headers
        ).status_code
        == 204
    )
    assert_problem(client.get("/api/v1/projects/demo", headers=viewer.headers), 404)


def test_last_maintainer_stays(client, member, project):
    assert_problem(
        client.delete(f"/api/v1/projects/demo/members/{member.id}", headers=member.headers), 409
    )


def test_admin_sees_every_project(client, admin, project):
    assert client.get("/api/v1/projects/demo", headers=admin.headers).status_code == 200


def test_token_abilities_apply(client, member, project):
    raw = client.post(
        "/api/v1/me/tokens",
        headers=member.headers,
        json={"label": "ro", "abilities": ["projects:read"]},
    ).get_json()["token"]
    ro = {"X-API-Key": raw}
    assert client.get("/api/v1/projects/demo", headers=ro).status_code == 200
    assert_problem(
        client.post(
            "/api/v1/tasks", headers=ro, json={"project": "demo", "title": "t", "prompt": "x"}
        ),
        403,
    )


def test_stats(client, member, project):
    client.post(
        "/api/v1/tasks",
        json={"project": "demo", "title": "t", "prompt": "x", "target": "external"},
        headers=member.headers,
    )
    stats = client.get("/api/v1/projects/demo/stats", headers=member.headers).get_json()
    assert stats["tasks"]["queued"] == 1 and stats["tasks_total"] == 1
    assert stats["runs"] == {"queued": 1} and stats["log_bytes"] == 0


def test_racing_writes_the_database_refuses_are_409s(client, member, app):
    """Checks that pass for every request sent at once, then a unique index refuses all but
    one: the losers get the 409 a later request would get, not a 500."""
    body = {"key": "twin", "name": "Twin"}
    answers = at_once(
        app, 6, lambda c, _: c.post("/api/v1/projects", json=body, headers=member.headers)
    )
    assert sorted(a.status_code for a in answers) == [201] + [409] * 5, [
        a.get_json() for a in answers
    ]
    bob = account(app, client, "bob")
    answers = at_once(
        app,
        6,
        lambda c, _: c.post(
            "/api/v1/projects/twin/members",
            json={"username": bob.username, "role": "viewer"},
            headers=member.headers,
        ),
    )
    codes = [a.status_code for a in answers]  # adding again only sets the role: 2xx or 409
    assert set(codes) <= {200, 201, 409} and {200, 201} & set(codes), codes
    members = client.get("/api/v1/projects/twin/members", headers=member.headers).get_json()
    assert sorted(m["username"] for m in members["data"]) == sorted(["bob", member.username])


def test_two_maintainers_stepping_down_at_once_leave_one(client, member, app):
    """Each alone is allowed (the other remains); together they would leave the project with
    none. The loser is refused as the last maintainer (409) or as no maintainer any more
    (403/404)."""
    client.post("/api/v1/projects", json={"key": "duo", "name": "Duo"}, headers=member.headers)
    bob = account(app, client, "bob")
    client.post(
        "/api/v1/projects/duo/members",
        json={"username": bob.username, "role": "maintainer"},
        headers=member.headers,
    )
    who = [(member, member.id), (bob, bob.id)]
    answers = at_once(
        app,
        2,
        lambda c, i: c.post(
            "/api/v1/projects/duo/members",
            json={"user_id": who[i][1], "role": "developer"},
            headers=who[i][0].headers,
        ),
    )
    codes = sorted(a.status_code for a in answers)
    assert codes[0] in (200, 201) and codes[1] in (403, 404, 409), codes
    members = client.get("/api/v1/projects/duo/members", headers=bob.headers).get_json()["data"]
    assert [m["role"] for m in members].count("maintainer") == 1, members
