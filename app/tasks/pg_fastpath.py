"""Task creation's hot path on PostgreSQL: the plain case in one read and one write.

Scripts and CI jobs create tasks by the thousand, nearly always in the plain case: a project the
caller develops in, a prompt, no dependencies, no idempotency key, no concurrency cap. The ORM
path (`service.create_task`) spent most of a creation in the unit of work for five objects and
nine statements. Here one read gathers everything the decision needs (the caller, the project,
the caller's role in it, whether a subscription listens, and the new ids), and one statement
writes the same rows: the task, its first run, three activity entries and the audit entry. The
queue position comes from `task_queue_counts` (a few rows) instead of counting the queue.

Creations that arrive in this process while another is being read and written are settled
together next, by the thread that asked first: one read for all of them, one write, one Redis
round trip (`app.combining`, `settle`). Under load a group holds a few creations and each costs
less CPU; alone, a creation takes the same three round trips as before. Writes in a process are
thus one at a time: the queue positions it answers never collide with each other (another
process's concurrent creations are counted once committed, as before).

Anything outside the plain case returns None and the caller takes the ORM path, which stays the
one place that explains refusals. `tests/test_task_intake.py` holds both paths to the same rows,
notifications and response.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app import events
from app.activity import service as activity
from app.audit.redact import redact
from app.auth import service as auth
from app.auth.abilities import abilities_for_role
from app.combining import Combiner
from app.database import autocommit, db, on_postgresql
from app.live import pubsub
from app.projects import service as projects
from app.tasks import lifecycle, limits, service
from app.tasks.models import PRIORITY_RANK, Task, TaskQueueCount
from app.timeutil import naive_utc, utcnow

log = logging.getLogger(__name__)

#: fields a plain creation may carry (anything else, e.g. `depends_on` with ids, is not plain)
PLAIN_FIELDS = frozenset(
    {"project", "title", "prompt", "agent", "target", "priority", "timeout_s", "max_attempts"}
    | {"loop", "config", "depends_on", "tty"}
)

_READ = """
SELECT u.username, u.role, u.is_active, p.id, p.key, p.default_agent, p.max_concurrent_runs,
       p.archived_at, m.role, {listened},
       nextval(pg_get_serial_sequence('tasks', 'id')),
       nextval(pg_get_serial_sequence('runs', 'id')),
       u.id, t.id, t.abilities, t.revoked_at IS NOT NULL, t.expires_at, t.last_used_at
FROM users u
JOIN projects p ON p.key = %(project)s
LEFT JOIN project_members m ON m.project_id = p.id AND m.user_id = u.id
LEFT JOIN personal_access_tokens t ON t.token_hash = %(token_hash)s AND t.user_id = u.id
WHERE u.id = coalesce(
  %(user_id)s::integer,
  (SELECT user_id FROM personal_access_tokens WHERE token_hash = %(token_hash)s)
)
"""

_WRITE = """
WITH t AS (
  INSERT INTO tasks (id, project_id, title, prompt, agent, target, priority, priority_rank,
    status, status_reason, timeout_s, max_attempts, attempts, loop, config, source, source_ref,
    creator_id, idempotency_key, latest_run_id, created_at, updated_at, finished_at)
  VALUES (%(task_id)s, %(project_id)s, %(title)s, %(prompt)s, %(agent)s, %(target)s,
    %(priority)s, %(rank)s, 'queued', NULL, %(timeout_s)s, %(max_attempts)s, 1, %(loop)s,
    %(config)s, 'api', NULL, %(user_id)s, NULL, %(run_id)s, %(now)s, %(now)s, NULL)
), r AS (
  INSERT INTO runs (id, task_id, project_id, attempt, status, agent, queued_at, dispatched_at,
    log_size, event_count)
  VALUES (%(run_id)s, %(task_id)s, %(project_id)s, 1, 'queued', %(agent)s, %(now)s,
    %(dispatched_at)s, 0, 0)
), au AS (
  INSERT INTO audit_logs (created_at, actor_id, actor_name, via, action, target_type, target_id,
    request_id, ip, payload)
  VALUES (%(now)s, %(user_id)s, %(username)s, %(via)s, 'task.create', 'task', %(task_key)s,
    %(request_id)s, %(ip)s, %(audit)s)
), a AS (
  INSERT INTO activities (project_id, kind, data, created_at)
  VALUES (%(project_id)s, 'run.status', %(run_status)s, %(now)s),
         (%(project_id)s, 'task.status', %(task_status)s, %(now)s),
         (%(project_id)s, 'task.created', %(task_created)s, %(now)s)
  RETURNING id, kind
)
SELECT (SELECT json_object_agg(kind, id) FROM a),
       (SELECT coalesce(sum(queued), 0)::bigint FROM task_queue_counts
          WHERE project_id = %(project_id)s AND priority_rank >= %(rank)s)
