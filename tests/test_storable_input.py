"""Input the database cannot hold (ids beyond PostgreSQL's integer, NUL characters) is the
client's error, said where it is, on both backends; nested validation errors come flat."""

from helpers import assert_problem, count
from test_execution import create, log_text

from app.input_bounds import MAX_ID
from app.projects.models import ProjectMember
from app.tasks.models import Task

TOO_BIG = MAX_ID + 1


def test_path_ids_beyond_any_row_are_404(client, member, project):
    for method, path in [
        ("GET", f"/api/v1/tasks/{TOO_BIG}"),
        ("POST", f"/api/v1/tasks/{10**30}/cancel"),
        ("GET", f"/api/v1/runs/{TOO_BIG}/events"),
        ("POST", f"/api/v1/runs/{TOO_BIG}/stop"),
        ("PATCH", f"/api/v1/users/{TOO_BIG}"),
    ]:
        resp = client.open(path, method=method, headers=member.headers)
        body = assert_problem(resp, 404, "not_found")
        assert "ids go up to 2147483647" in body["detail"], body
    # the largest id still reaches the route, which says what is missing
    body = assert_problem(client.get(f"/api/v1/tasks/{MAX_ID}", headers=member.headers), 404)
    assert "ids go up to" not in body["detail"]
    spec = client.get("/api/v1/openapi.json").get_json()
    param = spec["paths"]["/api/v1/tasks/{task_id}"]["parameters"][0]
    assert param["schema"]["maximum"] == MAX_ID


def test_ids_in_bodies_and_queries_beyond_any_row_are_422(client, member, project, app):
    before = count(app, ProjectMember), count(app, Task)
    body = assert_problem(
        client.post(
            "/api/v1/projects/demo/members",
            json={"user_id": TOO_BIG, "role": "viewer"},
            headers=member.headers,
        ),
        422,
        "validation_failed",
    )
    assert list(body["errors"]) == ["user_id"]
    body = assert_problem(
        client.post(
            "/api/v1/tasks",
            json={"project": "demo", "title": "t", "prompt": "p", "depends_on": [1, 2**40]},
            headers=member.headers,
        ),
        422,
    )
    assert list(body["errors"]) == ["depends_on.1"]
    for query in (
        f"runs?task={TOO_BIG}",
        f"tasks?creator={-1}",
        f"runs/1/log?offset={2**63}",
        f"runs/1/events?after={TOO_BIG}",
    ):
        assert_problem(client.get(f"/api/v1/{query}", headers=member.headers), 422)
    assert (count(app, ProjectMember), count(app, Task)) == before


def test_nul_characters_are_refused_where_they_are(client, member, project, admin, app):
    before = count(app, Task)
    body = assert_problem(
        client.post(
            "/api/v1/tasks",
            json={
                "project": "demo",
                "title": "a\x00b",
                "prompt": "fine",
                "config": {"env": {"K\x00": "v", "ok": ["x", "y\x00"]}},
            },
            headers=member.headers,
        ),
        422,
        "validation_failed",
    )
    assert body["errors"] == {
        "title": ["must not contain NUL (U+0000) characters"],
        "config.env.K\\u0000": ["must not contain NUL (U+0000) characters"],
        "config.env.ok.1": ["must not contain NUL (U+0000) characters"],
    }
    assert count(app, Task) == before
    body = assert_problem(client.get("/api/v1/audit-logs?action=a%00", headers=admin.headers), 422)
    assert list(body["errors"]) == ["action"]
    assert_problem(client.get("/api/v1/projects/de%00mo", headers=member.headers), 404)
    # the same body without the NUL is taken
    ok = client.post(
        "/api/v1/tasks",
        json={"project": "demo", "title": "ab", "prompt": "fine", "config": {"env": {"K": "v"}}},
        headers=member.headers,
    )
    assert ok.status_code == 201, ok.get_json()


def test_an_executors_log_may_hold_nul_characters(client, member, project):
    """Log text is stored as bytes, as an agent's own output is: nothing to refuse."""
    t = create(client, member, prompt="elsewhere", target="external")
    run = client.post(
        f"/api/v1/tasks/{t['id']}/claim", json={"executor": "e"}, headers=member.headers
    ).get_json()
    resp = client.post(
        f"/api/v1/runs/{run['id']}/log",
        json={"executor": "e", "offset": 0, "text": "a\x00b\n"},
        headers=member.headers,
    )
    assert resp.get_json() == {"size": 4, "stored": 4}
    assert log_text(client, member, run["id"])[0] == "a\x00b\n"


def test_nested_validation_errors_are_flat_field_paths(client, member, project):
    body = assert_problem(
        client.post(
            "/api/v1/tasks",
            json={"project": "demo", "title": "t", "prompt": "p", "loop": {}, "depends_on": ["x"]},
            headers=member.headers,
        ),
        422,
    )
    assert body["errors"] == {
        "loop.done_marker": ["Missing data for required field."],
        "loop.max_iterations": ["Missing data for required field."],
        "depends_on.0": ["Not a valid integer."],
    }
    assert body["detail"] == (
        "The request has invalid fields: depends_on.0, loop.done_marker, loop.max_iterations"
    )
