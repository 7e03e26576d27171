"""How tasks follow their runs: status, retries, dependencies and dispatch to the worker pool.

A task's status follows its latest run. When a run ends, the task may get a new attempt (within
`max_attempts`), release the tasks waiting on it, or cancel them; then the project's freed
capacity is handed to the next queued runs, highest priority first, then oldest.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from app import events
from app.activity import service as activity
from app.database import after_commit, db
from app.live import pubsub
from app.projects.models import Project
from app.queues import get_queue
from app.runs.models import RUN_HELD, Run
from app.tasks import limits
from app.tasks.models import PRIORITY_RANK, TASK_TERMINAL, Task, TaskDependency
from app.timeutil import utcnow

log = logging.getLogger(__name__)

TASK_FOR_RUN = {
    "queued": "queued",
    "assigned": "queued",
    "running": "running",
    "waiting": "waiting",
    "succeeded": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "timed_out": "failed",
    "lost": "failed",
}
RETRYABLE = frozenset({"failed", "timed_out", "lost"})
#: runs holding (or about to hold) a slot of the project's concurrency cap
OCCUPYING = RUN_HELD
POOL_TARGET = "pool"


def queue_name(priority: str) -> str:
    return {"urgent": "runs-urgent", "high": "runs-high", "low": "runs-low"}.get(
        priority, "runs-default"
    )


def job_id(run_id: int) -> str:
    return f"run-{run_id}"


def new_attempt(task: Task, *, reason: str | None = None) -> Run:
    """Queue a new run of `task` (in the current transaction) and dispatch it after commit."""
    attempt = task.attempts + 1
    run = Run(
        task_id=task.id,
        project_id=task.project_id,
        attempt=attempt,
        agent=task.agent,
        status="queued",
    )
    db.session.add(run)
    db.session.flush()  # for the run's id; the task changes below go in one UPDATE
    task.attempts = attempt
    task.latest_run_id = run.id
    task.status = "queued"
    task.status_reason = reason
    task.finished_at = None
    note_run(run)
    note_task(task)
    if task.target == POOL_TARGET:
        dispatch(task.project_id)
    elif limits.for_machines(task.target):
        events.machine_run_queued.send(run_id=run.id)
    return run


def task_status_after(run: Run) -> str:
    """The status a task takes from its latest run: a run that succeeded with a change awaiting
    a person's approval leaves its task in `review` (approve completes it; reject fails it or
    starts another attempt)."""
    if run.status == "succeeded" and run.review == "pending":
        return "review"
    return TASK_FOR_RUN[run.status]


def run_changed(run: Run) -> None:
    task = db.session.get(Task, run.task_id)
    note_run(run)
    if task is not None and task.latest_run_id == run.id:
        status = TASK_FOR_RUN[run.status]
        if task.status != status:
            task.status = status
            note_task(task)


def run_finished(run: Run, *, requeue: bool = False) -> None:
    """A run reached a terminal state (in the current transaction)."""
    note_run(run)
    events.run_ended.send(run=run)
    task = db.session.get(Task, run.task_id)
    if task is None or task.latest_run_id != run.id:
        return
    counted = task.attempts - task.attempts_not_counted
    if requeue or (run.status in RETRYABLE and counted < task.max_attempts):
        if requeue:
            task.attempts_not_counted += 1  # handed back: this attempt does not count
        new_attempt(
            task,
            reason=f"attempt {run.attempt} {run.status}: {run.error_summary or ''}".strip(": "),
        )
        return
    task.status = task_status_after(run)
    task.status_reason = run.error_summary
    if task.status == "review":
        note_task(task)  # not ended: its dependents wait for the approval
    else:
        task_ended(task)
    if task.project.max_concurrent_runs is not None:
        dispatch(task.project_id)  # a slot is free: without a cap nothing waits for one


def task_ended(task: Task) -> None:
    """The task reached its terminal status (set by the caller): recorded, and what depends on
    it released or cancelled. After its run, or after a person's review."""
    task.finished_at = utcnow()
    note_task(task)
    if task.status == "completed":
        release_dependents(task)
    else:
        cancel_dependents(task, f"dependency #{task.id} {task.status}")


def _dependents(task_id: int) -> list[Task]:
    return list(
        db.session.scalars(
            sa.select(Task)
            .join(TaskDependency, TaskDependency.task_id == Task.id)
            .where(TaskDependency.depends_on_id == task_id, Task.status == "blocked")
        )
    )


