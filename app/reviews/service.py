"""Review before push: a succeeded run's change (`RunChange`) waits in `review` for a person.

Approving needs the `git:push` ability and the project's `review_role` (maintainer, or developer
where the project allows it). With `push`, the run's review goes `pending → approving` (one
approval wins a race) and a job pushes the branch from the captured bundle (`workers.jobs`);
it then opens a pull request when asked (GitHub remotes), records the URL, and completes the
task. A push that fails puts the review back to `pending` with the error: approve again.
Rejecting fails the task, or (`retry`) starts a new attempt whose prompt ends with the
reviewer's comment.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from flask import current_app

from app.activity import service as activity
from app.audit import service as audit
from app.auth.service import Principal
from app.database import after_commit, db
from app.errors import Conflict
from app.projects import service as projects
from app.projects.models import Project
from app.queues import get_queue
from app.reviews import github
from app.runs import service as runs
from app.runs.models import Run, RunChange
from app.tasks import lifecycle
from app.tasks.models import Task
from app.vault import service as vault


def _move(run: Run, before: str, after: str, **values: Any) -> bool:
    """The review `before → after`, once (a conditional update)."""
    moved = db.session.execute(
        sa.update(Run)
        .where(Run.id == run.id, Run.review == before)
        .values(review=after, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved == 1:
        run.review = after
        for key, value in values.items():
            setattr(run, key, value)
    return moved == 1


def _in_review(run: Run) -> Conflict:
    state = run.review or f"not in review (the run is {run.status})"
    return Conflict(f"Run {run.id}'s change is {state}.", review=run.review)


def _task(run: Run) -> Task:
    task = db.session.get(Task, run.task_id)
    assert task is not None
    return task


def _said(run: Run, kind: str, data: dict[str, Any]) -> None:
    activity.record(run.project_id, kind, {"run_id": run.id, "task_id": run.task_id, **data})


def approve(
    principal: Principal,
    run: Run,
    *,
    comment: str | None,
    push: bool,
    pull_request: dict[str, Any] | None,
) -> Run:
    project = run.project
    projects.authorize(principal, project, project.review_role)
    if run.review != "pending":
        raise _in_review(run)
    after = "approving" if push else "approved"
    if not _move(run, "pending", after, review_error=None):
        db.session.rollback()
        db.session.refresh(run)
        raise _in_review(run)
    audit.record(
        "run.approve",
        target_type="run",
        target_id=run.id,
        payload={"comment": comment, "push": push, "pull_request": pull_request},
    )
    _said(run, "review.approved", {"by": principal.user.username, "push": push})
    if push:
        after_commit(lambda: _enqueue_push(run.id, pull_request))
    else:
        _complete(run)
    db.session.commit()
    return run


def _enqueue_push(run_id: int, pull_request: dict[str, Any] | None) -> None:
    get_queue("events").enqueue(
        "workers.jobs.push_run",
        run_id,
        pull_request,
        job_timeout=900,
        result_ttl=0,
        failure_ttl=24 * 3600,
        description=f"push run {run_id}'s branch",
    )


def _complete(run: Run) -> None:
    task = _task(run)
    if task.latest_run_id == run.id and task.status == "review":
        task.status = "completed"
        task.status_reason = None
        lifecycle.task_ended(task)


def push_spec(run_id: int) -> dict[str, Any] | None:
    """For the push job: what to push where, or None when the run is not being approved (the
    job ran twice, or the approval was undone)."""
    run = db.session.get(Run, run_id)
    if run is None or run.review != "approving":
        return None
    change = db.session.get(RunChange, run_id)
    project = db.session.get(Project, run.project_id)
    assert project is not None
    return {
        "project_key": project.key,
        "repo_url": project.repo_url,
        "branch": change.branch if change else None,
        "head": change.head_commit if change else None,
        "bundle": change.bundle if change else None,
        "git_token": vault.values_for(project.id).get("GIT_TOKEN"),
    }


def push_failed(run_id: int, error: str) -> None:
    """The push did not happen: the change is in review again, saying why."""
    run = db.session.get(Run, run_id)
    if run is not None and _move(run, "approving", "pending", review_error=error[:1000]):
        _said(run, "review.push_failed", {"error": error[:1000]})
    db.session.commit()


def pushed(run_id: int, pull_request: dict[str, Any] | None) -> str | None:
    """The branch is on the remote: open the pull request if asked, and complete the task.
    The pull request's URL (None when not asked, or when it failed: said in `review_error`)."""
    run = db.session.get(Run, run_id)
    if run is None or run.review != "approving":
        return None
    url, error = None, None
    if pull_request is not None:
        url, error = _pull_request(run, pull_request)
    if not _move(run, "approving", "approved", pull_request_url=url, review_error=error):
        db.session.rollback()
        return None
    _said(run, "review.pushed", {"branch": run.branch, "pull_request_url": url})
    _complete(run)
    db.session.commit()
    return url


