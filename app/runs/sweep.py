"""The maintenance sweep: what makes a run always end, whatever happened to its executor.

- A run whose lease expired (its worker was killed, its machine vanished) becomes `lost`, and
  within the task's `max_attempts` a new attempt is queued.
- An external run past its timeout becomes `timed_out`.
- A dispatched run whose job vanished from Redis (Redis restarted) is enqueued again; the job only
  acts on a run that is still queued, so a duplicate is harmless.
- Projects with free capacity get their next queued runs.
- Webhook events nobody is matching get their drain job again; outbound deliveries that are due
  are queued (see app.webhooks and app.subscriptions).
Every step is a conditional update, so two sweeps at once do no harm.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import sqlalchemy as sa
from flask import current_app
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from app import events
from app.database import db
from app.queues import get_redis
from app.runs import service as runs
from app.runs.models import Run
from app.subscriptions import deliveries
from app.tasks import lifecycle, pg_fastpath
from app.tasks.models import Task
from app.timeutil import utcnow
from app.webhooks import receiving as webhooks

log = logging.getLogger(__name__)
#: a dispatched run may sit this long in a busy queue before we check that its job exists
REQUEUE_AFTER = timedelta(seconds=30)


def expire_leases() -> int:
    now = utcnow()
    expired = list(
        db.session.scalars(
            sa.select(Run.id).where(
                Run.status.in_(("assigned", "running", "waiting")), Run.lease_expires_at < now
            )
        )
    )
    for run_id in expired:
        log.warning("run %s: lease expired, marking lost", run_id)
        run = runs.finish(run_id, "lost", summary="lease expired: its executor stopped renewing it")
        events.lease_expired.send(run_id=run.id, executor=run.executor)
    return len(expired)


def executor_gone(executor: str, summary: str) -> int:
    """An executor is known to be dead (its supervisor saw its process exit): its runs are lost
    now, and retried as their tasks allow, instead of when their leases run out (the lease
    stays the backstop for a host that died whole). Its agents must be ended first."""
    held = list(
        db.session.scalars(
            sa.select(Run.id).where(
                Run.executor == executor, Run.status.in_(("assigned", "running", "waiting"))
            )
        )
    )
    for run_id in held:
        log.warning("run %s: %s", run_id, summary)
        runs.finish(run_id, "lost", summary=summary, executor=executor)
    return len(held)


def time_out_external() -> int:
    now = utcnow()
    rows = db.session.execute(
        sa.select(Run.id, Run.started_at, Task.timeout_s)
        .join(Task, Task.id == Run.task_id)
        .where(
            Task.target == "external",
            Run.status.in_(("running", "waiting")),
            Task.timeout_s.is_not(None),
        )
    ).all()
    count = 0
    for run_id, started, timeout in rows:
        if started is not None and now - started > timedelta(seconds=timeout):
            runs.finish(run_id, "timed_out", summary=f"timed out after {timeout}s")
            count += 1
    return count


def requeue_lost_jobs(older_than: timedelta = REQUEUE_AFTER) -> int:
    """Queue again the queued runs whose jobs Redis no longer has. The sweep waits
    `REQUEUE_AFTER` (a busy queue's job may be on its way); when Redis is known to have come
    back empty, the worker pool asks at once (`older_than` zero)."""
    cutoff = utcnow() - older_than
    rows = db.session.execute(
        sa.select(Run.id, Task.priority)
        .join(Task, Task.id == Run.task_id)
        .where(Run.status == "queued", Run.dispatched_at < cutoff)
    ).all()
    db.session.rollback()
    count = 0
    conn = get_redis()
    for run_id, priority in rows:
        try:
            status = Job.fetch(lifecycle.job_id(run_id), connection=conn).get_status()
        except NoSuchJobError:
            status = None
        if status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
            continue
        log.warning("run %s: its job is gone (%s); enqueueing again", run_id, status)
        lifecycle.enqueue(run_id, priority)
        count += 1
    return count


def dispatch_all() -> int:
    project_ids = list(
        db.session.scalars(
            sa.select(Run.project_id)
            .where(Run.status == "queued", Run.dispatched_at.is_(None))
            .distinct()
        )
    )
    picked = 0
    for project_id in project_ids:
        picked += len(lifecycle.dispatch(project_id))
        db.session.commit()
    return picked


RETENTION_LOCK = "sb:retention-lock"


def retention() -> dict[str, int]:
    """Once an hour (across all hosts): forget old finished webhook events and deliveries."""
    days = current_app.config["SWITCHBOARD_WEBHOOK_RETENTION_DAYS"]
    if days <= 0 or not get_redis().set(RETENTION_LOCK, "1", nx=True, ex=3600):
        return {}
    before = utcnow() - timedelta(days=days)
    return {
        "events_pruned": webhooks.prune(before),
        "deliveries_pruned": deliveries.prune(before),
    }


def sweep() -> dict[str, int]:
    events.maintenance_sweep.send()  # first: an offer a machine never took is not lost
    result = {
        "lost": expire_leases(),
        "timed_out": time_out_external(),
        "requeued": requeue_lost_jobs(),
        "dispatched": dispatch_all(),
        "events_kicked": webhooks.kick_stale(),
        "queue_counts_folded": pg_fastpath.fold_queue_counts(),
        **deliveries.sweep(),
    }
    db.session.commit()
    result.update(retention())
    return result