def unmet_dependencies(task_id: int) -> tuple[int, list[Task]]:
    """(how many dependencies are not completed yet, those that failed or were cancelled)."""
    deps = list(
        db.session.scalars(
            sa.select(Task)
            .join(TaskDependency, TaskDependency.depends_on_id == Task.id)
            .where(TaskDependency.task_id == task_id)
        )
    )
    pending = sum(1 for d in deps if d.status != "completed")
    dead = [d for d in deps if d.status in ("failed", "cancelled")]
    return pending, dead


def release_dependents(task: Task) -> None:
    for dependent in _dependents(task.id):
        pending, dead = unmet_dependencies(dependent.id)
        if dead:
            cancel(dependent, f"dependency #{dead[0].id} {dead[0].status}")
        elif pending == 0:
            new_attempt(dependent)


def cancel(task: Task, reason: str) -> None:
    """Cancel a task that has no live run, and everything waiting on it."""
    task.status = "cancelled"
    task.status_reason = reason
    task.finished_at = utcnow()
    if task.latest_run_id:
        run = db.session.get(Run, task.latest_run_id)
        if run is not None and run.status == "queued":
            run.status, run.finished_at, run.error_summary = "cancelled", utcnow(), reason
            note_run(run)
    note_task(task)
    cancel_dependents(task, f"dependency #{task.id} cancelled")


def cancel_dependents(task: Task, reason: str) -> None:
    for dependent in _dependents(task.id):
        cancel(dependent, reason)


def note_task(task: Task) -> None:
    """The activity feed hears of every task status change, the event bus of a task's end."""
    if task.status in TASK_TERMINAL:
        events.task_ended.send(task=task)
    activity.record(
        task.project_id,
        "task.status",
        task_status_data(task.id, task.title, task.status, task.status_reason),
    )


def note_run(run: Run) -> None:
    activity.record(
        run.project_id,
        "run.status",
        run_status_data(run.id, run.task_id, run.attempt, run.status, run.exit_code),
    )


# The activity entries of the lifecycle, as the ORM path records them and the PostgreSQL fast
# paths (`tasks.pg_fastpath`, `runs.pg_fastpath`) write them: one definition each.


def task_status_data(task_id: int, title: str, status: str, reason: str | None) -> dict[str, Any]:
    """A `task.status` activity entry."""
    return {"task_id": task_id, "title": title, "status": status, "reason": reason}


def run_status_data(
    run_id: int, task_id: int, attempt: int, status: str, exit_code: int | None
) -> dict[str, Any]:
    """A `run.status` activity entry."""
    return {
        "run_id": run_id,
        "task_id": task_id,
        "attempt": attempt,
        "status": status,
        "exit_code": exit_code,
    }


def task_created_data(
    task_id: int, title: str, agent: str, status: str, priority: str
) -> dict[str, Any]:
    """A `task.created` activity entry."""
    return {
        "task_id": task_id,
        "title": title,
        "agent": agent,
        "status": status,
        "priority": priority,
    }


def ends_quietly_sql(*, status: str, run_id: str, task: str, project: str) -> str:
    """`run_finished`'s decisions as an SQL condition on the task's and project's rows (aliases
    `task`, `project`) for a run ending with `status`: true when the end changes nothing but
    the run, its task and their activity entries — it is the task's latest run, no new attempt
    follows, no dependent waits to be released or cancelled, and no capped project waits for
    the slot — and nobody on the event bus listens to the run's or the task's end or its
    activity. The fast
    path of a run's end (`runs.pg_fastpath`) writes only then."""
    retryable = ", ".join(f"'{s}'" for s in sorted(RETRYABLE))
    task_listened = events.task_ended.listened_sql(
        source=f"{task}.source", task_id=f"{task}.id", status=status
    )
    return f"""{task}.latest_run_id = {run_id}
     AND ({status} NOT IN ({retryable})
          OR {task}.attempts - {task}.attempts_not_counted >= {task}.max_attempts)
     AND {project}.max_concurrent_runs IS NULL
     AND NOT EXISTS (SELECT 1 FROM task_dependencies d JOIN tasks b ON b.id = d.task_id
                     WHERE d.depends_on_id = {task}.id AND b.status = 'blocked')
     AND NOT ({task_listened})
     AND NOT ({events.run_ended.listened_sql(run_id=run_id)})
     AND NOT ({events.activity_recorded.listened_sql(project_id=f"{task}.project_id")})"""