def _pull_request(run: Run, asked: dict[str, Any]) -> tuple[str | None, str | None]:
    project = db.session.get(Project, run.project_id)
    assert project is not None and project.repo_url
    where = github.repository(project.repo_url)
    if where is None:
        return None, "pushed; no pull request: the remote is not on GitHub"
    task = _task(run)
    try:
        url = github.open_pull_request(
            current_app.config["SWITCHBOARD_GITHUB_API_URL"],
            vault.values_for(project.id).get("GIT_TOKEN"),
            *where,
            head=run.branch or "",
            base=project.default_branch,
            title=asked.get("title") or task.title,
            body=f"{task.prompt}\n\n(Switchboard task {task.id}, run {run.id})"[:60_000],
            draft=bool(asked.get("draft")),
        )
    except github.GitHubError as exc:
        return None, f"pushed; the pull request failed: {exc}"
    return url, None


def reject(principal: Principal, run: Run, *, comment: str, retry: bool) -> Run:
    project = run.project
    projects.authorize(principal, project, project.review_role)
    if run.review != "pending":
        raise _in_review(run)
    if not _move(run, "pending", "rejected"):
        db.session.rollback()
        db.session.refresh(run)
        raise _in_review(run)
    task = _task(run)
    audit.record(
        "run.reject",
        target_type="run",
        target_id=run.id,
        payload={"comment": comment, "retry": retry},
    )
    _said(run, "review.rejected", {"by": principal.user.username, "retry": retry})
    if task.latest_run_id == run.id and task.status == "review":
        if retry:
            task.prompt = (
                f"{task.prompt}\n\nA reviewer turned down attempt {run.attempt}'s change "
                f"({principal.user.username}): {comment}"
            )
            lifecycle.new_attempt(task, reason=f"rejected, retried: {comment}"[:500])
            task.attempts_not_counted += 1  # a person asked for it
        else:
            task.status = "failed"
            task.status_reason = f"rejected: {comment}"[:500]
            lifecycle.task_ended(task)
    db.session.commit()
    return run


def change_of(run: Run, path: str | None) -> dict[str, Any]:
    change = runs.get_change(run)
    diff = change.diff if path is None else _one_file(change.diff, path)
    return {
        "run_id": run.id,
        "branch": change.branch,
        "base_commit": change.base_commit,
        "head_commit": change.head_commit,
        "path": path,
        "diff": diff,
        "truncated": change.truncated,
    }


def _one_file(diff: str, path: str) -> str:
    """The part of a unified diff about `path` (empty when it has none)."""
    parts = diff.split("\ndiff --git ")
    for i, part in enumerate(parts):
        block = part if i == 0 else "diff --git " + part
        header = block.split("\n", 1)[0]
        if header.endswith(f" b/{path}") or header.startswith(f"diff --git a/{path} "):
            return block if block.endswith("\n") else block + "\n"
    return ""
