"""Runs: one attempt at a task, executed by exactly one executor holding a lease.

Every transition is a conditional UPDATE on the run's current status, so concurrent actors (the
executor finishing, a person stopping it, the sweep expiring its lease) cannot both win.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import joinedload
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from app import events
from app.auth.service import Principal
from app.database import after_commit, db, on_postgresql
from app.errors import Conflict, Forbidden, NotFound
from app.live import pubsub
from app.pagination import Page, paginate
from app.projects import service as projects
from app.projects.models import Project
from app.runs import logs, pg_fastpath
from app.runs.models import RUN_ACTIVE, RUN_TERMINAL, Run, RunChange, RunEvent, status_in
from app.runs.outcomes import Started, error_summary
from app.runs.redaction import Redactor
from app.tasks import lifecycle
from app.tasks.models import Task
from app.timeutil import utcnow
from app.vault import service as vault


def get_run(run_id: int, *, with_project: bool = False) -> Run:
    """`with_project`: its project loaded in the same query (to authorise a read of it)."""
    options = [joinedload(Run.project)] if with_project else []
    run = db.session.get(Run, run_id, options=options)
    if run is None:
        raise NotFound(f"No run {run_id}.")
    return run


def run_for(principal: Principal, run_id: int, role: str = "viewer") -> Run:
    """The run, with its project, if `principal` holds `role` in that project: 403 for another
    run's token, 404 when the project is not theirs to see (as if the run did not exist)."""
    if not principal.reaches(run_id=run_id):
        raise Forbidden("A run token reaches only its own run.")
    run = get_run(run_id, with_project=True)
    try:
        projects.authorize(principal, run.project, role)
    except NotFound:
        raise NotFound(f"No run {run_id}.") from None
    return run


def get_run_and_task(run_id: int) -> tuple[Run, Task] | None:
    """The run and its task in one query (a start or an end writes both); on PostgreSQL read
    by hand (`runs.pg_fastpath.read`)."""
    if on_postgresql():
        found = pg_fastpath.read(run_id)
        return None if found is None else (found[0], found[1])
    row = db.session.execute(
        sa.select(Run, Task).join(Task, Task.id == Run.task_id).where(Run.id == run_id)
    ).one_or_none()
    return None if row is None else (row[0], row[1])