def dispatch_at_creation(target: str, cap: int | None) -> bool | None:
    """Whether a new task's first run goes to the worker pool's queue as it is created: True
    (a pool task, no cap), False (an external executor claims it, or the machines' scheduler
    assigns it: `events.machine_run_queued`, which also applies a cap), None (a capped pool
    project: `dispatch` counts the busy runs)."""
    if target != POOL_TARGET:
        return False
    return True if cap is None else None


def queue_position(task: Task) -> int | None:
    """1-based place among the project's queued tasks (priority, then age); None if not queued."""
    if task.status != "queued":
        return None
    ahead = db.session.scalar(
        sa.select(sa.func.count(Task.id)).where(
            Task.project_id == task.project_id,
            Task.status == "queued",
            sa.or_(
                Task.priority_rank > task.priority_rank,
                sa.and_(Task.priority_rank == task.priority_rank, Task.id < task.id),
            ),
        )
    )
    return (ahead or 0) + 1


def queue_positions(tasks: list[Task]) -> dict[int, int]:
    """`queue_position` of every queued task in `tasks` (a page of a listing), in one query."""
    queued = [t.id for t in tasks if t.status == "queued"]
    if not queued:
        return {}
    place = sa.func.row_number().over(
        partition_by=Task.project_id, order_by=(Task.priority_rank.desc(), Task.id)
    )
    ranked = (
        sa.select(Task.id, place.label("place"))
        .where(
            Task.project_id.in_({t.project_id for t in tasks if t.status == "queued"}),
            Task.status == "queued",
        )
        .subquery()
    )
    rows = db.session.execute(sa.select(ranked.c.id, ranked.c.place).where(ranked.c.id.in_(queued)))
    return {task_id: place for task_id, place in rows}


def dispatch(project_id: int) -> list[int]:
    """Hand queued pool runs to the queue while the project has capacity (after commit)."""
    project = db.session.get(Project, project_id)
    if project is None:
        return []
    stmt = (
        sa.select(Run.id, Task.priority)
        .join(Task, Task.id == Run.task_id)
        .where(
            Run.project_id == project_id,
            Run.status == "queued",
            Run.dispatched_at.is_(None),
            Task.target == POOL_TARGET,
            Task.latest_run_id == Run.id,
        )
        .order_by(Task.priority_rank.desc(), Task.id)
    )
    if project.max_concurrent_runs is not None:
        busy = (
            db.session.scalar(
                sa.select(sa.func.count(Run.id)).where(
                    Run.project_id == project_id,
                    sa.or_(
                        Run.status.in_(OCCUPYING),
                        sa.and_(Run.status == "queued", Run.dispatched_at.is_not(None)),
                    ),
                )
            )
            or 0
        )
        free = project.max_concurrent_runs - busy
        if free <= 0:
            return []
        stmt = stmt.limit(free)
    picked = db.session.execute(stmt).all()
    if not picked:
        return []
    now = utcnow()
    db.session.execute(
        sa.update(Run)
        .where(Run.id.in_([r.id for r in picked]))
        .values(dispatched_at=now)
        .execution_options(synchronize_session=False)
    )
    for run_id, priority in picked:
        after_commit(lambda r=run_id, p=priority: enqueue(r, p))
    return [r.id for r in picked]


def enqueue(run_id: int, priority: str) -> None:
    """Put the run's job on its priority queue (with the transaction's notifications when they
    are being batched). Idempotent: the job only acts on a queued run."""
    if not pubsub.defer(lambda pipe: _enqueue(run_id, priority, pipe)):
        _enqueue(run_id, priority, None)


def _enqueue(run_id: int, priority: str, pipeline: Any) -> None:
    get_queue(queue_name(priority)).enqueue_call(
        "workers.jobs.execute_run",
        args=(run_id,),
        job_id=job_id(run_id),
        timeout=-1,
        # kept a minute: with 0, RQ deletes the finished job at once, which costs the worker
        # more Redis round trips than keeping it
        result_ttl=60,
        failure_ttl=24 * 3600,
        description=f"run {run_id}",
        pipeline=pipeline,
    )


def terminal(task: Task) -> bool:
    return task.status in TASK_TERMINAL


def rank(priority: str) -> int:
    return PRIORITY_RANK[priority]
