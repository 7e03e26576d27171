"""Review before push, with real git: an agent edits a repo project on the real worker pool;
its change is committed and captured when the run ends, the task waits in `review`, and a
person approves (the branch is pushed to a bare remote from the captured bundle) or turns it
down (the task fails, or another attempt starts with the comment). The pull request is opened
against a fake GitHub API on loopback: the one edge mocked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from helpers import account, assert_problem, bare_repo, git, wait_for
from test_execution import create, wait_status
from test_terminals import add_member

EDIT = "echo 'new file' > notes.txt; echo 'more' >> README.md; printf '\\x00\\x01' > blob.bin"


@pytest.fixture
def repo(client, member, tmp_path):
    bare = bare_repo(tmp_path)
    resp = client.post(
        "/api/v1/projects",
        headers=member.headers,
        json={"key": "demo", "name": "Demo", "repo_url": str(bare), "default_agent": "shell"},
    )
    assert resp.status_code == 201, resp.get_json()
    assert resp.get_json()["review"] == "required"  # the default with a repository
    return bare


def clone_of(app, bare):
    """The worker's cached clone of `bare` (other tests' clones of other `demo`s lie beside)."""
    import hashlib
    from pathlib import Path

    key = hashlib.sha256(str(bare).encode()).hexdigest()[:12]
    return Path(app.config["SWITCHBOARD_WORKSPACE_ROOT"]) / "repos" / f"demo-{key}.git"


def in_review(client, acct, prompt=EDIT):
    task = create(client, acct, prompt=prompt, title="add notes")
    done = wait_status(client, acct, task["id"], ("review", "completed", "failed"), timeout=30)
    assert done["status"] == "review", done
    return done, done["runs"][0]


def test_a_change_waits_in_review_then_is_pushed_when_approved(app, client, member, repo, worker):
    task, run = in_review(client, member)
    assert run["status"] == "succeeded" and run["review"] == "pending"
    files = client.get(f"/api/v1/runs/{run['id']}/files", headers=member.headers).get_json()
    by_path = {f["path"]: f for f in files["data"]}
    assert by_path["notes.txt"] == {
        "path": "notes.txt",
        "status": "added",
        "additions": 1,
        "deletions": 0,
        "binary": False,
    }
    assert by_path["README.md"]["status"] == "modified"
    assert by_path["README.md"]["additions"] == 1
    assert by_path["blob.bin"]["binary"] is True
    diff = client.get(f"/api/v1/runs/{run['id']}/diff", headers=member.headers).get_json()
    assert "+more" in diff["diff"] and "+new file" in diff["diff"]
    assert diff["truncated"] is False and diff["head_commit"] == run["commit_sha"]
    one = client.get(
        f"/api/v1/runs/{run['id']}/diff?path=notes.txt", headers=member.headers
    ).get_json()
    assert "+new file" in one["diff"] and "README.md" not in one["diff"]
    # the agent left its edits uncommitted: the worker committed them, as the agent
    author = git("log", "-1", "--format=%an|%cn|%s", run["commit_sha"], cwd=clone_of(app, repo))
    assert author == "shell (Switchboard)|Switchboard|add notes"

    resp = client.post(f"/api/v1/runs/{run['id']}/approve", json={}, headers=member.headers)
    assert resp.status_code == 200, resp.get_json()
    done = wait_status(client, member, task["id"], ("completed", "failed"), timeout=30)
    assert done["status"] == "completed"
    pushed = git("ls-remote", str(repo), f"refs/heads/{run['branch']}")
    assert pushed.split()[0] == run["commit_sha"]
    again = client.post(f"/api/v1/runs/{run['id']}/approve", json={}, headers=member.headers)
    assert_problem(again, 409)


def test_reject_with_retry_starts_an_attempt_holding_the_comment(client, member, repo, worker):
    # a shell agent's prompt is a script: the feedback appended after `exit` is not run
    task, run = in_review(client, member, prompt="echo change >> README.md\nexit 0\n")
    resp = client.post(
        f"/api/v1/runs/{run['id']}/reject",
        json={"comment": "use a changelog entry instead", "retry": True},
        headers=member.headers,
    )
    assert resp.status_code == 200 and resp.get_json()["review"] == "rejected"
    second = wait_for(
        lambda: (
            (t := client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).get_json())[
                "attempts"
            ]
            == 2
            and t
        )
    )
    assert "use a changelog entry instead" in second["prompt"]
    done = wait_status(client, member, task["id"], ("review",), timeout=30)
    assert done["runs"][-1]["branch"].endswith("-2")
    # without retry: the task fails with the comment
    resp = client.post(
        f"/api/v1/runs/{done['runs'][-1]['id']}/reject",
        json={"comment": "no"},
        headers=member.headers,
    )
    assert resp.status_code == 200
    failed = client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).get_json()
    assert failed["status"] == "failed" and failed["status_reason"] == "rejected: no"


def test_attack_approvals_need_the_right_and_happen_once(app, client, member, repo, worker):
    dev = account(app, client, "dan")
    add_member(client, member, dev, "developer")
    task, run = in_review(client, member)
    url = f"/api/v1/runs/{run['id']}/approve"
    assert_problem(client.post(url, json={}, headers=dev.headers), 403)  # maintainers only
    outsider = account(app, client, "olga")  # another project's member: nothing to see here
    assert_problem(client.post(url, json={}, headers=outsider.headers), 404)
    assert_problem(client.get(f"/api/v1/runs/{run['id']}/diff", headers=outsider.headers), 404)
    pat = client.post(
        "/api/v1/me/tokens",
        json={"label": "no push", "abilities": ["projects:read", "runs:control"]},
        headers=member.headers,
    ).get_json()["token"]
    assert_problem(client.post(url, json={}, headers={"Authorization": f"Bearer {pat}"}), 403)
    # two approvals at once: one push
    answers: list[int] = []

    def approve() -> None:
        with app.test_client() as other:
            answers.append(other.post(url, json={}, headers=member.headers).status_code)

    threads = [threading.Thread(target=approve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == [200, 409, 409, 409], answers
    wait_status(client, member, task["id"], "completed", timeout=30)


def test_a_failed_push_stays_in_review_and_can_be_approved_again(app, client, member, repo, worker):
    task, run = in_review(client, member)
    moved = repo.with_name("moved.git")
    repo.rename(moved)  # the remote is away
    client.post(f"/api/v1/runs/{run['id']}/approve", json={}, headers=member.headers)
    back = wait_for(
        lambda: (
            (r := client.get(f"/api/v1/runs/{run['id']}", headers=member.headers).get_json())[
                "review"
            ]
            == "pending"
            and r
        ),
        timeout=30,
    )
    assert back["review_error"]
    assert (
        client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).get_json()["status"]
        == "review"
    )
    moved.rename(repo)
    client.post(f"/api/v1/runs/{run['id']}/approve", json={}, headers=member.headers)
    wait_status(client, member, task["id"], "completed", timeout=30)


def test_a_run_without_a_repository_has_no_diff(client, member, project, worker):
    task = create(client, member, prompt="echo hi")
    done = wait_status(client, member, task["id"], "completed")
    resp = client.get(f"/api/v1/runs/{done['latest_run_id']}/diff", headers=member.headers)
    assert_problem(resp, 404)
    assert "no repository" in resp.get_json()["detail"]


class FakeGitHub(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeGitHub.received.append((self.path, dict(self.headers), body))
        answer = json.dumps({"html_url": "https://github.com/acme/widgets/pull/7"}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_a_pull_request_is_asked_of_github_as_github_expects(app):
    from app.reviews import github

    server = HTTPServer(("127.0.0.1", 0), FakeGitHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert github.repository("https://github.com/acme/widgets.git") == ("acme", "widgets")
        assert github.repository("git@github.com:acme/widgets.git") == ("acme", "widgets")
        assert github.repository("https://gitlab.com/acme/widgets.git") is None
        url = github.open_pull_request(
            f"http://127.0.0.1:{server.server_port}",
            "ghp_token",
            "acme",
            "widgets",
            head="switchboard/12-1",
            base="main",
            title="add notes",
            body="the prompt",
            draft=True,
        )
    finally:
        server.shutdown()
    assert url == "https://github.com/acme/widgets/pull/7"
    (path, headers, body) = FakeGitHub.received[-1]
    assert path == "/repos/acme/widgets/pulls"
    assert headers["Authorization"] == "Bearer ghp_token"
    assert headers["Accept"] == "application/vnd.github+json"
    assert body == {
        "title": "add notes",
        "head": "switchboard/12-1",
        "base": "main",
        "body": "the prompt",
        "draft": True,
    }


def test_an_oversized_diff_is_cut_and_flagged(client, member, repo, worker):
    _task, run = in_review(client, member, prompt="seq 1 400000 > big.txt")  # ~2.7 MB of diff
    diff = client.get(f"/api/v1/runs/{run['id']}/diff", headers=member.headers).get_json()
    assert diff["truncated"] is True
    assert len(diff["diff"].encode()) <= 1024 * 1024 + 1
    files = client.get(f"/api/v1/runs/{run['id']}/files", headers=member.headers).get_json()
    assert files["data"] == [
        {"path": "big.txt", "status": "added", "additions": 400000, "deletions": 0,
         "binary": False}
    ]  # fmt: skip
