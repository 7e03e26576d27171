"""Task creation's hot path on PostgreSQL: the plain case in one statement.

Scripts and CI jobs create tasks by the thousand, nearly always in the plain case: a project the
caller develops in, a prompt, no dependencies, no idempotency key, no concurrency cap. The ORM
path (`service.create_task`) spent most of a creation in the unit of work for five objects and
nine statements. Here one statement decides (the caller, the project, the caller's role in it,
whether a subscription listens) and, in the plain case, writes the same rows: the task, its
first run, three activity entries and the audit entry. The queue position comes from
`task_queue_counts` (a few rows) instead of counting the queue. Deciding in SQL saves the round
trip of a separate read (a fifth of a creation's time here); the roles and abilities it checks
come from the modules that define them.

Anything outside the plain case returns None and the caller takes the ORM path, which stays the
one place that explains refusals. `tests/test_task_intake.py` holds both paths to the same rows,
notifications and response.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from app.activity import service as activity
from app.audit.redact import redact
from app.auth.abilities import abilities_for_role
from app.auth.service import LAST_USED_RESOLUTION
from app.extensions import autocommit, db, on_postgresql
from app.projects.models import PROJECT_ROLES
from app.projects.service import ROLE_RANK
from app.runs import live
from app.tasks import lifecycle
from app.tasks.models import PRIORITY_RANK, TaskQueueCount
from app.timeutil import naive_utc, utcnow
from app.users.models import ROLES as USER_ROLES

#: fields a plain creation may carry (anything else, e.g. `depends_on` with ids, is not plain)
PLAIN_FIELDS = frozenset(
    {"project", "title", "prompt", "agent", "target", "priority", "timeout_s", "max_attempts"}
    | {"loop", "config", "depends_on"}
)

# Who may create here, in SQL: `auth.service` (the caller and a personal access token as it accepts
# one), `auth.abilities` (roles holding runs:start or admin, passed in), `projects.service` (a
# developer of the project, or an admin) and the plain case's conditions. No row: not plain.
_CREATE = """
WITH caller AS (
  SELECT u.id, u.username, u.role, t.id AS pat_id, t.abilities::jsonb AS pat_abilities
  FROM users u
  LEFT JOIN personal_access_tokens t ON t.token_hash = %(token_hash)s AND t.user_id = u.id
  WHERE u.id = coalesce(
      %(user_id)s::integer,
      (SELECT user_id FROM personal_access_tokens WHERE token_hash = %(token_hash)s))
    AND u.is_active AND u.role = ANY(%(start_roles)s)
    -- a token the view would accept, holding runs:start, whose last use is recent enough not
    -- to be written again (the view writes it)
    AND (%(token_hash)s::text IS NULL OR (
      t.id IS NOT NULL AND t.revoked_at IS NULL
      AND (t.expires_at IS NULL OR t.expires_at > %(now)s)
      AND t.last_used_at >= %(used_since)s
      AND t.abilities::jsonb ? 'runs:start'))
), plan AS MATERIALIZED (
  SELECT c.id AS user_id, c.username, c.pat_id, p.id AS project_id,
         coalesce(%(agent)s::text, p.default_agent) AS agent,
         nextval(pg_get_serial_sequence('tasks', 'id')) AS task_id,
         nextval(pg_get_serial_sequence('runs', 'id')) AS run_id
  FROM caller c
  JOIN projects p ON p.key = %(project)s
  LEFT JOIN project_members m ON m.project_id = p.id AND m.user_id = c.id
  WHERE p.archived_at IS NULL
    AND ((c.role = ANY(%(admin_roles)s) AND (c.pat_id IS NULL OR c.pat_abilities ? 'admin'))
         OR m.role = ANY(%(developer_roles)s)) IS TRUE
    AND coalesce(%(agent)s::text, p.default_agent) = ANY(%(agents)s)
    AND (NOT %(pool)s OR p.max_concurrent_runs IS NULL)  -- a cap decides dispatch: the view
    AND NOT EXISTS (SELECT 1 FROM subscriptions s  -- deliveries are made by the view
                    WHERE s.active AND (s.project_id IS NULL OR s.project_id = p.id))
), t AS (
  INSERT INTO tasks (id, project_id, title, prompt, agent, target, priority, priority_rank,
    status, status_reason, timeout_s, max_attempts, attempts, loop, config, source, source_ref,
    creator_id, idempotency_key, latest_run_id, created_at, updated_at, finished_at)
  SELECT task_id, project_id, %(title)s, %(prompt)s, agent, %(target)s, %(priority)s, %(rank)s,
    'queued', NULL, %(timeout_s)s::integer, %(max_attempts)s, 1, %(loop)s::json,
    %(config)s::json, 'api', NULL, user_id, NULL, run_id, %(now)s, %(now)s, NULL
  FROM plan
), r AS (
  INSERT INTO runs (id, task_id, project_id, attempt, status, agent, queued_at, dispatched_at,
    log_size, event_count)
  SELECT run_id, task_id, project_id, 1, 'queued', agent, %(now)s,
    %(dispatched_at)s::timestamp, 0, 0
  FROM plan
), au AS (
  INSERT INTO audit_logs (created_at, actor_id, actor_name, via, action, target_type, target_id,
    request_id, ip, payload)
  SELECT %(now)s, user_id, username,
    CASE WHEN pat_id IS NULL THEN 'session' ELSE 'pat:' || pat_id END,
    'task.create', 'task', task_id::text, %(request_id)s, %(ip)s::text,
    json_build_object('project', %(audit_project)s::text, 'title', %(audit_title)s::text,
      'agent', (%(audit_agents)s::text[])[array_position(%(agents)s::text[], agent)],
      'target', %(target)s::text, 'priority', %(priority)s::text, 'depends_on', '[]'::json)
  FROM plan
), a AS (
  -- what `lifecycle.new_attempt` and `service.build_task` record for a new queued task
  INSERT INTO activities (project_id, kind, data, created_at)
  SELECT project_id, v.kind, v.data, %(now)s
  FROM plan, LATERAL (VALUES
    (1, 'run.status', json_build_object('run_id', run_id, 'task_id', task_id, 'attempt', 1,
                                        'status', 'queued', 'exit_code', NULL)),
    (2, 'task.status', json_build_object('task_id', task_id, 'title', %(title)s::text,
                                         'status', 'queued', 'reason', NULL)),
    (3, 'task.created', json_build_object('task_id', task_id, 'title', %(title)s::text,
                                          'agent', agent, 'status', 'queued',
                                          'priority', %(priority)s::text))
  ) AS v(n, kind, data)
  ORDER BY v.n
  RETURNING id, kind, data
)
SELECT task_id, run_id, user_id, agent, project_id,
       (SELECT json_agg(json_build_array(id, kind, data) ORDER BY id) FROM a),
       (SELECT coalesce(sum(queued), 0)::bigint FROM task_queue_counts q
          WHERE q.project_id = plan.project_id AND q.priority_rank >= %(rank)s)