"""


@functools.cache
def _read_sql(_bus: int) -> str:
    """`_READ`, asking the event bus whether anything listens to the project's activity (the
    argument: the bus's version, which a new listener changes)."""
    return _READ.format(listened=events.activity_recorded.listened_sql(project_id="p.id"))


@functools.cache
def _read_many_sql(_bus: int) -> str:
    """`_read_sql` for several creations, in order (a creation whose caller or project is not
    found has a row of NULLs after its number)."""
    return (
        "SELECT q.n, r.* FROM unnest(%(projects)s::text[], %(user_ids)s::integer[],"
        " %(token_hashes)s::text[]) WITH ORDINALITY AS q(project, user_id, token_hash, n)"
        " LEFT JOIN LATERAL ("
        + _read_sql(_bus)
        .replace("%(project)s", "q.project")
        .replace("%(user_id)s::integer", "q.user_id")
        .replace("%(token_hash)s", "q.token_hash")
        + ") AS r ON true ORDER BY q.n"
    )


#: `_WRITE` for several tasks, given as one JSON array of their `_write_params` (dumping 24
#: arrays cost more than the rest of the write); the same rows written; per task, in order, its
#: activity ids and the queued tasks ahead of it (those counted, plus the group's own that come
#: first: higher priority, or the same and an older id).
_WRITE_MANY = """
WITH i AS (
  SELECT * FROM json_to_recordset(%(rows)s::json) AS i(n integer, task_id bigint, run_id bigint,
    project_id integer, title text, prompt text, agent text, target text, priority text,
    rank integer, timeout_s integer, max_attempts integer, loop json, config json,
    user_id integer, username text, via text, request_id text, ip text, now timestamp,
    dispatched_at timestamp, audit json, run_status json, task_status json, task_created json)
), t AS (
  INSERT INTO tasks (id, project_id, title, prompt, agent, target, priority, priority_rank,
    status, status_reason, timeout_s, max_attempts, attempts, loop, config, source, source_ref,
    creator_id, idempotency_key, latest_run_id, created_at, updated_at, finished_at)
  SELECT task_id, project_id, title, prompt, agent, target, priority, rank, 'queued', NULL,
    timeout_s, max_attempts, 1, loop, config, 'api', NULL, user_id, NULL, run_id, now, now,
    NULL
  FROM i ORDER BY n
), r AS (
  INSERT INTO runs (id, task_id, project_id, attempt, status, agent, queued_at, dispatched_at,
    log_size, event_count)
  SELECT run_id, task_id, project_id, 1, 'queued', agent, now, dispatched_at, 0, 0
  FROM i ORDER BY n
), au AS (
  INSERT INTO audit_logs (created_at, actor_id, actor_name, via, action, target_type, target_id,
    request_id, ip, payload)
  SELECT now, user_id, username, via, 'task.create', 'task', task_id::text, request_id, ip, audit
  FROM i ORDER BY n
), a AS (
  INSERT INTO activities (project_id, kind, data, created_at)
  SELECT i.project_id, k.kind, k.data, i.now
  FROM i CROSS JOIN LATERAL (VALUES (1, 'run.status', i.run_status),
    (2, 'task.status', i.task_status), (3, 'task.created', i.task_created)) AS k(o, kind, data)
  ORDER BY i.n, k.o
  RETURNING id, kind, (data ->> 'task_id')::bigint AS task_id
)
SELECT (SELECT json_object_agg(a.kind, a.id) FROM a WHERE a.task_id = i.task_id),
       (SELECT coalesce(sum(c.queued), 0)::bigint FROM task_queue_counts c
          WHERE c.project_id = i.project_id AND c.priority_rank >= i.rank)
       + (SELECT count(*) FROM i AS o
          WHERE o.project_id = i.project_id
            AND (o.rank > i.rank OR (o.rank = i.rank AND o.task_id < i.task_id)))
FROM i ORDER BY i.n
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
    admit: Callable[[int], bool] = lambda _user_id: True,
) -> dict[str, Any] | None:
    """Create a plain task (data as `TaskCreateSchema` loaded it): the task as `TaskSchema`
    reads it, or None when this is not the plain case or `admit(user_id)` (asked only when the
    task is about to be written) refuses; nothing was written then."""
    if (
        set(data) - PLAIN_FIELDS
        or data.get("depends_on")
        or data.get("source")
        or data.get("tty") is not None  # a terminal: rare, and written by the ORM path
    ):
        return None
    creation = Creation(caller, data, agents, admit)
    try:
        _combiner().submit(creation)
        if creation.error is not None:
            raise creation.error
        if not creation.settled:  # its group failed, surely unwritten: alone, errors and all
            with autocommit() as driver:
                settle(driver, [creation])
    except Exception as exc:
        if _maybe_written(creation, exc):
            raise
        raise NotWritten(str(exc)) from exc
    return creation.result()


class NotWritten(Exception):
    """The fast path failed with nothing written (a pooled connection that had died, say): the
    view may answer instead."""


def _maybe_written(creation: Creation, exc: BaseException) -> bool:
    """Whether a failed creation may have been written after all: its write was sent and the
    connection failed (any other error is PostgreSQL's refusal of the statement, which rolled it
    back). Such a creation is neither retried nor handed to the view: it could be made twice."""
    import psycopg

    return creation.sent and isinstance(exc, psycopg.OperationalError)


class Creation:
    """A creation asked for, then read and decided (`task` None: declined, nothing to write
    here), then written: the ids of its activity entries and the queued tasks ahead of it."""

    __slots__ = (
        "activities", "admit", "admitted", "agents", "caller", "data", "error", "params",
        "sent", "settled", "task", "written",
    )  # fmt: skip

    def __init__(
        self,
        caller: Caller,
        data: dict[str, Any],
        agents: frozenset[str],
        admit: Callable[[int], bool],
    ) -> None:
        self.caller = caller
        self.data = data
        self.agents = agents
        self.admit = admit
        self.admitted = False  # once admitted, a retry after a failed group does not count again
        self.task: dict[str, Any] | None = None
        self.activities: dict[str, dict[str, Any]] = {}
        self.params: dict[str, Any] = {}
        self.written: tuple[dict[str, int], int] | None = None
        self.sent = False  # its write was sent to the database
        self.settled = False
        self.error: BaseException | None = None

    def result(self) -> dict[str, Any] | None:
        if self.task is None or self.written is None:
            return None
        self.task["queue_position"] = self.written[1] + 1
        return self.task


def settle(driver: Any, group: list[Creation]) -> None:
    """Read, decide and write a group of creations: one statement each for all of them (the
    one-task statements for one), each its own transaction, as the view's read-then-write in
    READ COMMITTED would be; then their notifications and jobs in one Redis round trip. Raises
    what the database raised, with nothing written."""
    planned = []
    for c, row in zip(group, _read(driver, group), strict=True):
        task = _plan(c.caller, c.data, row, c.agents)
        if task is None or not (c.admitted or c.admit(task["creator_id"])):
            continue
        c.task, c.admitted = task, True
        c.activities = _activities(task)
        c.params = _write_params(c.caller, task, c.activities, row[0])
        planned.append(c)
    for c, (created, ahead) in zip(planned, _write(driver, planned), strict=True):
        c.written = created, int(ahead)
    for c in group:
        c.settled = True
    with pubsub.batched():
        for c in planned:
            assert c.task is not None and c.written is not None
            _after_commit(c.task, c.activities, c.written[0])


def _write(driver: Any, planned: list[Creation]) -> list[Any]:
    """Each planned creation's activity ids and queued tasks ahead, in order."""
    if not planned:
        return []
    for c in planned:
        c.sent = True
    cursor = driver.cursor()
    if len(planned) == 1:
        cursor.execute(_WRITE, _one_params(planned[0].params))
    else:
        cursor.execute(_WRITE_MANY, _many_params([c.params for c in planned]))
    rows = cursor.fetchall()
    cursor.close()
    return rows


