"""Tasks: what someone asked for. Creation (idempotent), changes, cancel, retry, delete, and the
external executors' claim."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm.attributes import set_committed_value

from app.activity import service as activity
from app.agents.registry import known_agents
from app.audit import service as audit
from app.auth.service import Principal
from app.database import db, on_postgresql
from app.errors import Conflict, Forbidden, IdempotencyKeyReused, NotFound, ValidationFailed
from app.pagination import Page, paginate
from app.projects import service as projects
from app.projects.models import Project
from app.runs import service as runs
from app.runs.models import RUN_ACTIVE, RUN_TERMINAL, Run, status_in
from app.tasks import lifecycle, limits
from app.tasks.models import PRIORITY_RANK, TASK_TERMINAL, Task, TaskDependency
from app.timeutil import as_utc, utcnow

#: who may create a task: a principal holding this ability, with this role in the project
CREATE_ABILITY = "runs:start"
CREATE_ROLE = "developer"
IDEMPOTENCY_WINDOW = timedelta(hours=24)
RETRY_FROM = frozenset({"failed", "cancelled", "timed_out", "lost"})


@dataclass
class Created:
    task: Task
    replayed: bool


def _idempotent(principal: Principal, key: str | None) -> Task | None:
    if not key:
        return None
    task = db.session.scalar(
        sa.select(Task).where(Task.creator_id == principal.user.id, Task.idempotency_key == key)
    )
    if task is None:
        return None
    if utcnow() - as_utc(task.created_at) <= IDEMPOTENCY_WINDOW:
        return task
    task.idempotency_key = None  # expired: the key may name a new task
    db.session.flush()
    return None


def _replay(principal: Principal, task: Task, data: dict[str, Any]) -> Task:
    """The task a key made, answered again only for the same request, and only while the caller
    may still create tasks in its project."""
    project = db.session.get(Project, task.project_id)
    assert project is not None
    if projects.role_in(principal, project) is None:
        raise ValidationFailed(
            "Unknown project.", {"project": [f"no project {data['project']!r} you can see"]}
        )
    projects.authorize(principal, project, CREATE_ROLE)
    deps = sorted(
        db.session.scalars(
            sa.select(TaskDependency.depends_on_id).where(TaskDependency.task_id == task.id)
        )
    )
    asked = {
        "project": data["project"],
        "title": data["title"],
        "prompt": data["prompt"],
        "agent": data.get("agent") or task.agent,
        "target": data.get("target") or lifecycle.POOL_TARGET,
        "priority": data.get("priority") or "normal",
        "timeout_s": data.get("timeout_s"),
        "max_attempts": data.get("max_attempts") or 1,
        "loop": data.get("loop"),
        "config": data.get("config"),
        "tty": data.get("tty"),
        "depends_on": sorted(set(data.get("depends_on") or [])),
    }
    made = {
        "project": project.key,
        "title": task.title,
        "prompt": task.prompt,
        "agent": task.agent,
        "target": task.target,
        "priority": task.priority,
        "timeout_s": task.timeout_s,
        "max_attempts": task.max_attempts,
        "loop": task.loop,
        "config": task.config,
        "tty": task.tty,
        "depends_on": deps,
    }
    differing = sorted(k for k in asked if asked[k] != made[k])
    if differing:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was used for a different request: "
            + ", ".join(differing)
            + " differ. Use a new key for a new task.",
            fields=differing,
        )
    return task


def _project_for_task(principal: Principal, key: str) -> Project:
    """Unknown project (or one the caller cannot see) is a validation error of the body."""
    project = db.session.scalar(sa.select(Project).where(Project.key == key))
    if project is None or projects.role_in(principal, project) is None:
        raise ValidationFailed("Unknown project.", {"project": [f"no project {key!r}"]})
    projects.authorize(principal, project, CREATE_ROLE)  # the role is cached per request
    if not projects.takes_tasks(project.archived_at):
        raise Conflict(f"Project {key!r} is archived.")
    return project


def _dependencies(project: Project, ids: list[int]) -> list[Task]:
    """The dependencies, locked until the caller commits (PostgreSQL: FOR SHARE; SQLite: the
    database's write lock): a dependency that is ending at this moment either ends first (we then
    read how it ended) or waits for us (and then finds this task among its dependents). Without
    the lock both could miss each other and leave the new task blocked for ever."""
    ids = list(dict.fromkeys(ids))
    if ids and not on_postgresql():
        # no row locks there: take the database's write lock first (a write that changes nothing)
        db.session.execute(
            sa.update(Task).where(Task.id.in_(ids)).values(id=Task.id),
            execution_options={"synchronize_session": False},
        )
    found = (
        list(
            db.session.scalars(
                sa.select(Task)
                .where(Task.id.in_(ids), Task.project_id == project.id)
                .with_for_update(read=True)
                .execution_options(populate_existing=True)  # the state the lock waited for
            )
        )
        if ids
        else []
    )
    missing = sorted(set(ids) - {t.id for t in found})
    if missing:
        raise ValidationFailed(
            "Missing dependency.",
            {"depends_on": [f"no task {i} in project {project.key!r}" for i in missing]},
        )
    return found


def create_task(
    principal: Principal, data: dict[str, Any], idempotency_key: str | None = None
) -> Created:
    existing = _idempotent(principal, idempotency_key)
    if existing is not None:
        return Created(_replay(principal, existing, data), True)
    try:
        task = build_task(principal, data, idempotency_key)  # it flushes: the key may clash here
        db.session.commit()
    except sa.exc.IntegrityError:
        # the same key raced in from another request: answer with the winner
        db.session.rollback()
        winner = _idempotent(principal, idempotency_key)
        if winner is None:
            raise
        return Created(_replay(principal, winner, data), True)
    return Created(task, False)


def build_task(
    principal: Principal, data: dict[str, Any], idempotency_key: str | None = None
) -> Task:
    """Add a task (and its first run, if it can start) to the session without committing, so a
    caller can commit it with its own rows (a webhook's match). Validation errors raise before
    anything is added."""
    project = _project_for_task(principal, data["project"])
    agent = data.get("agent") or project.default_agent
    target = data.get("target") or lifecycle.POOL_TARGET
    wrong = refusal(agent, target, known_agents())
    if wrong is not None:
        raise wrong
    deps = _dependencies(project, data.get("depends_on") or [])
    priority = data.get("priority") or "normal"
    task = Task(
        project_id=project.id,
        title=data["title"],
        prompt=data["prompt"],
        agent=agent,
        target=target,
        priority=priority,
        priority_rank=PRIORITY_RANK[priority],
        timeout_s=data.get("timeout_s"),
        max_attempts=data.get("max_attempts") or 1,
        loop=data.get("loop"),
        config=data.get("config"),
        tty=data.get("tty"),
        source=data.get("source", "api"),
        source_ref=data.get("source_ref"),
        creator_id=principal.user.id,
        idempotency_key=idempotency_key,
        status="blocked",
    )
    db.session.add(task)
    db.session.flush()
    set_committed_value(task, "project", project)  # for the response, without a query
    for dep in deps:
        db.session.add(TaskDependency(task_id=task.id, depends_on_id=dep.id))
    task.depends_on = sorted(d.id for d in deps)  # for the response, without a query
    dead = [d for d in deps if d.status in ("failed", "cancelled")]
    if dead:
        lifecycle.cancel(task, f"dependency #{dead[0].id} {dead[0].status}")
    elif all(d.status == "completed" for d in deps):
        lifecycle.new_attempt(task)
    activity.record(
        project.id,
        "task.created",
        lifecycle.task_created_data(task.id, task.title, agent, task.status, priority),
    )
    audit.record(
        "task.create",
        target_type="task",
        target_id=task.id,
        payload=creation_audit(
            project.key, task.title, agent, target, priority, [d.id for d in deps]
        ),
    )
    return task


def creation_audit(
    project_key: str, title: str, agent: str, target: str, priority: str, depends_on: list[int]
) -> dict[str, Any]:
    """The audit payload of a task's creation (both write paths)."""
    return {
        "project": project_key,
        "title": title,
        "agent": agent,
        "target": target,
        "priority": priority,
        "depends_on": depends_on,
    }


def refusal(agent: str, target: str, agents: Collection[str]) -> ValidationFailed | None:
    """What is wrong with a task's agent (among the `agents` known) or target, if anything
    (both write paths ask)."""
    if agent not in agents:
        return ValidationFailed(
            "Unknown agent.",
            {"agent": [f"unknown agent {agent!r}; known: {', '.join(sorted(agents))}"]},
        )
    wrong = limits.target_refusal(target)
    if wrong is not None:
        return ValidationFailed("Unknown target.", {"target": [wrong]})
    return None


def get_task(task_id: int) -> Task:
    task = db.session.get(Task, task_id)
    if task is None:
        raise NotFound(f"No task {task_id}.")
    return task


def task_for(principal: Principal, task_id: int, role: str = "viewer") -> Task:
    if not principal.reaches(task_id=task_id):
        raise Forbidden("A run token reaches only its own task.")
    task = get_task(task_id)
    project = db.session.get(Project, task.project_id)
    try:
        projects.authorize(principal, project, role)
    except NotFound:
        raise NotFound(f"No task {task_id}.") from None
    return task


def list_tasks(
    principal: Principal,
    *,
    project: str | None = None,
    status: str | None = None,
    agent: str | None = None,
    priority: str | None = None,
    creator_id: int | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> Page[Task]:
    stmt = sa.select(Task)
    ids = projects.visible_project_ids(principal)
    if ids is not None:
        stmt = stmt.where(Task.project_id.in_(ids))
    if project:
        stmt = stmt.join(Project, Project.id == Task.project_id).where(Project.key == project)
    if status:
        stmt = stmt.where(Task.status == status)
    if agent:
        stmt = stmt.where(Task.agent == agent)
    if priority:
        stmt = stmt.where(Task.priority == priority)
    if creator_id is not None:
        stmt = stmt.where(Task.creator_id == creator_id)
    return paginate(stmt, Task.id, cursor=cursor, limit=limit)


def dependency_ids_of(task_ids: list[int]) -> dict[int, list[int]]:
    """The dependencies of several tasks (a page of a listing), in one query."""
    found: dict[int, list[int]] = {task_id: [] for task_id in task_ids}
    if task_ids:
        rows = db.session.execute(
            sa.select(TaskDependency.task_id, TaskDependency.depends_on_id)
            .where(TaskDependency.task_id.in_(task_ids))
            .order_by(TaskDependency.task_id, TaskDependency.depends_on_id)
        )
        for task_id, depends_on_id in rows:
            found[task_id].append(depends_on_id)
    return found


def dependency_ids(task_id: int) -> list[int]:
    return list(
        db.session.scalars(
            sa.select(TaskDependency.depends_on_id)
            .where(TaskDependency.task_id == task_id)
            .order_by(TaskDependency.depends_on_id)
        )
    )


def task_runs(task_id: int) -> list[Run]:
    return list(db.session.scalars(sa.select(Run).where(Run.task_id == task_id).order_by(Run.id)))


def project_key(project_id: int) -> str:
    return db.session.scalar(sa.select(Project.key).where(Project.id == project_id))


def _would_cycle(task_id: int, new_deps: list[int]) -> bool:
    """Does any new dependency (transitively) depend on `task_id`?"""
    seen: set[int] = set()
    frontier = list(new_deps)
    while frontier:
        current = frontier.pop()
        if current == task_id:
            return True
        if current in seen:
            continue
        seen.add(current)
        frontier += dependency_ids(current)
    return False


def update_task(task: Task, changes: dict[str, Any]) -> Task:
    """Title, priority and dependencies may change until the task runs."""
    if task.status not in ("blocked", "queued"):
        raise Conflict(f"Task {task.id} is {task.status}; only blocked or queued tasks change.")
    if "title" in changes:
        task.title = changes["title"]
    if "priority" in changes:
        task.priority = changes["priority"]
        task.priority_rank = PRIORITY_RANK[changes["priority"]]
    if "depends_on" in changes:
        # One change of dependencies at a time per project: two made at once could each pass
        # the cycle check and together make a cycle (A waits on B, B on A). PostgreSQL: the
        # project's row, FOR NO KEY UPDATE, which rows that only refer to the project (new
        # tasks, runs, activity) do not wait for; SQLite: the database's write lock, which
        # `_dependencies` takes.
        project = db.session.scalar(
            sa.select(Project)
            .where(Project.id == task.project_id)
            .with_for_update(key_share=True)
            .execution_options(populate_existing=True)
        )
        deps = _dependencies(project, changes["depends_on"])
        if any(d.id == task.id for d in deps) or _would_cycle(task.id, [d.id for d in deps]):
            raise ValidationFailed(
                "Dependency cycle.",
                {"depends_on": ["these dependencies would make the task wait on itself"]},
            )
        if task.status == "queued" and deps and not all(d.status == "completed" for d in deps):
            run = db.session.get(Run, task.latest_run_id) if task.latest_run_id else None
            if run is not None and run.status != "queued":
                raise Conflict(f"Task {task.id} is already being executed.")
            if run is not None:
                run.status, run.finished_at = "cancelled", utcnow()
                run.error_summary = "superseded: the task got new dependencies"
            task.status = "blocked"
            lifecycle.note_task(task)
        db.session.execute(sa.delete(TaskDependency).where(TaskDependency.task_id == task.id))
        for dep in deps:
            db.session.add(TaskDependency(task_id=task.id, depends_on_id=dep.id))
        db.session.flush()
        if task.status == "blocked":
            pending, dead = lifecycle.unmet_dependencies(task.id)
            if dead:
                lifecycle.cancel(task, f"dependency #{dead[0].id} {dead[0].status}")
            elif pending == 0:
                lifecycle.new_attempt(task)
    audit.record(
        "task.update", target_type="task", target_id=task.id, payload={"fields": sorted(changes)}
    )
    db.session.commit()
    return task


def cancel_task(task: Task) -> Task:
    if task.status in TASK_TERMINAL:
        raise Conflict(f"Task {task.id} already ended ({task.status}).")
    run = db.session.get(Run, task.latest_run_id) if task.latest_run_id else None
    audit.record("task.cancel", target_type="task", target_id=task.id)
    if run is not None and run.status in RUN_ACTIVE and run.status != "queued":
        db.session.commit()
        runs.request_stop(run)  # the run ends cancelled, and the task with it
        return task
    lifecycle.cancel(task, "cancelled by a person")
    lifecycle.dispatch(task.project_id)
    db.session.commit()
    return task


def retry_task(task: Task) -> Run:
    run = db.session.get(Run, task.latest_run_id) if task.latest_run_id else None
    last = run.status if run is not None else task.status
    if last not in RETRY_FROM or task.status not in ("failed", "cancelled"):
        raise Conflict(
            f"Task {task.id} is {task.status} (last run {last}); "
            "only failed, cancelled, timed-out or lost work is retried."
        )
    pending, _dead = lifecycle.unmet_dependencies(task.id)
    if pending:
        raise Conflict(f"Task {task.id} still waits on {pending} dependencies.")
    # Claim the retry: only the request that still finds the task as read above goes on. A
    # concurrent one waits for this row (PostgreSQL) or for the database's write lock (SQLite),
    # then finds the new attempt and is refused, instead of queueing a second one.
    seen_run = (
        Task.latest_run_id.is_(None)
        if task.latest_run_id is None
        else Task.latest_run_id == task.latest_run_id
    )
    claimed = db.session.execute(
        sa.update(Task)
        .where(Task.id == task.id, Task.status == task.status, seen_run)
        .values(updated_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount
    if claimed != 1:
        db.session.rollback()
        raise Conflict(f"Task {task.id} was retried or changed meanwhile.")
    new = lifecycle.new_attempt(task, reason="retried by a person")
    task.attempts_not_counted += 1  # a person asked for it: it does not use up an attempt
    audit.record(
        "task.retry",
        target_type="task",
        target_id=task.id,
        payload={"run_id": new.id, "attempt": new.attempt},
    )
    db.session.commit()
    return new


def delete_task(task: Task) -> None:
    active = db.session.scalar(
        sa.select(sa.func.count(Run.id)).where(
            Run.task_id == task.id, status_in(RUN_ACTIVE - {"queued"})
        )
    )
    if active:
        raise Conflict(f"Task {task.id} has a run in progress; stop it first.")
    audit.record(
        "task.delete", target_type="task", target_id=task.id, payload={"title": task.title}
    )
    project_id = task.project_id
    if task.status not in TASK_TERMINAL:
        lifecycle.cancel_dependents(task, f"dependency #{task.id} deleted")
    db.session.delete(task)
    lifecycle.dispatch(project_id)
    db.session.commit()


# -- external executors ------------------------------------------------------------------------


def claim(task: Task, executor: str, lease_s: int) -> Run:
    """An external executor takes the task's queued run; claiming again is harmless."""
    if task.target != "external":
        raise Conflict(f"Task {task.id} runs on the {task.target!r} target, not 'external'.")
    run = db.session.get(Run, task.latest_run_id) if task.latest_run_id else None
    if run is None or run.status in RUN_TERMINAL:
        raise Conflict(f"Task {task.id} has nothing to claim ({task.status}).")
    if run.status == "queued":
        assigned = runs.assign(run.id, executor, lease_s)
        if assigned is not None:
            return assigned
        db.session.refresh(run)
    if run.executor != executor:
        raise Conflict(f"Task {task.id} is claimed by another executor.", executor=run.executor)
    runs.renew_lease(run.id, executor, lease_s)
    db.session.refresh(run)
    return run