FROM plan
"""

#: rows of database sessions that ended, folded into shard 0 (zero sums go)
_FOLD = """
WITH gone AS (
  DELETE FROM task_queue_counts
  WHERE shard <> 0 AND shard NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL)
  RETURNING project_id, priority_rank, queued
), folded AS (
  INSERT INTO task_queue_counts (project_id, priority_rank, shard, queued)
  SELECT project_id, priority_rank, 0, sum(queued) FROM gone GROUP BY project_id, priority_rank
  ON CONFLICT (project_id, priority_rank, shard)
  DO UPDATE SET queued = task_queue_counts.queued + excluded.queued
  RETURNING 1
)
SELECT count(*) FROM folded
"""


@dataclass(frozen=True)
class Caller:
    """Who asks: a session's user id (from its verified access token) or a personal access
    token's hash; and from where, as the audit trail records it."""

    user_id: int | None
    token_hash: str | None
    request_id: str
    ip: str | None


def supported() -> bool:
    return on_postgresql()


def fold_queue_counts() -> int:
    """Maintenance: fold the counts of ended database sessions (in the caller's transaction)."""
    if not supported():
        return 0
    folded = db.session.execute(sa.text(_FOLD)).scalar() or 0
    db.session.execute(
        sa.delete(TaskQueueCount).where(TaskQueueCount.shard == 0, TaskQueueCount.queued == 0)
    )
    return folded