def _read(driver: Any, group: list[Creation]) -> list[Any]:
    cursor = driver.cursor()
    if len(group) == 1:
        c = group[0]
        cursor.execute(
            _read_sql(events.activity_recorded.version),
            {
                "project": c.data["project"],
                "user_id": c.caller.user_id,
                "token_hash": c.caller.token_hash,
            },
        )
        rows = [cursor.fetchone()]
    else:
        cursor.execute(
            _read_many_sql(events.activity_recorded.version),
            {
                "projects": [c.data["project"] for c in group],
                "user_ids": [c.caller.user_id for c in group],
                "token_hashes": [c.caller.token_hash for c in group],
            },
        )
        # a creation whose caller or project is not found has a row of NULLs
        rows = [row[1:] if row[1] is not None else None for row in cursor.fetchall()]
    cursor.close()
    return rows


def settle_group(group: list[Creation]) -> None:
    """The combiner's write. A group that fails surely unwritten leaves every creation to its
    own thread, so that an error is met by the request that caused it; alone, or when the
    group may have been written, the error is handed over."""
    try:
        with autocommit() as driver:
            settle(driver, group)
    except Exception as exc:
        for creation in group:
            creation.task, creation.written, creation.settled = None, None, False
        if len(group) == 1 or _maybe_written(group[0], exc):
            for creation in group:
                creation.error = exc
        else:
            for creation in group:
                creation.sent = False
            log.info("a group of %d creations is written one by one: %s", len(group), exc)


