"""A run's start on PostgreSQL in one statement, for the plain case.

`service.mark_running` through the ORM is six round trips (BEGIN, the run, the subscriptions,
the activity rows, the task, COMMIT) between the agent's spawn and the moment its output is read,
which is most of a short run's time to completion. When no outbound subscription listens (the
ORM path then also makes deliveries), one autocommit statement makes the same changes: the run
`assigned → running`, its task `running`, the two activity rows. `tests/test_task_intake.py` holds
both paths to the same rows.
"""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy.orm.attributes import set_committed_value

from app.activity import service as activity
from app.extensions import db
from app.runs import live
from app.runs.models import Run
from app.tasks.models import Task
from app.timeutil import naive_utc, utcnow

_START = """
WITH listening AS (
  SELECT EXISTS (SELECT 1 FROM subscriptions s
                 WHERE s.active AND (s.project_id IS NULL OR s.project_id = %(project_id)s)) AS yes
), r AS (
  UPDATE runs SET status = 'running', started_at = %(now)s, pid = %(pid)s,
    agent_version = %(version)s, lease_expires_at = %(lease)s
  WHERE id = %(run_id)s AND status = 'assigned' AND executor = %(executor)s
    AND NOT (SELECT yes FROM listening)
  RETURNING id
), t AS (
  UPDATE tasks SET status = 'running', updated_at = %(now)s
  WHERE id = %(task_id)s AND %(task_changes)s AND EXISTS (SELECT 1 FROM r)
), a AS (
  INSERT INTO activities (project_id, kind, data, created_at)
  SELECT %(project_id)s, v.kind, v.data::json, %(now)s
  FROM r, (VALUES (1, 'run.status', %(run_data)s::text), (2, 'task.status', %(task_data)s::text))
       AS v(n, kind, data)
  WHERE v.data IS NOT NULL
  ORDER BY v.n
  RETURNING id, kind
)
SELECT (SELECT count(*) FROM r), (SELECT json_object_agg(kind, id) FROM a),
       (SELECT yes FROM listening)
"""


def start(
    run: Run, task: Task, *, pid: int | None, agent_version: str | None, lease_s: int
) -> bool | None:
    """Mark the run running as `service.mark_running` does: True, False when the run is no
    longer ours to start, None when this is not the plain case (nothing was written)."""
    now = utcnow()
    task_changes = task.latest_run_id == run.id and task.status != "running"
    run_data = {
        "run_id": run.id,
        "task_id": run.task_id,
        "attempt": run.attempt,
        "status": "running",
        "exit_code": run.exit_code,
    }
    task_data = {
        "task_id": task.id,
        "title": task.title,
        "status": "running",
        "reason": task.status_reason,
    }
    lease = now + timedelta(seconds=lease_s)
    conn = db.engine.raw_connection()
    driver = conn.driver_connection
    driver.autocommit = True  # one statement, its own transaction
    try:
        cursor = driver.cursor()
        cursor.execute(
            _START,
            {
                "now": naive_utc(now),
                "pid": pid,
                "version": agent_version,
                "lease": naive_utc(lease),
                "run_id": run.id,
                "executor": run.executor,
                "task_id": task.id,
                "task_changes": task_changes,
                "project_id": run.project_id,
                "run_data": json.dumps(run_data),
                "task_data": json.dumps(task_data) if task_changes else None,
            },
        )
        moved, ids, listening = cursor.fetchone()
        cursor.close()
    finally:
        driver.autocommit = False
        conn.close()
    if not moved:
        return None if listening else False
    # the loaded objects follow without a reload, as `_transition` keeps them
    for key, value in (
        ("status", "running"),
        ("started_at", now),
        ("pid", pid),
        ("agent_version", agent_version),
        ("lease_expires_at", lease),
    ):
        set_committed_value(run, key, value)
    if task_changes:
        set_committed_value(task, "status", "running")
        set_committed_value(task, "updated_at", now)
    channel = live.activity_channel()
    messages = [("run.status", run_data)] + ([("task.status", task_data)] if task_changes else [])
    with live.batched():  # as the ORM path sends them: the activity entries, then the status
        for kind, data in messages:
            live.publish(channel, activity.message(ids[kind], run.project_id, kind, data, now))
        live.run_status(run.id, "running")
    return True