def create(
    caller: Caller,
    data: dict[str, Any],
    agents: frozenset[str],
    admit: Callable[[int], bool] | None = None,
) -> dict[str, Any] | None:
    """Create a plain task (data as `TaskCreateSchema` loaded it): the task as `TaskSchema`
    reads it, or None when this is not the plain case or `admit(user_id)` (the write limit,
    asked only once the task is written but not committed) refuses; nothing was written then.

    Without `admit` the statement is its own transaction: one round trip. With it, the
    statement runs in a transaction that `admit`'s answer commits or rolls back."""
    target = data.get("target") or lifecycle.POOL_TARGET
    if (
        set(data) - PLAIN_FIELDS
        or data.get("depends_on")
        or data.get("source")
        or target not in (lifecycle.POOL_TARGET, "external")
    ):
        return None
    now = utcnow()
    params = _params(caller, data, target, agents, now)
    with autocommit() as driver:
        if admit is None:
            cursor = driver.cursor()
            cursor.execute(_CREATE, params)
            row = cursor.fetchone()
        else:
            begin, cursor = driver.cursor(), driver.cursor()
            with driver.pipeline():
                begin.execute("BEGIN")
                cursor.execute(_CREATE, params)
            row = cursor.fetchone()
            if row is not None and not admit(row[2]):
                row = None
            cursor.execute("COMMIT" if row is not None else "ROLLBACK")
        cursor.close()
    if row is None:
        return None
    task_id, run_id, user_id, agent, project_id, activities, ahead = row
    task = {
        "id": task_id,
        "project_id": project_id,
        "project": data["project"],
        "title": data["title"],
        "prompt": data["prompt"],
        "agent": agent,
        "target": target,
        "priority": params["priority"],
        "status": "queued",
        "status_reason": None,
        "depends_on": [],
        "timeout_s": data.get("timeout_s"),
        "max_attempts": params["max_attempts"],
        "attempts": 1,
        "loop": data.get("loop"),
        "config": data.get("config"),
        "source": "api",
        "source_ref": None,
        "creator_id": user_id,
        "latest_run_id": run_id,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
        "queue_position": int(ahead) + 1,
    }
    _after_commit(task, activities)
    return task


#: user roles whose abilities include starting runs, and being an admin (`auth.abilities`)
START_ROLES = [r for r in USER_ROLES if "runs:start" in abilities_for_role(r)]
ADMIN_ROLES = [r for r in USER_ROLES if "admin" in abilities_for_role(r)]
#: project roles that may create tasks
DEVELOPER_ROLES = [r for r in PROJECT_ROLES if ROLE_RANK[r] >= ROLE_RANK["developer"]]


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _params(
    caller: Caller, data: dict[str, Any], target: str, agents: frozenset[str], now: datetime
) -> dict[str, Any]:
    priority = data.get("priority") or "normal"
    known = sorted(agents)
    at = naive_utc(now)
    return {
        "user_id": caller.user_id,
        "token_hash": caller.token_hash,
        "now": at,
        "used_since": naive_utc(now - LAST_USED_RESOLUTION),
        "start_roles": START_ROLES,
        "admin_roles": ADMIN_ROLES,
        "developer_roles": DEVELOPER_ROLES,
        "project": data["project"],
        "agent": data.get("agent"),
        "agents": known,
        "pool": target == lifecycle.POOL_TARGET,
        "title": data["title"],
        "prompt": data["prompt"],
        "target": target,
        "priority": priority,
        "rank": PRIORITY_RANK[priority],
        "timeout_s": data.get("timeout_s"),
        "max_attempts": data.get("max_attempts") or 1,
        "loop": _json(data.get("loop")),
        "config": _json(data.get("config")),
        "dispatched_at": at if target == lifecycle.POOL_TARGET else None,
        "request_id": caller.request_id,
        "ip": caller.ip,
        # the audit entry's values, redacted as `audit.record` redacts them
        "audit_project": redact(data["project"]),
        "audit_title": redact(data["title"]),
        "audit_agents": [redact(a) for a in known],
    }


def _after_commit(task: dict[str, Any], activities: list[list[Any]]) -> None:
    """The notifications (the activity rows as written) and the job, in one round trip, as the
    ORM path sends them."""
    channel = live.activity_channel()
    with live.batched():
        for activity_id, kind, data in activities:
            live.publish(
                channel,
                activity.message(activity_id, task["project_id"], kind, data, task["created_at"]),
            )
        if task["target"] == lifecycle.POOL_TARGET:
            lifecycle.enqueue(task["latest_run_id"], task["priority"])