def list_runs(
    project_ids: list[int] | None,
    *,
    task_id: int | None = None,
    status: str | None = None,
    executor: str | None = None,
    executor_is: str | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> Page[Run]:
    """`executor`: runs whose executor starts with it (`pool:`); `executor_is`: exactly it."""
    stmt = sa.select(Run)
    if project_ids is not None:
        stmt = stmt.where(Run.project_id.in_(project_ids))
    if task_id is not None:
        stmt = stmt.where(Run.task_id == task_id)
    if status:
        stmt = stmt.where(Run.status == status)
    if executor:
        stmt = stmt.where(Run.executor.startswith(executor))
    if executor_is:
        stmt = stmt.where(Run.executor == executor_is)
    return paginate(stmt, Run.id, cursor=cursor, limit=limit)


def _transition(
    run_id: int, from_statuses: frozenset[str] | set[str], held_by: str | None, **values: Any
) -> bool:
    stmt = sa.update(Run).where(Run.id == run_id, status_in(from_statuses))
    if held_by is not None:
        stmt = stmt.where(Run.executor == held_by)
    moved = db.session.execute(
        stmt.values(**values).execution_options(synchronize_session=False)
    ).rowcount
    if moved != 1:
        return False
    # keep a loaded instance in step without reloading it (or dirtying it)
    run = db.session.identity_map.get(identity_key(Run, run_id))
    if run is not None:
        for key, value in values.items():
            set_committed_value(run, key, value)
    return True


def _assigning(run_id: Any, executor: Any, lease: Any, token_hash: Any) -> sa.Update:
    """queued → assigned (values or bound parameters); `token_hash`: the run token's digest
    (None: the executor hands out no token)."""
    return (
        sa.update(Run)
        .where(Run.id == run_id, status_in(("queued",)))
        .values(status="assigned", executor=executor, lease_expires_at=lease, token_hash=token_hash)
    )


def assign(run_id: int, executor: str, lease_s: int, token_hash: str | None = None) -> Run | None:
    """An executor takes a queued run. None when someone else already has it (or it ended)."""
    lease = utcnow() + timedelta(seconds=lease_s)
    run = db.session.execute(
        _assigning(run_id, executor, lease, token_hash).returning(Run),
        execution_options={"populate_existing": True},
    ).scalar_one_or_none()
    if run is not None:  # heard by the run's streams and by clients waiting on it
        after_commit(lambda: pubsub.run_status(run_id, "assigned"))
    db.session.commit()
    return run


def take(
    run_id: int, executor: str, lease_s: int, token_hash: str | None = None
) -> tuple[Run, Task, Project] | None:
    """The worker pool's `assign`: the run with its task and project. On PostgreSQL one
    statement (an UPDATE … RETURNING joined to both, `runs.pg_fastpath.take`): the agent's start
    waits on it."""
    if not on_postgresql():  # SQLite has no UPDATE in a WITH
        run = assign(run_id, executor, lease_s, token_hash)
        if run is None:
            return None
        task, project = db.session.execute(
            sa.select(Task, Project)
            .join(Project, Project.id == Task.project_id)
            .where(Task.id == run.task_id)
        ).one()
        return run, task, project
    return pg_fastpath.take(run_id, executor, lease_s, token_hash)


def mark_running(
    run: Run,
    *,
    pid: int | None,
    agent_version: str | None,
    lease_s: int,
    task: Task | None = None,
    at: datetime | None = None,
) -> bool:
    """assigned -> running (False when the run is no longer ours); `at`: when the agent started,
    if not now. The run's `stop_requested_at` is brought up to date, so an executor that
    subscribed to stop requests before this misses none. With its `task` loaded, the plain case
    is one statement on PostgreSQL (`runs.pg_fastpath`)."""
    if task is not None and on_postgresql():
        started = pg_fastpath.start(
            run, task, pid=pid, agent_version=agent_version, lease_s=lease_s, at=at
        )
        if started is not None:
            return started
    now = at or utcnow()
    if not _transition(
        run.id,
        {"assigned"},
        run.executor,
        status="running",
        started_at=now,
        pid=pid,
        agent_version=agent_version,
        lease_expires_at=now + timedelta(seconds=lease_s),
    ):
        db.session.rollback()
        return False
    stop = db.session.scalar(sa.select(Run.stop_requested_at).where(Run.id == run.id))
    set_committed_value(run, "stop_requested_at", stop)
    lifecycle.run_changed(run)
    after_commit(lambda: pubsub.run_status(run.id, "running"))  # with the activity messages
    db.session.commit()
    return True


def renew_lease(run_id: int, executor: str, lease_s: int) -> tuple[bool, bool]:
    """Extend the lease. Returns (still ours, stop requested)."""
    ok = _transition(
        run_id, RUN_ACTIVE, executor, lease_expires_at=utcnow() + timedelta(seconds=lease_s)
    )
    stop = db.session.scalar(sa.select(Run.stop_requested_at).where(Run.id == run_id))
    db.session.commit()
    return ok, stop is not None


def append_log(run: Run, offset: int, data: bytes, *, commit: bool = True) -> logs.Appended | None:
    appended = logs.append(run, offset, data)
    if commit:
        db.session.commit()
    return appended


def add_events(run: Run, events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Store events with consecutive `seq` numbers (in the current transaction)."""
    if not events:
        return []
    first = run.event_count + 1
    moved = db.session.execute(
        sa.update(Run)
        .where(Run.id == run.id, Run.event_count == run.event_count)
        .values(event_count=run.event_count + len(events))
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved != 1:
        db.session.refresh(run)
        return add_events(run, events)
    run.event_count += len(events)
    out = []
    now = utcnow()
    for i, (kind, data) in enumerate(events):
        db.session.add(RunEvent(run_id=run.id, seq=first + i, type=kind, data=data, created_at=now))
        out.append({"seq": first + i, "type": kind, "data": data})
    return out


def add_event_at(run: Run, seq: int, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """An executor's event numbered by the executor (it resends after a reconnect): stored when
    it is the next one, None when it is stored already; a gap is 409 with the next `seq`."""
    if seq <= run.event_count:
        return None
    if seq != run.event_count + 1:
        raise Conflict(
            f"Run {run.id} expects event {run.event_count + 1}, not {seq}.",
            expected_seq=run.event_count + 1,
        )
    return add_events(run, [(kind, data)])[0]


def held(run: Run, executor: str, lease_s: int) -> Run:
    """`run`, if `executor` holds it and it is active (409 otherwise); its start is written on
    the executor's first report when the executor did not say it started."""
    if run.executor != executor:
        raise Conflict(f"Run {run.id} is not held by {executor!r}.", executor=run.executor)
    if run.status in RUN_TERMINAL:
        raise Conflict(f"Run {run.id} already ended ({run.status}).")
    if run.status == "assigned":
        mark_running(run, pid=None, agent_version=None, lease_s=lease_s)
    return run


def report_event(run: Run, kind: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event an agent (or a developer) reports on an active run, its project's secret
    values masked as in the agent's output."""
    if run.status not in RUN_ACTIVE:
        raise Conflict(f"Run {run.id} has ended ({run.status}); it takes no more events.")
    redactor = Redactor.of(vault.values_for(run.project_id).values())
    if redactor is not None:
        data = redactor.mask_json(data)
    stored = add_events(run, [(kind, data)])
    db.session.commit()
    pubsub.run_events(run.id, stored)
    return {**stored[0], "created_at": utcnow()}


def list_events(
    run: Run, *, after_seq: int | None, limit: int, kind: str | None = None
) -> tuple[list[RunEvent], int | None]:
    stmt = sa.select(RunEvent).where(RunEvent.run_id == run.id)
    if after_seq:
        stmt = stmt.where(RunEvent.seq > after_seq)
    if kind:
        stmt = stmt.where(RunEvent.type == kind)
    rows = list(db.session.scalars(stmt.order_by(RunEvent.seq).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].seq if more and rows else None)


def record_change(run_id: int, change: dict[str, Any]) -> None:
    """What a repo run changed (`workers.workspace.Change`), kept when it ends."""
    db.session.merge(RunChange(run_id=run_id, **change))
    db.session.commit()


def get_change(run: Run) -> RunChange:
    change = db.session.get(RunChange, run.id)
    if change is None:
        project = run.project
        why = (
            "its project has no repository"
            if not project.repo_url
            else "it changed nothing, or did not succeed"
        )
        raise NotFound(f"Run {run.id} has no recorded change: {why}.")
    return change


def set_waiting(run: Run, waiting: bool) -> bool:
    """A run asking a person something waits (running → waiting), and goes on when nothing is
    left to answer (waiting → running), keeping its executor, its lease and its slot; its task
    follows. In the caller's transaction; False when the run was not in the state to leave."""
    before, after = ("running", "waiting") if waiting else ("waiting", "running")
    if not _transition(run.id, {before}, None, status=after):
        return False
    lifecycle.run_changed(run)
    after_commit(lambda: pubsub.run_status(run.id, after))
    return True


def finish(
    run_id: int,
    status: str,
    *,
    exit_code: int | None = None,
    summary: str | None = None,
    executor: str | None = None,
    requeue: bool = False,
    **extra: Any,
) -> Run:
    """End a run (idempotent: a run that already ended keeps its first ending). Commits the
    caller's pending writes with it, so a run's last output and its end are one transaction.

    `requeue`: the run was interrupted through no fault of its own (its worker shut down), so a
    new attempt is queued whatever `max_attempts` says."""
    assert status in RUN_TERMINAL, status
    if summary is None and exit_code is not None:
        summary = error_summary(exit_code)
    ended = _transition(
        run_id,
        RUN_ACTIVE,
        executor,
        status=status,
        exit_code=exit_code,
        error_summary=summary[:1000] if summary else None,
        finished_at=utcnow(),
        lease_expires_at=None,
        **extra,
    )
    if not ended:
        db.session.commit()  # whatever else the caller wrote (its last log lines) stays
        run = get_run(run_id)
        db.session.refresh(run)
        return run
    run = get_run(run_id)
    lifecycle.run_finished(run, requeue=requeue)
    status, code = run.status, run.exit_code
    after_commit(lambda: pubsub.run_status(run_id, status, code))  # with the activity messages
    db.session.commit()
    return run


def finish_exited(
    run: Run,
    task: Task,
    *,
    exit_code: int,
    log: tuple[int, bytes],
    values: dict[str, Any],
    events: list[tuple[str, dict[str, Any]]],
    started: Started | None = None,
) -> bool:
    """End a run whose agent exited by itself, with its last output (`log`: offset, bytes), the
    events parsed from it and the run columns its output or workspace set (a claude run's
    session, model, cost and tokens), in one round trip where that applies: on PostgreSQL, when
    the lifecycle finds the end quiet (`runs.pg_fastpath.finish`). False when it does not
    apply: nothing was written, and the caller stores its output and calls `finish`.
    `started`: the agent's start, if not written yet, goes with the end."""
    if not on_postgresql() or values.get("review"):
        return False  # a change to review: the task's status is the lifecycle's to decide
    return pg_fastpath.finish(
        run,
        task,
        exited_status(exit_code),
        exit_code=exit_code,
        log=log,
        values=values,
        events=events,
        started=started,
    )


def exited_status(exit_code: int) -> str:
    """A run's status when its agent exited by itself."""
    return "succeeded" if exit_code == 0 else "failed"


def request_stop(run: Run) -> Run:
    """Stop a run: one that no executor holds ends at once; otherwise its executor is told
    (pub/sub now, lease renewal as a fallback) and ends it with TERM, grace, KILL."""
    if run.status in RUN_TERMINAL:
        raise Conflict(f"Run {run.id} already ended ({run.status}).")
    if run.status == "queued":
        return finish(run.id, "cancelled", summary="stopped before it started")
    if run.stop_requested_at is None:
        run.stop_requested_at = utcnow()
        events.run_stop_requested.send(run=run)
        db.session.commit()
    pubsub.request_stop(run.id)
    return run


def delete_run(run: Run) -> None:
    if run.status not in RUN_TERMINAL:
        raise Conflict(f"Run {run.id} is {run.status}; stop it first.")
    task = db.session.get(Task, run.task_id)
    if task is not None and task.latest_run_id == run.id:
        task.latest_run_id = db.session.scalar(
            sa.select(sa.func.max(Run.id)).where(Run.task_id == run.task_id, Run.id != run.id)
        )
    db.session.delete(run)
    db.session.commit()
