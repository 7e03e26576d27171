"""Agents run with only what they need: where they may work, their environment, project secrets
(encrypted, masked in what the agent prints), run tokens, the sandbox, workspace retention.

The attacker of these tests is a member with a project of their own, or a prompt from a stranger's
GitHub issue that the agent obeys."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import account, assert_problem, bare_repo, git, wait_for
from servers import WorkerPool
from test_execution import create, log_text, wait_status

from app.config import ConfigError, Settings
from app.runs.redaction import Redactor
from workers import sandbox

SERVER_SECRETS = ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "SWITCHBOARD_ADMIN_PASSWORD")


def _project(client, acct, key="own", **fields):
    resp = client.post(
        "/api/v1/projects",
        headers=acct.headers,
        json={"key": key, "name": key, "default_agent": "shell", **fields},
    )
    return resp


# -- where agents may work ---------------------------------------------------------------------


def test_attack_workdir_outside_the_roots_is_refused(app, client, member, tmp_path):
    instance = app.config["SWITCHBOARD_INSTANCE_PATH"]
    link = tmp_path / "innocent"
    link.symlink_to("/etc")
    for workdir in ("/", "/etc", "/root", instance, f"{instance}/..", str(link), "relative/dir"):
        resp = _project(client, member, workdir=workdir)
        assert_problem(resp, 422)
        assert "workdir" in resp.get_json()["errors"], workdir
    workspaces = app.config["SWITCHBOARD_WORKSPACE_ROOT"]
    assert_problem(_project(client, member, workdir=workspaces), 422)
    # a change to an existing project is held to the same rule
    assert _project(client, member, workdir=str(tmp_path)).status_code == 201
    resp = client.patch("/api/v1/projects/own", headers=member.headers, json={"workdir": "/etc"})
    assert_problem(resp, 422)
    project = client.get("/api/v1/projects/own", headers=member.headers).get_json()
    assert project["workdir"] == str(tmp_path)
    assert (
        client.get("/api/v1/projects", headers=member.headers).get_json()["data"][0]["key"] == "own"
    )


def test_workdir_is_stored_resolved(client, member, tmp_path):
    (tmp_path / "a").mkdir()
    resp = _project(client, member, workdir=f"{tmp_path}/a/../a")
    assert resp.status_code == 201
    assert resp.get_json()["workdir"] == str(tmp_path / "a")


@pytest.mark.parametrize(
    "repo_url",
    [
        "--upload-pack=touch /tmp/pwned",
        "-uevil",
        "http://127.0.0.1:8000/x.git",  # plain http, and the server itself
        "https://127.0.0.1/x.git",
        "https://10.1.2.3/x.git",
        "ssh://[::1]/x.git",
        "git@169.254.169.254:meta/data.git",
        "ext::sh -c touch% /tmp/pwned",
        "https://github.com/a/b.git\n",
        "ftp://example.com/x.git",
    ],
)
def test_attack_repo_url_is_refused(client, member, repo_url):
    resp = _project(client, member, repo_url=repo_url)
    assert_problem(resp, 422)
    assert "repo_url" in resp.get_json()["errors"]
    assert client.get("/api/v1/projects", headers=member.headers).get_json()["data"] == []


def test_credentials_in_a_repo_url_point_to_project_secrets(client, member, admin):
    resp = _project(client, member, repo_url="https://bob:ghp_abc123@github.com/a/b.git")
    assert_problem(resp, 422)
    assert "GIT_TOKEN" in resp.get_json()["errors"]["repo_url"][0]
    # nothing of it in the audit log either
    audit = json.dumps(client.get("/api/v1/audit-logs", headers=admin.headers).get_json())
    assert "ghp_abc123" not in audit


def test_attack_local_repos_need_the_setting(app, client, member, tmp_path, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_ALLOW_LOCAL_REPOS", False)
    for url in ("/etc", "file:///etc", str(tmp_path)):
        resp = _project(client, member, repo_url=url)
        assert_problem(resp, 422)
        assert "SWITCHBOARD_ALLOW_LOCAL_REPOS" in resp.get_json()["errors"]["repo_url"][0]


def test_public_repo_urls_are_accepted(client, member):
    for i, url in enumerate(
        ("https://github.com/a/b.git", "ssh://git@github.com/a/b.git", "git@github.com:a/b.git")
    ):
        assert _project(client, member, key=f"p{i}", repo_url=url).status_code == 201


def test_attack_default_branch_as_an_option_is_refused(client, member):
    for branch in ("--output=/tmp/x", "a..b", "x y", "-b"):
        resp = _project(client, member, default_branch=branch)
        assert_problem(resp, 422)
        assert "default_branch" in resp.get_json()["errors"]


def test_a_stored_bad_repo_url_fails_the_run_before_git_sees_it(app, client, member, worker):
    assert _project(client, member, key="demo").status_code == 201
    with app.app_context():
        from app.database import db
        from app.projects.models import Project

        db.session.execute(sa.update(Project).values(repo_url="--upload-pack=touch /tmp/sb-pwned"))
        db.session.commit()
    t = create(client, member, prompt="true")
    done = wait_status(client, member, t["id"], "failed")
    assert "repo_url is refused" in done["runs"][0]["error_summary"]
    assert not Path("/tmp/sb-pwned").exists()


# -- a built environment -------------------------------------------------------------------------


@pytest.fixture
def exposed_worker(app, client):
    """A worker whose own environment holds everything an attacker wants."""
    pool = WorkerPool(
        app,
        processes=1,
        SWITCHBOARD_ADMIN_PASSWORD="admin-password-do-not-leak",
        ANTHROPIC_API_KEY="sk-ant-passed-on-purpose",
        UNRELATED_SERVER_VAR="server-only",
        SWITCHBOARD_AGENT_ENV_PASSTHROUGH="ANTHROPIC_API_KEY",
    )
    try:
        with app.app_context():
            from rq import Worker

            from app.queues import get_redis

            wait_for(lambda: Worker.count(connection=get_redis()) >= 2, timeout=30)
        yield pool
    finally:
        pool.stop()
    print("---- worker output ----\n" + pool.output())


def test_attack_agent_env_holds_no_server_secret(app, client, member, project, exposed_worker):
    t = create(client, member, prompt="env | sort")
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    assert done["status"] == "completed", done
    text, _ = log_text(client, member, done["runs"][0]["id"])
    env = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    for name in (*SERVER_SECRETS, "SWITCHBOARD_SECRETS_KEY", "UNRELATED_SERVER_VAR"):
        assert name not in env, name
    for value in (
        app.config["SECRET_KEY"],
        app.config["SWITCHBOARD_SECRETS_KEY"],
        app.config["SWITCHBOARD_REDIS_URL"],
        "admin-password-do-not-leak",
        "server-only",
    ):
        assert value not in text
    assert env["ANTHROPIC_API_KEY"] == "sk-ant-passed-on-purpose"  # passed through, by name
    root = app.config["SWITCHBOARD_WORKSPACE_ROOT"]
    assert env["HOME"].startswith(f"{root}/runs/demo/") and env["HOME"].endswith("/home")
    assert env["TMPDIR"].startswith(f"{root}/runs/demo/") and env["TMPDIR"].endswith("/tmp")
    assert env["SWITCHBOARD_RUN_ID"] == str(done["runs"][0]["id"])
    assert env["SWITCHBOARD_URL"] == app.config["SWITCHBOARD_PUBLIC_URL"]
    # masked in the log like a secret (its prefix and run id are not secret)
    assert env["SWITCHBOARD_RUN_TOKEN"] == f"sbr_{done['runs'][0]['id']}.***"


def test_passthrough_never_passes_the_servers_own(monkeypatch, tmp_path):
    for name in ("SECRET_KEY", "DATABASE_URL", "SWITCHBOARD_SECRETS_KEY"):
        settings = Settings(
            ENV="testing", INSTANCE_PATH=str(tmp_path), AGENT_ENV_PASSTHROUGH=f"HOME_X,{name}"
        )
        with pytest.raises(ConfigError, match=name):
            settings.resolve()


# -- the sandbox ---------------------------------------------------------------------------------

needs_bwrap = pytest.mark.skipif(not sandbox.bwrap_works(), reason="bubblewrap missing")


@needs_bwrap
def test_attack_sandbox_hides_the_servers_files(app, client, member, project, worker):
    instance = app.config["SWITCHBOARD_INSTANCE_PATH"]
    database = app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///")
    probe = (
        f"cat {instance}/secret_key {instance}/secrets_key || echo NO-KEYS; "
        f"ls {instance} | wc -l; "
        f"test -s {database} && echo DATABASE-VISIBLE || echo NO-DATABASE; "
        "ls /proc | grep -c '^[0-9]'; "  # its own PID namespace: a handful of processes
        "touch /usr/pwned 2>/dev/null && echo SYSTEM-WRITABLE || echo SYSTEM-READ-ONLY; "
        "echo ok > inside-workspace && cat inside-workspace"
    )
    t = create(client, member, prompt=probe)
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    text, _ = log_text(client, member, done["runs"][0]["id"])
    lines = text.splitlines()
    assert "NO-KEYS" in lines, text
    assert app.config["SWITCHBOARD_SECRETS_KEY"] not in text
    assert "NO-DATABASE" in lines or database.startswith("postgres"), text
    assert "SYSTEM-READ-ONLY" in lines and not Path("/usr/pwned").exists()
    assert lines[-1] == "ok"
    numbers = [int(line) for line in lines if line.isdigit()]
    assert numbers[0] <= 1, text  # the instance directory is empty inside: at most its mount
    assert numbers[1] < 10, text  # not the host's processes


@needs_bwrap
def test_stop_under_the_sandbox_still_gives_the_agent_its_term(
    app, client, member, project, worker
):
    t = create(
        client, member, prompt="trap 'echo got-term; exit 3' TERM; echo ready; sleep 600 & wait"
    )
    running = wait_status(client, member, t["id"], "running")
    run_id = running["latest_run_id"]
    wait_for(lambda: "ready" in log_text(client, member, run_id)[0])
    client.post(f"/api/v1/runs/{run_id}/stop", headers=member.headers)
    done = wait_status(client, member, t["id"], "cancelled", timeout=8)
    assert done["runs"][0]["exit_code"] == 3
    assert "got-term" in log_text(client, member, run_id)[0]


# -- project secrets -----------------------------------------------------------------------------

TOKEN = "tok-8f3b2a9c1d-secret"


def _set(client, acct, name, value, key="demo"):
    return client.put(
        f"/api/v1/projects/{key}/secrets/{name}", headers=acct.headers, json={"value": value}
    )


def test_secrets_are_listed_by_name_and_stored_encrypted(app, client, member, admin, project):
    assert _set(client, member, "TOKEN", TOKEN).status_code == 201
    again = _set(client, member, "TOKEN", TOKEN + "-2")
    assert again.status_code == 200
    assert again.get_json()["name"] == "TOKEN" and "value" not in again.get_json()
    listed = client.get("/api/v1/projects/demo/secrets", headers=member.headers)
    assert listed.status_code == 200
    (entry,) = listed.get_json()["data"]
    assert entry["name"] == "TOKEN" and entry["updated_by"]["username"] == "alice"
    assert TOKEN not in listed.get_data(as_text=True)
    with app.app_context():
        from app.database import db
        from app.vault import service as vault
        from app.vault.models import ProjectSecret

        stored = db.session.scalar(sa.select(ProjectSecret.ciphertext))
        assert TOKEN not in stored and stored.startswith("gAAAA")  # a Fernet token
        assert vault.decrypt(stored) == TOKEN + "-2"
    audit = client.get("/api/v1/audit-logs", headers=admin.headers).get_json()["data"]
    sets = [e for e in audit if e["action"] == "project.secret_set"]
    assert len(sets) == 2 and all(e["payload"]["name"] == "TOKEN" for e in sets)
    assert TOKEN not in json.dumps(audit)
    assert (
        client.delete("/api/v1/projects/demo/secrets/TOKEN", headers=member.headers).status_code
        == 204
    )
    assert (
        client.get("/api/v1/projects/demo/secrets", headers=member.headers).get_json()["data"] == []
    )
    assert_problem(
        client.delete("/api/v1/projects/demo/secrets/TOKEN", headers=member.headers), 404
    )


def test_bad_secrets_change_nothing(app, client, member, admin, project):
    for name in (
        "lower",
        "1ABC",
        "PATH",
        "HOME",
        "SWITCHBOARD_URL",
        "LD_PRELOAD",
        "A-B",
        "X" * 129,
    ):
        resp = _set(client, member, name, "leaky-value-123")
        assert resp.status_code in (404, 422), name  # a name with '/' would not route at all
        if resp.status_code == 422:
            assert "name" in resp.get_json()["errors"], name
    for value in ("", "x" * (64 * 1024 + 1), "a\x00b"):
        assert_problem(_set(client, member, "OK", value), 422)
    assert_problem(
        client.put("/api/v1/projects/demo/secrets/OK", headers=member.headers, json={}), 422
    )
    assert_problem(
        client.put("/api/v1/projects/demo/secrets/OK", headers=member.headers, json={"value": 5}),
        422,
    )
    assert (
        client.get("/api/v1/projects/demo/secrets", headers=member.headers).get_json()["data"] == []
    )
    audit = client.get("/api/v1/audit-logs", headers=admin.headers).get_json()["data"]
    assert not [e for e in audit if e["action"].startswith("project.secret")]
    assert audit and "leaky-value-123" not in json.dumps(audit)  # refused requests: no body


def test_attack_secrets_of_another_project_or_role(app, client, member, project):
    assert _set(client, member, "TOKEN", TOKEN).status_code == 201
    bob = account(app, client, "bob")
    assert_problem(client.get("/api/v1/projects/demo/secrets", headers=bob.headers), 404)
    assert_problem(_set(client, bob, "TOKEN", "overwritten"), 404)
    client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": bob.username, "role": "developer"},
    )
    assert_problem(client.get("/api/v1/projects/demo/secrets", headers=bob.headers), 403)
    assert_problem(_set(client, bob, "TOKEN", "overwritten"), 403)
    assert_problem(client.delete("/api/v1/projects/demo/secrets/TOKEN", headers=bob.headers), 403)


def _listen(app, found: list, stop: threading.Event) -> threading.Thread:
    """Everything published on any run channel, as the streams would relay it."""
    with app.app_context():
        from app.live.pubsub import namespace
        from app.queues import get_redis

        listener = get_redis().pubsub()
        listener.psubscribe(f"{namespace()}:run:*")

    def loop():
        while not stop.is_set():
            message = listener.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                found.append(message["data"])
        listener.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_a_secret_reaches_the_agent_and_never_its_log_events_or_stream(
    app, client, member, project, worker
):
    assert _set(client, member, "TOKEN", TOKEN).status_code == 201
    published: list = []
    stop = threading.Event()
    listener = _listen(app, published, stop)
    try:
        prompt = (
            'echo "whole: $TOKEN"; '
            # one character at a time, each its own chunk of output
            'for i in $(seq 0 $((${#TOKEN}-1))); do printf %s "${TOKEN:$i:1}"; sleep 0.02; done; '
            'echo; echo "length ${#TOKEN}"; echo "$TOKEN" >&2; exit 1'
        )
        t = create(client, member, prompt=prompt)
        done = wait_status(client, member, t["id"], "failed", timeout=20)
        run = done["runs"][0]
        text, _ = log_text(client, member, run["id"])
        assert text.splitlines() == ["whole: ***", "***", f"length {len(TOKEN)}", "***"], text
        assert TOKEN not in (run["error_summary"] or "")
        # the fake claude repeats the prompt in an event: masked there too
        claude = create(client, member, agent="claude", prompt=f"deploy with {TOKEN} now")
        done = wait_status(client, member, claude["id"], "completed", timeout=20)
        crun = done["runs"][0]
        events = client.get(f"/api/v1/runs/{crun['id']}/events", headers=member.headers)
        assert TOKEN not in events.get_data(as_text=True)
        assert "deploy with *** now" in events.get_data(as_text=True)
        assert TOKEN not in log_text(client, member, crun["id"])[0]
    finally:
        stop.set()
        listener.join(timeout=5)
    assert published and not [m for m in published if TOKEN.encode() in m]
    assert not [m for m in published if TOKEN[:8].encode() in m and b"log" in m]


def test_redactor_masks_values_split_anywhere():
    secret = "hunter2-secret"
    for size in (1, 2, 3, 5, 7, 100):
        r = Redactor([secret, "other-value"])
        text = f"a {secret} b {secret}{secret} c hunter d other-value e".encode()
        out = b"".join(r.feed(text[i : i + size]) for i in range(0, len(text), size)) + r.flush()
        assert out == b"a *** b ****** c hunter d *** e", size
    r = Redactor([secret])
    assert r.feed(b"ends with hunt") == b"ends with "  # held: it may be the secret's start
    assert r.flush() == b"hunt"  # it was not
    assert Redactor.of([]) is None and Redactor.of([""]) is None


def test_secrets_key_rotation_keeps_every_value(app, client, member, project):
    from app.config import fernet_key

    assert _set(client, member, "TOKEN", TOKEN).status_code == 201
    old = app.config["SWITCHBOARD_SECRETS_KEY"]
    new = fernet_key()
    with app.app_context():
        from app.database import db
        from app.vault import service as vault
        from app.vault.models import ProjectSecret

        app.config["SWITCHBOARD_SECRETS_KEY"] = f"{new},{old}"
        try:
            assert vault.rotate() == 1
            app.config["SWITCHBOARD_SECRETS_KEY"] = new  # the old key dropped
            assert vault.values_for(project["id"]) == {"TOKEN": TOKEN}
            stored = db.session.scalar(sa.select(ProjectSecret.ciphertext))
            app.config["SWITCHBOARD_SECRETS_KEY"] = old
            with pytest.raises(Exception):  # noqa: B017 - Fernet's InvalidToken
                vault.decrypt(stored)
        finally:
            app.config["SWITCHBOARD_SECRETS_KEY"] = old


def test_the_servers_own_files_are_private(tmp_path):
    Settings(ENV="development", INSTANCE_PATH=str(tmp_path)).resolve()
    for name in ("secret_key", "secrets_key", "switchboard.db"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    with pytest.raises(ConfigError, match="SWITCHBOARD_SECRETS_KEY"):
        Settings(ENV="production", SECRET_KEY="k" * 40, REDIS_URL="redis://x").resolve()
    with pytest.raises(ConfigError, match="SWITCHBOARD_SECRETS_KEY"):
        Settings(ENV="testing", INSTANCE_PATH=str(tmp_path), SECRETS_KEY="not-a-key").resolve()


# -- run tokens ----------------------------------------------------------------------------------


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_a_run_token_reaches_its_own_run_only(app, client, member, worker, tmp_path):
    assert _project(client, member, key="demo", workdir=str(tmp_path)).status_code == 201
    assert _set(client, member, "TOKEN", TOKEN).status_code == 201
    other = create(client, member, prompt="true", title="another task")
    other_done = wait_status(client, member, other["id"], "completed")
    t = create(
        client,
        member,
        prompt='printf %s "$SWITCHBOARD_RUN_TOKEN" > token; '
        "while [ ! -e done ]; do sleep 0.05; done",
    )
    running = wait_status(client, member, t["id"], "running")
    run_id = running["latest_run_id"]
    token = wait_for(lambda: (tmp_path / "token").exists() and (tmp_path / "token").read_text())
    assert token.startswith(f"sbr_{run_id}.")
    headers = _bearer(token)
    try:
        # what it may do
        assert client.get(f"/api/v1/runs/{run_id}", headers=headers).status_code == 200
        assert client.get(f"/api/v1/tasks/{t['id']}", headers=headers).status_code == 200
        reported = client.post(
            f"/api/v1/runs/{run_id}/events",
            headers=headers,
            json={"type": "progress", "data": {"done": 1, "note": f"using {TOKEN}"}},
        )
        assert reported.status_code == 201, reported.get_json()
        assert reported.get_json()["data"] == {"done": 1, "note": "using ***"}
        events = client.get(f"/api/v1/runs/{run_id}/events", headers=member.headers).get_json()
        assert [e["type"] for e in events["data"]] == ["progress"]
        # what it may not
        other_run = other_done["runs"][0]["id"]
        for method, path in (
            ("get", f"/api/v1/runs/{other_run}"),
            ("post", f"/api/v1/runs/{other_run}/events"),
            ("get", f"/api/v1/tasks/{other['id']}"),
            ("get", "/api/v1/users"),
            ("get", "/api/v1/runs"),
            ("get", "/api/v1/projects/demo/secrets"),
            ("get", f"/api/v1/runs/{run_id}/log"),
            ("post", f"/api/v1/runs/{run_id}/stop"),
            ("post", "/api/v1/tasks"),
        ):
            resp = getattr(client, method)(
                path, headers=headers, json={"type": "x", "data": {}} if method == "post" else None
            )
            assert_problem(resp, 403)
        # bad input: nothing stored
        for body in ({"type": "Bad Type"}, {"type": "x", "data": [1]}, {"data": {}}, {}):
            assert_problem(
                client.post(f"/api/v1/runs/{run_id}/events", headers=headers, json=body), 422
            )
        for forged in (
            f"sbr_{run_id}.forged",
            f"sbr_{other_run}.{token.split('.', 1)[1]}",
            "sbr_x",
        ):
            assert_problem(client.get(f"/api/v1/runs/{run_id}", headers=_bearer(forged)), 401)
    finally:
        (tmp_path / "done").touch()
    wait_status(client, member, t["id"], "completed")
    ended = client.get(f"/api/v1/runs/{run_id}", headers=headers)
    assert_problem(ended, 401)
    assert ended.get_json()["code"] == "token_expired"
    events = client.get(f"/api/v1/runs/{run_id}/events", headers=member.headers).get_json()
    assert [e["type"] for e in events["data"]] == ["progress"]


# -- workspace retention -------------------------------------------------------------------------


def _age(app, task_id, hours):
    from app.database import db
    from app.runs.models import Run
    from app.tasks.models import Task
    from app.timeutil import utcnow

    with app.app_context():
        then = utcnow() - timedelta(hours=hours)
        db.session.execute(sa.update(Run).where(Run.task_id == task_id).values(finished_at=then))
        db.session.execute(sa.update(Task).where(Task.id == task_id).values(finished_at=then))
        db.session.commit()


def test_retention_removes_old_worktrees_and_keeps_their_branches(
    app, client, member, worker, tmp_path
):
    from workers import retention

    bare = bare_repo(tmp_path)
    # review "none": the changes are not waiting for anyone (tests/test_reviews.py)
    resp = _project(client, member, key="demo", repo_url=str(bare), review="none")
    assert resp.status_code == 201
    edit = "echo more >> README.md; git -c user.name=a -c user.email=a@x commit -qam change"
    old = create(client, member, prompt=edit)
    new = create(client, member, prompt=edit)
    for t in (old, new):
        assert (
            wait_status(client, member, t["id"], ("completed", "failed"))["status"] == "completed"
        )
    root = Path(app.config["SWITCHBOARD_WORKSPACE_ROOT"])
    old_tree = root / "worktrees" / "demo" / f"{old['id']}-1"
    new_tree = root / "worktrees" / "demo" / f"{new['id']}-1"
    old_home = root / "runs" / "demo" / f"{old['id']}-1"
    assert old_tree.is_dir() and new_tree.is_dir() and old_home.is_dir()
    _age(app, old["id"], hours=25)
    with app.app_context():
        assert retention.sweep(app) >= 2
    assert not old_tree.exists() and not old_home.exists()
    assert new_tree.is_dir()  # within the retention
    # this test's clone (other tests leave clones of other `demo` projects beside it)
    cache = root / "repos" / f"demo-{hashlib.sha256(str(bare).encode()).hexdigest()[:12]}.git"
    assert git("branch", "--list", f"switchboard/{old['id']}-1", cwd=cache)  # the branch stays
    assert "worktrees" not in git("worktree", "list", cwd=cache).split(str(old_tree))[0][-1:]
    # a deleted (archived) project's workspaces go, its clone with them
    assert client.delete("/api/v1/projects/demo", headers=member.headers).status_code == 204
    with app.app_context():
        retention.sweep(app)
    assert not new_tree.exists() and not cache.exists()


def test_a_full_disk_fails_the_run_with_that_reason(tmp_path, monkeypatch):
    import errno

    from workers import workspace

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "mkdir", full)
    policy = workspace.Policy(workdir_roots=[str(tmp_path)], protected=[])
    with pytest.raises(workspace.WorkspaceError, match="no space left"):
        workspace.prepare(str(tmp_path / "ws"), "p", None, "main", None, 1, 1, policy=policy)


def test_readiness_reports_the_workspace_disk(app, client, monkeypatch):
    ready = client.get("/api/v1/health/ready").get_json()
    assert ready["checks"]["workspace"]["status"] == "ok"
    assert ready["checks"]["workspace"]["free_mb"] > 0
    monkeypatch.setitem(app.config, "SWITCHBOARD_WORKSPACE_MIN_FREE_MB", 10**9)
    low = client.get("/api/v1/health/ready")
    assert low.status_code == 200
    assert low.get_json()["checks"]["workspace"]["status"] == "low"
    assert "almost full" in low.get_json()["checks"]["workspace"]["warning"]


def test_sandbox_setting_is_checked(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="SWITCHBOARD_SANDBOX"):
        Settings(ENV="testing", INSTANCE_PATH=str(tmp_path), SANDBOX="docker").resolve()
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    assert sandbox.choose("auto") == "none"
    with pytest.raises(sandbox.SandboxUnavailable):
        sandbox.choose("bwrap")
    assert sandbox.choose("none") == "none"


def test_secrets_a_worker_cannot_decrypt_fail_the_run_saying_why(
    app, client, member, project, worker
):
    from cryptography.fernet import Fernet

    from app.config import fernet_key

    assert _set(client, member, "TOKEN", TOKEN).status_code == 201
    with app.app_context():
        from app.database import db
        from app.vault.models import ProjectSecret

        alien = Fernet(fernet_key().encode()).encrypt(b"x").decode()  # another server's key
        db.session.execute(sa.update(ProjectSecret).values(ciphertext=alien))
        db.session.commit()
    t = create(client, member, prompt="echo never")
    done = wait_status(client, member, t["id"], "failed")
    assert "do not decrypt" in done["runs"][0]["error_summary"]


def test_attack_a_terminal_shows_at_most_one_character_of_a_secret():
    """A terminal lets a held byte go after a quiet moment (a typed character's echo must not
    wait for the next key); an agent printing a secret slowly, one character at a time, still
    shows only its first character: the rest is held until whole, whatever the time."""
    secret = "hunter2-secret"
    r = Redactor([secret])
    shown = b""
    for ch in f"x {secret} y".encode():
        shown += r.feed(bytes([ch]))
        shown += r.release()  # quiet after every character
    shown += r.flush()
    assert shown == b"x h*** y"
    # a typed "h" that was not the secret after all: shown at once, and what follows too
    r = Redactor([secret])
    assert r.feed(b"h") == b""  # could begin the secret
    assert r.release() == b"h"
    assert r.feed(b"ello") == b"ello"
    # only single bytes are let go: a longer beginning waits for the next chunk
    r = Redactor([secret])
    assert r.feed(b"hun") == b"" and r.release() == b""
    assert r.feed(b"ter2-secret!") == b"***!"