def _combiner() -> Combiner[Creation]:
    """The app's: creations in this process that arrive during a write wait for it, and are
    written together next (one per app, as each app has its own database)."""
    extensions = current_app.extensions
    combiner = extensions.get("switchboard_creations")
    if combiner is None:
        combiner = extensions.setdefault("switchboard_creations", Combiner(settle_group))
    return combiner


def _plan(
    caller: Caller, data: dict[str, Any], row: Any, agents: frozenset[str]
) -> dict[str, Any] | None:
    """The task to write, if the caller may create it here and nothing else must happen."""
    if row is None:
        return None
    (_name, user_role, active, project_id, key, default_agent, cap, archived_at, member_role,
     listened, task_id, run_id, user_id, pat_id, pat_abilities, revoked, expires_at,
     last_used_at) = row  # fmt: skip
    abilities = abilities_for_role(user_role)
    via = "session"
    if caller.token_hash is not None:
        now = utcnow()
        if (
            pat_id is None
            or auth.pat_refusal(revoked, expires_at, now) is not None
            or auth.pat_touch_due(last_used_at, now)  # the view writes `last_used_at`
        ):
            return None
        abilities = auth.pat_abilities(user_role, pat_abilities)
        via = f"pat:{pat_id}"
    role = projects.role_from(projects.admin_by(user_role, abilities), member_role)
    agent = data.get("agent") or default_agent
    target = data.get("target") or lifecycle.POOL_TARGET
    if (
        not active
        or service.CREATE_ABILITY not in abilities
        or not projects.grants(role, service.CREATE_ROLE)
        or not projects.takes_tasks(archived_at)
        or listened  # a listener on the event bus acts in the ORM path
        or service.refusal(agent, target, agents) is not None
        or lifecycle.dispatch_at_creation(target, cap) is None  # the cap decides
    ):
        return None
    now = utcnow()
    priority = data.get("priority") or "normal"
    return {
        "id": task_id,
        "project_id": project_id,
        "project": key,
        "title": data["title"],
        "prompt": data["prompt"],
        "agent": agent,
        "target": target,
        "priority": priority,
        "status": "queued",
        "status_reason": None,
        "depends_on": [],
        "timeout_s": data.get("timeout_s"),
        "max_attempts": data.get("max_attempts") or 1,
        "attempts": 1,
        "loop": data.get("loop"),
        "config": data.get("config"),
        "tty": None,
        "source": "api",
        "source_ref": None,
        "creator_id": user_id,
        "via": via,
        "latest_run_id": run_id,
        "created_at": now,
        "updated_at": now,
        "finished_at": None,
    }


