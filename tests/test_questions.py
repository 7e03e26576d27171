"""Questions: an agent on the real worker pool asks with `switchboard ask` (the command the
worker puts in its home, called from inside the sandbox), waits in `waiting`, and goes on with
the answer a person gives through the API; the rules around answers; expiry and cancellation."""

from __future__ import annotations

import pytest
from helpers import account, assert_problem, wait_for
from servers import WorkerPool
from test_execution import create, log_text, wait_status
from test_terminals import add_member


@pytest.fixture
def asking(app, client, live):
    """A worker pool whose agents reach the live server (SWITCHBOARD_URL)."""
    pool = WorkerPool(app, SWITCHBOARD_PUBLIC_URL=live.url)
    yield pool
    pool.stop()
    print("---- worker output ----\n" + pool.output())


def pending(client, acct, task_id=None):
    got = client.get("/api/v1/questions?status=pending", headers=acct.headers).get_json()["data"]
    return [q for q in got if task_id is None or q["task_id"] == task_id]


def test_an_agent_asks_waits_and_goes_on_with_the_answer(
    app, client, member, project, live, asking
):
    viewer = account(app, client, "vera")
    add_member(client, member, viewer, "viewer")
    task = create(
        client,
        member,
        prompt='answer=$(switchboard ask "Proceed?" --choice yes --choice no); echo "got $answer"',
    )
    waiting = wait_status(client, member, task["id"], "waiting", timeout=20)
    assert waiting["runs"][0]["status"] == "waiting"
    (question,) = wait_for(lambda: pending(client, member, task["id"]))
    assert question["kind"] == "choice" and question["options"] == ["yes", "no"]
    assert question["prompt"] == "Proceed?" and question["project"] == "demo"
    url = f"/api/v1/questions/{question['id']}/answer"

    assert_problem(client.post(url, json={"answer": "yes"}, headers=viewer.headers), 403)
    # a member of another project does not learn it exists
    outsider = account(app, client, "olga")
    assert_problem(client.post(url, json={"answer": "yes"}, headers=outsider.headers), 404)
    assert client.get("/api/v1/questions", headers=outsider.headers).get_json()["data"] == []
    assert_problem(client.post(url, json={"answer": "maybe"}, headers=member.headers), 422)
    answered = client.post(url, json={"answer": "yes"}, headers=member.headers)
    assert answered.status_code == 200, answered.get_json()
    assert answered.get_json()["answered_by"] == member.username
    again = client.post(url, json={"answer": "no"}, headers=member.headers)
    assert_problem(again, 409)
    assert again.get_json()["answered_by"] == member.username

    done = wait_status(client, member, task["id"], ("completed", "failed"), timeout=20)
    assert done["status"] == "completed", log_text(client, member, done["latest_run_id"])
    assert log_text(client, member, done["latest_run_id"])[0] == "got yes\n"


def test_a_question_expires_with_exit_code_2_and_its_default(client, member, project, live, asking):
    task = create(
        client,
        member,
        prompt='switchboard ask "Deploy?" --timeout 1 --default no; echo "exit $?"',
    )
    done = wait_status(client, member, task["id"], ("completed", "failed"), timeout=30)
    assert log_text(client, member, done["latest_run_id"])[0] == "no\nexit 2\n"
    (question,) = client.get(
        f"/api/v1/questions?run={done['latest_run_id']}", headers=member.headers
    ).get_json()["data"]
    assert question["status"] == "expired" and question["answer"] == "no"
    late = client.post(
        f"/api/v1/questions/{question['id']}/answer", json={"answer": "yes"}, headers=member.headers
    )
    assert_problem(late, 409)


def test_stopping_the_run_cancels_its_question(client, member, project, live, asking):
    task = create(client, member, prompt='switchboard ask "Wait for me?"; echo "exit $?"')
    wait_status(client, member, task["id"], "waiting", timeout=20)
    (question,) = wait_for(lambda: pending(client, member, task["id"]))
    run_id = question["run_id"]
    assert client.post(f"/api/v1/runs/{run_id}/stop", headers=member.headers).status_code == 202
    wait_status(client, member, task["id"], "cancelled", timeout=10)
    got = client.get(f"/api/v1/questions/{question['id']}", headers=member.headers).get_json()
    assert got["status"] == "cancelled"
    resp = client.post(
        f"/api/v1/questions/{question['id']}/answer", json={"answer": "yes"}, headers=member.headers
    )
    assert_problem(resp, 409)


def test_asking_needs_a_running_run_and_valid_options(client, member, project):
    task = create(client, member, prompt="true")
    run_id = task["latest_run_id"]
    resp = client.post(
        f"/api/v1/runs/{run_id}/questions", json={"prompt": "ok?"}, headers=member.headers
    )
    assert_problem(resp, 409)  # queued: not running yet
    assert "has not started yet" in resp.get_json()["detail"]


def test_claude_is_told_how_to_ask_as_its_project_says(app, client, member, project, worker):
    """The project's agent instructions (by default: how to use `switchboard ask`) are appended
    to Claude Code's system prompt; a project may say its own, or nothing."""
    from pathlib import Path

    from app.agents.registry import DEFAULT_INSTRUCTIONS

    root = Path(app.config["SWITCHBOARD_WORKSPACE_ROOT"])

    def args_of(task_id):
        return (root / "scratch" / "demo" / f"task-{task_id}" / ".fake-claude-args").read_text()

    task = create(client, member, agent="claude", prompt="fix it")
    wait_status(client, member, task["id"], "completed", timeout=20)
    assert f"--append-system-prompt\n{DEFAULT_INSTRUCTIONS}\n" in args_of(task["id"])
    assert "switchboard ask" in DEFAULT_INSTRUCTIONS

    resp = client.patch(
        "/api/v1/projects/demo",
        json={"agent_instructions": "Ask before deleting anything."},
        headers=member.headers,
    )
    assert resp.status_code == 200 and resp.get_json()["agent_instructions"].startswith("Ask")
    task = create(client, member, agent="claude", prompt="fix it")
    wait_status(client, member, task["id"], "completed", timeout=20)
    assert "--append-system-prompt\nAsk before deleting anything.\n" in args_of(task["id"])

    client.patch("/api/v1/projects/demo", json={"agent_instructions": ""}, headers=member.headers)
    task = create(client, member, agent="claude", prompt="fix it")
    wait_status(client, member, task["id"], "completed", timeout=20)
    assert "--append-system-prompt" not in args_of(task["id"])
