"""What people are told of, heard on the event bus.

- `question.asked` (activity): the developers of the run's project;
- a task gone to `review` (activity `task.status`): the developers of its project (those who
  may approve, and those who may look at the change before them);
- a task that failed (`task_ended`): whoever made it;
- `machine.offline` (activity): the administrators.

Interests (what the PostgreSQL fast paths ask before writing on their own): of the activity
entries those paths write (`task.created`, `run.status`, and `task.status` of queued, running,
completed or failed tasks) this listener acts on none, so its activity interest is false; a
task's failure is heard through `task_ended`, whose interest is true for an end that fails.
"""

from __future__ import annotations

from typing import Any

from app import events
from app.database import db
from app.notifications import service
from app.projects.models import Project
from app.tasks.models import Task
from app.timeutil import utcnow


def _activity(*, project_id: int | None, kind: str, data: dict[str, Any], **_: Any) -> None:
    if kind == "question.asked" and project_id is not None:
        service.notify(
            service.members(project_id, "developer"),
            "question",
            f"question:{data['id']}",
            title=f"A question waits: {data['prompt'][:120]}",
            body=data["prompt"]
            + (f"\n\nOptions: {', '.join(data['options'])}" if data.get("options") else ""),
            link=f"/api/v1/questions/{data['id']}",
            project_id=project_id,
            data={"question_id": data["id"], "run_id": data["run_id"]},
        )
    elif kind == "task.status" and data.get("status") == "review" and project_id is not None:
        task = db.session.get(Task, data["task_id"])
        project = db.session.get(Project, project_id)
        if task is None or project is None:
            return
        run_id = task.latest_run_id
        service.notify(
            service.members(project_id, "developer"),
            "review",
            f"review:{run_id}",
            title=f"A change waits for review: {task.title[:120]}",
            body=f"Task {task.id} ({project.key}) changed files; see run {run_id}'s diff "
            f"(approving is for {project.review_role}s).",
            link=f"/api/v1/runs/{run_id}/diff",
            project_id=project_id,
            data={"task_id": task.id, "run_id": run_id},
        )
    elif kind == "machine.offline":
        service.notify(
            service.admins(),
            "machine_offline",
            f"machine_offline:{data['machine_id']}:{utcnow():%Y%m%dT%H%M}",
            title=f"Machine {data['name']} went offline",
            body=f"Machine {data['name']} stopped sending heartbeats; its runs may be lost.",
            link=f"/api/v1/machines/{data['machine_id']}",
            project_id=None,
            data={"machine_id": data["machine_id"]},
        )


def _task_ended(*, task: Task, **_: Any) -> None:
    if task.status != "failed" or task.creator_id is None:
        return
    service.notify(
        [task.creator_id],
        "task_failed",
        f"task_failed:{task.id}:{task.attempts}",
        title=f"Your task failed: {task.title[:120]}",
        body=f"Task {task.id} failed: {task.status_reason or 'no reason given'}",
        link=f"/api/v1/tasks/{task.id}",
        project_id=task.project_id,
        data={"task_id": task.id},
    )


def _none_of_the_fast_paths(**_columns: str) -> str:
    return "false"


def _a_failure(*, status: str = "NULL", **_columns: str) -> str:
    return f"{status} IN ('failed', 'timed_out', 'lost')"


def connect() -> None:
    events.activity_recorded.connect(_activity, interest=_none_of_the_fast_paths)
    events.task_ended.connect(_task_ended, interest=_a_failure)