def _activities(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What `lifecycle.new_attempt` and `service.build_task` record for a new queued task."""
    return {
        "run.status": lifecycle.run_status_data(
            task["latest_run_id"], task["id"], 1, "queued", None
        ),
        "task.status": lifecycle.task_status_data(task["id"], task["title"], "queued", None),
        "task.created": lifecycle.task_created_data(
            task["id"], task["title"], task["agent"], "queued", task["priority"]
        ),
    }


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _write_params(
    caller: Caller, task: dict[str, Any], activities: dict[str, dict[str, Any]], username: str
) -> dict[str, Any]:
    now = naive_utc(task["created_at"])
    audit = service.creation_audit(
        task["project"], task["title"], task["agent"], task["target"], task["priority"], []
    )
    return {
        "task_id": task["id"],
        "run_id": task["latest_run_id"],
        "task_key": str(task["id"]),
        "project_id": task["project_id"],
        "title": task["title"],
        "prompt": task["prompt"],
        "agent": task["agent"],
        "target": task["target"],
        "priority": task["priority"],
        "rank": PRIORITY_RANK[task["priority"]],
        "timeout_s": task["timeout_s"],
        "max_attempts": task["max_attempts"],
        "loop": task["loop"],
        "config": task["config"],
        "user_id": task["creator_id"],
        "username": username,
        "via": task["via"],
        "request_id": caller.request_id,
        "ip": caller.ip,
        "now": now,
        "dispatched_at": now if lifecycle.dispatch_at_creation(task["target"], None) else None,
        "audit": redact(audit),
        "run_status": activities["run.status"],
        "task_status": activities["task.status"],
        "task_created": activities["task.created"],
    }


#: what `_write_params` holds as objects, that the database stores as JSON
_JSON_PARAMS = ("loop", "config", "audit", "run_status", "task_status", "task_created")


def _one_params(params: dict[str, Any]) -> dict[str, Any]:
    """`_write_params` as `_WRITE` reads them."""
    return {**params, **{name: _json(params[name]) for name in _JSON_PARAMS}}


def _many_params(rows: list[dict[str, Any]]) -> dict[str, str]:
    """`_write_params` of several tasks as `_WRITE_MANY` reads them."""
    return {
        "rows": json.dumps(
            [
                {**row, "n": n, "now": row["now"].isoformat(), "dispatched_at": _iso(row)}
                for n, row in enumerate(rows)
            ]  # as `_json` writes them: the JSON columns keep the same text
        )
    }


def _iso(row: dict[str, Any]) -> str | None:
    return None if row["dispatched_at"] is None else row["dispatched_at"].isoformat()


def _after_commit(
    task: dict[str, Any], activities: dict[str, dict[str, Any]], activity_ids: dict[str, int]
) -> None:
    """The notifications and the job, in one round trip, as the ORM path sends them."""
    channel = pubsub.activity_channel()
    with pubsub.batched():
        for kind, data in activities.items():
            pubsub.publish(
                channel,
                activity.message(
                    activity_ids[kind], task["project_id"], kind, data, task["created_at"]
                ),
            )
        if lifecycle.dispatch_at_creation(task["target"], None):
            lifecycle.enqueue(task["latest_run_id"], task["priority"])
        elif limits.for_machines(task["target"]):
            _offer_to_machines(task)


def _offer_to_machines(task: dict[str, Any]) -> None:
    """A machine with a free slot may take the new run now (in a transaction of its own: the
    creation is committed); the answer says why the task waits if none does. Should that fail,
    the task is created all the same and waits for the next scheduling pass (a freed slot, a
    machine's heartbeat, the sweep)."""
    run_id = task["latest_run_id"]
    try:
        events.machine_run_queued.send(run_id=run_id, committed=True)
        task["status_reason"] = db.session.scalar(
            sa.select(Task.status_reason).where(Task.id == task["id"])
        )
    except Exception:
        log.exception("run %s was created; assigning it to a machine failed", run_id)
