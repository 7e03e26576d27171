"""Workspaces (git worktrees per run), loop mode, and reading logs byte by byte."""

from pathlib import Path

from helpers import assert_problem, bare_repo, git
from test_execution import create, log_text, task, wait_status


def test_two_runs_work_on_two_branches(app, client, member, worker, tmp_path):
    bare = bare_repo(tmp_path)
    client.post(
        "/api/v1/projects",
        headers=member.headers,
        json={
            "key": "repo",
            "name": "Repo",
            "repo_url": str(bare),
            "default_agent": "shell",
            "review": "none",
        },
    )
    script = (
        'git rev-parse --abbrev-ref HEAD; echo "attempt $SWITCHBOARD_ATTEMPT" >> '
        'README.md; git -c user.name=a -c user.email=a@x commit -qam "change"; '
        '[ "$SWITCHBOARD_ATTEMPT" = 2 ]'
    )
    t = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "repo", "title": "edit", "prompt": script},
    ).get_json()
    wait_status(client, member, t["id"], "failed")
    client.post(f"/api/v1/tasks/{t['id']}/retry", headers=member.headers)
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    assert done["status"] == "completed"
    first, second = done["runs"]
    assert first["branch"] == f"switchboard/{t['id']}-1"
    assert second["branch"] == f"switchboard/{t['id']}-2"
    assert log_text(client, member, first["id"])[0] == first["branch"] + "\n"
    assert first["commit_sha"] != second["commit_sha"] and len(second["commit_sha"]) == 40, (
        client.get(f"/api/v1/runs/{first['id']}", headers=member.headers).get_json()["diff_stat"]
    )
    assert "README.md | 1 +" in second["diff_stat"]
    # each branch holds only its own run's change
    root = Path(app.config["SWITCHBOARD_WORKSPACE_ROOT"])
    cache = next(root.glob("repos/repo-*.git"))
    shown = git("show", f"{second['commit_sha']}:README.md", cwd=cache)
    assert shown == "hello\nattempt 2"
    assert "attempt 1" not in shown


def test_project_workdir_is_used(client, member, worker, tmp_path):
    client.post(
        "/api/v1/projects",
        headers=member.headers,
        json={"key": "wd", "name": "WD", "workdir": str(tmp_path), "default_agent": "shell"},
    )
    t = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "wd", "title": "pwd", "prompt": "pwd; touch made-here"},
    ).get_json()
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    assert log_text(client, member, done["runs"][0]["id"])[0] == f"{tmp_path}\n"
    assert (tmp_path / "made-here").exists()


def test_loop_until_marker(client, member, project, worker):
    script = (
        "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; "
        "echo iteration $n; [ $n -ge 3 ] && touch DONE; true"
    )
    t = create(client, member, prompt=script, loop={"max_iterations": 10, "done_marker": "DONE"})
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    assert done["status"] == "completed"
    run = done["runs"][0]
    assert log_text(client, member, run["id"])[0] == "iteration 1\niteration 2\niteration 3\n"
    events = client.get(f"/api/v1/runs/{run['id']}/events", headers=member.headers).get_json()[
        "data"
    ]
    assert [e["type"] for e in events] == ["iteration"] * 3 + ["loop_done"]
    assert [e["data"].get("n") for e in events[:3]] == [1, 2, 3]


def test_loop_bound(client, member, project, worker):
    t = create(
        client, member, prompt="echo again", loop={"max_iterations": 2, "done_marker": "NEVER"}
    )
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    events = client.get(
        f"/api/v1/runs/{done['runs'][0]['id']}/events", headers=member.headers
    ).get_json()["data"]
    assert [e["type"] for e in events] == ["iteration", "iteration", "loop_exhausted"]


def test_log_pages_never_drop_bytes(client, member, project, worker):
    # 3-byte UTF-8 characters and invalid bytes, read in pages that cut through characters
    t = create(client, member, prompt="printf 'a€b\\xff\\xfe€€c\\n'; seq 1 2000")
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    run = done["runs"][0]
    whole = client.get(
        f"/api/v1/runs/{run['id']}/log?limit=1000000", headers=member.headers
    ).get_json()
    assert whole["text"].startswith("a€b\ufffd\ufffd€€c\n1\n2\n")
    assert whole["complete"] and whole["next_offset"] == whole["size"] == run["log_size"]
    head = len(whole["text"][:40].encode())  # the tricky bytes are at the start
    for limit in (1, 2, 5, 7):
        text, offset = "", 0
        while offset < head:
            page = client.get(
                f"/api/v1/runs/{run['id']}/log?offset={offset}&limit={limit}",
                headers=member.headers,
            ).get_json()
            assert page["next_offset"] > offset
            text += page["text"]
            offset = page["next_offset"]
        assert whole["text"].startswith(text) and len(text) >= 30, (limit, text)
    assert_problem(
        client.get(f"/api/v1/runs/{run['id']}/log?offset=-1", headers=member.headers), 422
    )
    beyond = client.get(f"/api/v1/runs/{run['id']}/log?offset=999999", headers=member.headers)
    assert beyond.get_json()["text"] == "" and beyond.get_json()["complete"] is True
    assert task(client, member, t["id"])["status"] == "completed"
