"""Tasks: creation rules, idempotency, dependencies, queue positions, concurrency, cancel, retry,
delete, and the external executors' claim model."""

import random

import sqlalchemy as sa
from helpers import assert_problem, at_once, count
from test_execution import create, log_text, task, wait_status

from app.database import db
from app.runs.models import Run
from app.tasks.models import Task


def test_create_defaults_and_validation(client, member, project):
    t = create(client, member, prompt="echo hi", target="external")
    assert t["agent"] == "shell" and t["priority"] == "normal" and t["max_attempts"] == 1
    assert t["status"] == "queued" and t["queue_position"] == 1 and t["depends_on"] == []
    bad = [
        ({"agent": "nope"}, "agent"),
        ({"project": "nope"}, "project"),
        ({"depends_on": [99999]}, "depends_on"),
        ({"target": "mars"}, "target"),
        ({"priority": "asap"}, "priority"),
        ({"loop": {"max_iterations": 0}}, "loop.max_iterations"),
    ]
    for fields, field in bad:
        body = {"project": "demo", "title": "t", "prompt": "x", **fields}
        problem = assert_problem(
            client.post("/api/v1/tasks", json=body, headers=member.headers), 422
        )
        assert field in problem["errors"], (field, problem)


def test_idempotency_key_creates_one_task(client, member, project, app):
    body = {"project": "demo", "title": "once", "prompt": "echo x", "target": "external"}
    headers = {**member.headers, "Idempotency-Key": "abc-123"}
    first = client.post("/api/v1/tasks", json=body, headers=headers)
    second = client.post("/api/v1/tasks", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.get_json()["id"] == second.get_json()["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    assert count(app, Task) == 1 and count(app, Run) == 1
    other = client.post(
        "/api/v1/tasks", json=body, headers={**member.headers, "Idempotency-Key": "other"}
    )
    assert other.get_json()["id"] != first.get_json()["id"]


def test_viewer_cannot_create(client, app, member, project):
    from helpers import account

    viewer = account(app, client, "vic")
    client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": viewer.username, "role": "viewer"},
    )
    assert_problem(
        client.post(
            "/api/v1/tasks",
            json={"project": "demo", "title": "t", "prompt": "x"},
            headers=viewer.headers,
        ),
        403,
    )


def test_chain_runs_in_order(client, member, project, worker):
    a = create(client, member, title="A", prompt="sleep 0.3; echo A")
    b = create(client, member, title="B", prompt="echo B", depends_on=[a["id"]])
    c = create(client, member, title="C", prompt="echo C", depends_on=[b["id"]])
    assert b["status"] == c["status"] == "blocked" and b["queue_position"] is None
    assert c["depends_on"] == [b["id"]]
    done = wait_status(client, member, c["id"], ("completed", "failed", "cancelled"))
    assert done["status"] == "completed"
    runs = [task(client, member, t["id"])["runs"][0] for t in (a, b, c)]
    assert runs[0]["finished_at"] <= runs[1]["started_at"]
    assert runs[1]["finished_at"] <= runs[2]["started_at"]
    assert log_text(client, member, runs[2]["id"])[0] == "C\n"


def test_failing_dependency_cancels_the_chain(client, member, project, worker):
    a = create(client, member, title="A", prompt="exit 1")
    b = create(client, member, title="B", prompt="echo B", depends_on=[a["id"]])
    c = create(client, member, title="C", prompt="echo C", depends_on=[b["id"]])
    wait_status(client, member, c["id"], "cancelled")
    assert task(client, member, a["id"])["status"] == "failed"
    b_now = task(client, member, b["id"])
    assert (
        b_now["status"] == "cancelled" and b_now["status_reason"] == f"dependency #{a['id']} failed"
    )
    assert b_now["runs"] == []
    # a task created on a failed dependency is cancelled at once
    d = create(client, member, title="D", prompt="echo D", depends_on=[a["id"]])
    assert d["status"] == "cancelled"


def test_a_dependent_created_while_its_dependency_ends_is_not_left_blocked(
    app, client, member, project, monkeypatch
):
    """A fails at the moment B (depending on A) is created: A's end has looked for dependents and
    not committed yet, while B reads A's status. B must wait for A's end and be cancelled (without
    the lock B was created `blocked` and nothing would ever release it)."""
    import threading

    from app.tasks import lifecycle

    a = create(client, member, title="A", prompt="x", target="external")
    run = client.post(
        f"/api/v1/tasks/{a['id']}/claim", headers=member.headers, json={"executor": "e1"}
    ).get_json()
    checked, go = threading.Event(), threading.Event()
    original = lifecycle.cancel_dependents

    def paused(task, reason):
        original(task, reason)
        checked.set()  # A's end found no dependents; it commits when we say so
        go.wait(10)

    monkeypatch.setattr(lifecycle, "cancel_dependents", paused)
    answers = {}

    def call(name, path, body):
        with app.test_client() as other:
            answers[name] = other.post(path, headers=member.headers, json=body)

    ending = threading.Thread(
        target=call,
        args=(
            "end",
            f"/api/v1/runs/{run['id']}/complete",
            {"executor": "e1", "status": "failed", "exit_code": 1},
        ),
    )
    ending.start()
    assert checked.wait(10)
    creating = threading.Thread(
        target=call,
        args=(
            "b",
            "/api/v1/tasks",
            {"project": "demo", "title": "B", "prompt": "x", "depends_on": [a["id"]]},
        ),
    )
    creating.start()
    creating.join(0.5)  # B waits for A's end to commit
    go.set()
    ending.join(10)
    creating.join(10)
    assert answers["end"].status_code == 200, answers["end"].get_json()
    b = answers["b"].get_json()
    assert answers["b"].status_code == 201, b
    assert (b["status"], b["status_reason"]) == ("cancelled", f"dependency #{a['id']} failed")


def test_dependency_cycle_is_422(client, member, project):
    a = create(client, member, title="A", prompt="x", target="external")
    b = create(client, member, title="B", prompt="x", depends_on=[a["id"]], target="external")
    c = create(client, member, title="C", prompt="x", depends_on=[b["id"]], target="external")
    body = assert_problem(
        client.patch(
            f"/api/v1/tasks/{a['id']}", json={"depends_on": [c["id"]]}, headers=member.headers
        ),
        422,
    )
    assert "depends_on" in body["errors"]
    assert_problem(
        client.patch(
            f"/api/v1/tasks/{a['id']}", json={"depends_on": [a["id"]]}, headers=member.headers
        ),
        422,
    )
    assert task(client, member, a["id"])["depends_on"] == []


def test_patch_priority_and_dependencies(client, member, project):
    a = create(client, member, title="A", prompt="x", target="external")
    b = create(client, member, title="B", prompt="x", target="external")
    assert task(client, member, b["id"])["queue_position"] == 2
    upd = client.patch(
        f"/api/v1/tasks/{b['id']}", json={"priority": "urgent"}, headers=member.headers
    ).get_json()
    assert upd["priority"] == "urgent" and upd["queue_position"] == 1
    blocked = client.patch(
        f"/api/v1/tasks/{b['id']}", json={"depends_on": [a["id"]]}, headers=member.headers
    ).get_json()
    assert blocked["status"] == "blocked" and blocked["depends_on"] == [a["id"]]


def test_queue_positions_of_1000_tasks(client, member, project, app):
    from app.auth.abilities import abilities_for_role
    from app.auth.service import Principal
    from app.tasks import service
    from app.users.models import User

    rng = random.Random(7)
    with app.app_context():
        user = db.session.get(User, member.id)
        principal = Principal(user, abilities_for_role("member"), "session")
        for i in range(1000):
            service.create_task(
                principal,
                {
                    "project": "demo",
                    "title": f"t{i}",
                    "prompt": "x",
                    "target": "external",
                    "priority": rng.choice(["low", "normal", "high", "urgent"]),
                },
            )
        rows = db.session.execute(sa.select(Task.id, Task.priority_rank)).all()
    expected = {
        tid: pos
        for pos, (tid, _r) in enumerate(
            sorted(rows, key=lambda r: (-r.priority_rank, r.id)), start=1
        )
    }
    seen, url = {}, "/api/v1/tasks?project=demo&limit=200"
    while url:
        page = client.get(url, headers=member.headers).get_json()
        seen.update({t["id"]: t["queue_position"] for t in page["data"]})
        nxt = page["meta"]["next_cursor"]
        url = f"/api/v1/tasks?project=demo&limit=200&cursor={nxt}" if nxt else None
    assert len(seen) == 1000 and seen == expected
    one = next(iter(expected))
    assert task(client, member, one)["queue_position"] == expected[one]


def test_a_listing_shows_dependencies_and_positions(client, member, project):
    a = create(client, member, title="A", prompt="x", target="external")
    b = create(client, member, title="B", prompt="x", target="external", priority="high")
    c = create(
        client, member, title="C", prompt="x", target="external", depends_on=[a["id"], b["id"]]
    )
    listed = {
        t["id"]: t
        for t in client.get("/api/v1/tasks?project=demo", headers=member.headers).get_json()["data"]
    }
    assert [
        (listed[t["id"]]["queue_position"], listed[t["id"]]["depends_on"]) for t in (a, b, c)
    ] == [
        (2, []),
        (1, []),
        (None, sorted([a["id"], b["id"]])),
    ]
    for t in (a, b, c):  # the same as each task's own page says
        one = task(client, member, t["id"])
        assert (one["queue_position"], one["depends_on"]) == (
            listed[t["id"]]["queue_position"],
            listed[t["id"]]["depends_on"],
        )


def test_concurrency_cap_holds_runs_back(client, member, project, worker, app):
    client.patch("/api/v1/projects/demo", json={"max_concurrent_runs": 1}, headers=member.headers)
    first = create(client, member, title="first", prompt="sleep 1.5")
    second = create(client, member, title="second", prompt="echo second")
    wait_status(client, member, first["id"], "running")
    now = task(client, member, second["id"])
    assert now["status"] == "queued" and now["queue_position"] == 1
    done = wait_status(client, member, second["id"], ("completed", "failed"))
    r1 = task(client, member, first["id"])["runs"][0]
    assert done["runs"][0]["started_at"] >= r1["finished_at"]


def test_cancel_retry_delete(client, member, project, app):
    t = create(client, member, prompt="x", target="external")
    assert_problem(client.post(f"/api/v1/tasks/{t['id']}/retry", headers=member.headers), 409)
    cancelled = client.post(f"/api/v1/tasks/{t['id']}/cancel", headers=member.headers)
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"
    assert_problem(client.post(f"/api/v1/tasks/{t['id']}/cancel", headers=member.headers), 409)
    retried = client.post(f"/api/v1/tasks/{t['id']}/retry", headers=member.headers)
    assert retried.status_code == 201 and retried.get_json()["attempt"] == 2
    again = task(client, member, t["id"])
    assert again["status"] == "queued" and [r["status"] for r in again["runs"]] == [
        "cancelled",
        "queued",
    ]
    claimed = client.post(
        f"/api/v1/tasks/{t['id']}/claim", json={"executor": "ext-1"}, headers=member.headers
    ).get_json()
    client.post(
        f"/api/v1/runs/{claimed['id']}/heartbeat",
        json={"executor": "ext-1"},
        headers=member.headers,
    )
    assert_problem(client.delete(f"/api/v1/tasks/{t['id']}", headers=member.headers), 409)
    assert_problem(client.delete(f"/api/v1/runs/{claimed['id']}", headers=member.headers), 409)
    client.post(
        f"/api/v1/runs/{claimed['id']}/complete",
        headers=member.headers,
        json={"executor": "ext-1", "status": "succeeded", "exit_code": 0},
    )
    assert client.delete(f"/api/v1/runs/{claimed['id']}", headers=member.headers).status_code == 204
    assert client.delete(f"/api/v1/tasks/{t['id']}", headers=member.headers).status_code == 204
    assert_problem(client.get(f"/api/v1/tasks/{t['id']}", headers=member.headers), 404)
    assert count(app, Run) == 0


def test_concurrent_requests_with_one_idempotency_key_make_one_task(member, project, app):
    body = {"project": "demo", "title": "once", "prompt": "x", "target": "external"}
    headers = {**member.headers, "Idempotency-Key": "deploy-42"}
    answers = at_once(app, 8, lambda c, _: c.post("/api/v1/tasks", json=body, headers=headers))
    assert [a.status_code for a in answers] == [201] * 8, [a.get_json() for a in answers]
    assert len({a.get_json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 7
    assert count(app, Task) == 1


def test_concurrent_retries_queue_one_attempt(client, member, project, app):
    t = create(client, member, prompt="x", target="external")
    client.post(f"/api/v1/tasks/{t['id']}/cancel", headers=member.headers)
    url = f"/api/v1/tasks/{t['id']}/retry"
    answers = at_once(app, 8, lambda c, _: c.post(url, headers=member.headers))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] + [409] * 7, [a.get_json() for a in answers]
    runs = task(client, member, t["id"])["runs"]
    assert [r["status"] for r in runs] == ["cancelled", "queued"]
    assert count(app, Run) == 2


def test_concurrent_dependency_changes_cannot_make_a_cycle(client, member, project, app):
    """A waits on B and B on A, asked for at the same moment: one is refused (each alone is
    fine; together they would wait for ever)."""
    root = create(client, member, prompt="x", target="external")  # keeps both blocked
    a, b = (
        create(client, member, prompt="x", target="external", depends_on=[root["id"]])
        for _ in range(2)
    )
    changes = [(a["id"], b["id"]), (b["id"], a["id"])] * 3

    def change(c, i):
        one, other = changes[i]
        return c.patch(f"/api/v1/tasks/{one}", json={"depends_on": [other]}, headers=member.headers)

    answers = at_once(app, len(changes), change)
    assert all(r.status_code in (200, 422) for r in answers), [r.get_json() for r in answers]
    deps = {t: set(task(client, member, t)["depends_on"]) for t in (a["id"], b["id"])}
    assert not (b["id"] in deps[a["id"]] and a["id"] in deps[b["id"]]), deps


def test_list_filters(client, member, project):
    create(client, member, title="a", prompt="x", target="external", priority="high")
    create(client, member, title="b", prompt="x", target="external", agent="claude")
    base = "/api/v1/tasks?project=demo"
    assert [
        t["title"]
        for t in client.get(f"{base}&priority=high", headers=member.headers).get_json()["data"]
    ] == ["a"]
    assert [
        t["title"]
        for t in client.get(f"{base}&agent=claude", headers=member.headers).get_json()["data"]
    ] == ["b"]
    assert (
        len(
            client.get(
                f"{base}&status=queued&creator={member.id}", headers=member.headers
            ).get_json()["data"]
        )
        == 2
    )
    runs = client.get("/api/v1/runs?project=demo&status=queued", headers=member.headers)
    assert len(runs.get_json()["data"]) == 2


def test_external_executor_claim_model(client, member, project):
    t = create(client, member, prompt="do it elsewhere", target="external")
    run = client.post(
        f"/api/v1/tasks/{t['id']}/claim", json={"executor": "laptop-1"}, headers=member.headers
    )
    assert run.status_code == 200
    run = run.get_json()
    assert run["status"] == "assigned" and run["executor"] == "laptop-1"
    assert run["lease_expires_at"]
    same = client.post(
        f"/api/v1/tasks/{t['id']}/claim", json={"executor": "laptop-1"}, headers=member.headers
    ).get_json()
    assert same["id"] == run["id"]
    assert_problem(
        client.post(
            f"/api/v1/tasks/{t['id']}/claim", json={"executor": "other"}, headers=member.headers
        ),
        409,
    )
    hb = client.post(
        f"/api/v1/runs/{run['id']}/heartbeat", json={"executor": "laptop-1"}, headers=member.headers
    ).get_json()
    assert hb["stop_requested"] is False
    assert task(client, member, t["id"])["status"] == "running"
    url = f"/api/v1/runs/{run['id']}/log"
    ok = client.post(
        url, json={"executor": "laptop-1", "offset": 0, "text": "hello\n"}, headers=member.headers
    ).get_json()
    assert ok == {"size": 6, "stored": 6}
    dup = client.post(
        url, json={"executor": "laptop-1", "offset": 0, "text": "hello\n"}, headers=member.headers
    ).get_json()
    assert dup == {"size": 6, "stored": 0}
    overlap = client.post(
        url,
        json={"executor": "laptop-1", "offset": 3, "text": "lo\nworld\n"},
        headers=member.headers,
    ).get_json()
    assert overlap == {"size": 12, "stored": 6}
    gap = assert_problem(
        client.post(
            url, json={"executor": "laptop-1", "offset": 99, "text": "x"}, headers=member.headers
        ),
        409,
    )
    assert gap["code"] == "log_gap" and gap["expected_offset"] == 12
    assert log_text(client, member, run["id"])[0] == "hello\nworld\n"
    client.post(f"/api/v1/runs/{run['id']}/stop", headers=member.headers)
    hb = client.post(
        f"/api/v1/runs/{run['id']}/heartbeat", json={"executor": "laptop-1"}, headers=member.headers
    ).get_json()
    assert hb["stop_requested"] is True
    done = client.post(
        f"/api/v1/runs/{run['id']}/complete",
        headers=member.headers,
        json={"executor": "laptop-1", "status": "cancelled", "exit_code": 143},
    )
    assert done.status_code == 200 and done.get_json()["status"] == "cancelled"
    assert task(client, member, t["id"])["status"] == "cancelled"
    assert_problem(
        client.post(
            f"/api/v1/runs/{run['id']}/complete",
            headers=member.headers,
            json={"executor": "laptop-1", "status": "succeeded"},
        ),
        409,
    )


def test_external_lease_expiry_loses_the_run(client, member, project, app):
    from datetime import timedelta

    from app.runs.sweep import sweep
    from app.timeutil import utcnow

    t = create(client, member, prompt="x", target="external", max_attempts=2)
    run = client.post(
        f"/api/v1/tasks/{t['id']}/claim", json={"executor": "e"}, headers=member.headers
    ).get_json()
    with app.app_context():
        db.session.get(Run, run["id"]).lease_expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
        assert sweep()["lost"] == 1
    again = task(client, member, t["id"])
    assert [r["status"] for r in again["runs"]] == ["lost", "queued"]
    assert again["status"] == "queued"
    assert_problem(
        client.post(
            f"/api/v1/runs/{run['id']}/heartbeat", json={"executor": "e"}, headers=member.headers
        ),
        409,
    )


def test_a_dispatched_run_whose_job_is_gone_is_queued_again(client, member, project, app):
    """Redis lost the job (a restart), or the job ran and found its run not queued yet because
    the database lost an uncommitted-to-disk assignment: the sweep enqueues the run again, and a
    duplicate job does nothing to a run that another job already took."""
    from datetime import timedelta

    from rq import Queue

    from app.queues import get_redis
    from app.runs.sweep import sweep
    from app.tasks.lifecycle import job_id
    from app.timeutil import utcnow
    from workers.executor import execute

    t = create(client, member, prompt="true")
    run_id = t["latest_run_id"]
    with app.app_context():
        queue = Queue("runs-default", connection=get_redis())
        assert queue.job_ids == [job_id(run_id)]
        get_redis().flushdb()  # Redis restarted without its data
        assert sweep()["requeued"] == 0  # a young dispatch may just be waiting in a busy queue
        db.session.get(Run, run_id).dispatched_at = utcnow() - timedelta(minutes=5)
        db.session.commit()
        assert sweep()["requeued"] == 1
        assert queue.job_ids == [job_id(run_id)]
        assert sweep()["requeued"] == 0  # its job is queued now
        assert execute(run_id) in ("succeeded", "failed")
        db.session.remove()
        assert execute(run_id) == "skipped"  # the duplicate: the run is no longer queued
        db.session.remove()
    assert task(client, member, t["id"])["runs"][0]["status"] == "succeeded"
