"""A run's take, start and end on PostgreSQL in one round trip each, for the plain case.

`take` (queued → assigned, with the run's task and project) is the first thing a worker does
with a job, and the agent's start waits on it. Through the ORM its one statement cost more CPU
than the round trip (the session, the result and the loading of three entities); here it is
sent as written and the three instances are built from the row and attached to the session as
if loaded, so the executor's later ORM writes (output batches, facts) work on them as before.

`service.mark_running` through the ORM is six round trips (BEGIN, the run, the subscriptions,
the activity rows, the task, COMMIT) between the agent's spawn and the moment its output is read,
which is most of a short run's time to completion. When no outbound subscription listens (the
ORM path then also makes deliveries), one autocommit statement makes the same changes: the run
`assigned → running`, its task `running`, the two activity rows. `tests/test_task_intake.py` holds
both paths to the same rows.

The end (`finish`) through the ORM was seven round trips and most of a worker's CPU per short run.
In the plain case (the agent exited by itself, no retry left or needed, no task waiting on this
one, no concurrency cap, no listening subscription, no parsed events) one transaction in one round
trip makes the same changes: the last output, the run's end, its task's end, the activity rows.
The executor writes an agent's start after its first tick; an agent gone by then (a short script)
has its start written by that same round trip, as `start` would have written it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm.attributes import set_committed_value

from app import events
from app.activity import service as activity
from app.database import as_loaded, autocommit, db
from app.live import pubsub
from app.projects.models import Project
from app.runs.models import RUN_ACTIVE, Run, status_in_sql
from app.runs.outcomes import Started, error_summary
from app.tasks import lifecycle
from app.tasks.models import Task
from app.timeutil import as_utc, naive_utc, utcnow

_TAKEN = (Run, Task, Project)

#: In a statement that is its own transaction, makes its commit asynchronous: PostgreSQL answers
#: without waiting for the WAL to reach the disk (0.1 to 0.4 ms here, more on slower disks).
#: Only for writes whose loss in a database crash the run state machine recovers from: an
#: assignment or a start that vanished leaves a queued or assigned run that the sweep dispatches
#: again, and the worker that lost it stops its agent when its next transition finds the run no
#: longer its own.
ASYNC_COMMIT = "(SELECT set_config('synchronous_commit', 'off', true)) = 'off'"


@functools.cache
def _take_sql() -> str:
    """`service._assigning` joined to the task and the project, every column of the three."""
    run_cols, task_cols, project_cols = (e.__table__.c for e in _TAKEN)
    selected = (
        [f'taken."{c.name}"' for c in run_cols]
        + [f'tasks."{c.name}"' for c in task_cols]
        + [f'projects."{c.name}"' for c in project_cols]
    )
    return f"""
WITH taken AS (
  UPDATE runs SET status = 'assigned', executor = %(executor)s, lease_expires_at = %(lease)s,
    token_hash = %(token_hash)s
  -- "IS TRUE" keeps PostgreSQL on the primary key (see service.status_in)
  WHERE id = %(run_id)s AND (status = 'queued') IS TRUE
    AND {ASYNC_COMMIT}
  RETURNING {", ".join(f'"{c.name}"' for c in run_cols)}
)
SELECT {", ".join(selected)}
FROM taken JOIN tasks ON tasks.id = taken.task_id JOIN projects ON projects.id = taken.project_id
"""


Loader = tuple[type, list[tuple[str, Callable[[Any], Any] | None]]]


@functools.cache
def _loaders(dialect: Any) -> list[Loader]:
    """Per entity, in the statement's column order: the attribute and the column type's result
    processing (UTC-aware times, JSON), as an ORM load would apply them."""
    return [
        (
            entity,
            [
                (
                    entity.__mapper__.get_property_by_column(c).key,
                    c.type.result_processor(dialect, None),
                )
                for c in entity.__table__.c
            ],
        )
        for entity in _TAKEN
    ]


@functools.cache
def _read_sql() -> str:
    """The run, its task and its project, every column of the three (as `_take_sql` returns
    them)."""
    selected = [f'{e.__tablename__}."{c.name}"' for e in _TAKEN for c in e.__table__.c]
    return f"""
SELECT {", ".join(selected)}
FROM runs JOIN tasks ON tasks.id = runs.task_id JOIN projects ON projects.id = runs.project_id
WHERE runs.id = %(run_id)s
"""


def read(run_id: int) -> tuple[Run, Task, Project] | None:
    """The run with its task and project, persistent in the session, in one round trip: a
    machine's reports read them on every start and end, and loading them through the ORM cost
    more than the statement."""
    with autocommit() as driver:
        cursor = driver.cursor()
        cursor.execute(_read_sql(), {"run_id": run_id})
        row = cursor.fetchone()
        cursor.close()
    return None if row is None else _attached(row)


def _attached(row: Any) -> tuple[Run, Task, Project]:
    """A row of the three entities' columns, as instances the ORM would have loaded."""
    session = db.session()
    values = iter(row)
    loaded: list[Any] = []
    for entity, columns in _loaders(db.engine.dialect):
        fields = {}
        for attr, process in columns:
            value = next(values)
            fields[attr] = process(value) if process is not None and value is not None else value
        loaded.append(as_loaded(session, entity, fields))
    return loaded[0], loaded[1], loaded[2]


def take(
    run_id: int, executor: str, lease_s: int, token_hash: str | None = None
) -> tuple[Run, Task, Project] | None:
    """`service.take` in one autocommit round trip: the run (now assigned to `executor`), its
    task and its project, persistent in the session; None when the run was not queued. It runs
    on a connection of its own: the caller's session must not hold the run's row locked."""
    lease = naive_utc(utcnow() + timedelta(seconds=lease_s))
    with autocommit() as driver:
        cursor = driver.cursor()
        cursor.execute(
            _take_sql(),
            {"run_id": run_id, "executor": executor, "lease": lease, "token_hash": token_hash},
        )
        row = cursor.fetchone()
        cursor.close()
    return None if row is None else _attached(row)


@functools.cache
def _start_sql(_bus: int) -> str:
    """The start's statement, asking the event bus whether anything listens to the project's
    activity (the argument: the bus's version, which a new listener changes)."""
    listened = events.activity_recorded.listened_sql(project_id="%(project_id)s")
    return f"""
WITH listening AS (
  SELECT ({listened}) AS yes
), r AS (
  UPDATE runs SET status = 'running', started_at = %(now)s, pid = %(pid)s,
    agent_version = %(version)s, lease_expires_at = %(lease)s
  -- "IS TRUE" keeps PostgreSQL on the primary key (see service.status_in)
  WHERE id = %(run_id)s AND (status = 'assigned') IS TRUE AND executor = %(executor)s
    AND NOT (SELECT yes FROM listening)
    AND {ASYNC_COMMIT}
  RETURNING id, stop_requested_at
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
  RETURNING id
)
SELECT (SELECT count(*) FROM r), (SELECT json_agg(id ORDER BY id) FROM a),
       (SELECT yes FROM listening), (SELECT stop_requested_at FROM r)
"""


def start(
    run: Run,
    task: Task,
    *,
    pid: int | None,
    agent_version: str | None,
    lease_s: int,
    at: datetime | None = None,
) -> bool | None:
    """Mark the run running as `service.mark_running` does: True, False when the run is no
    longer ours to start, None when this is not the plain case (nothing was written). The run's
    `stop_requested_at` is brought up to date (a stop asked for since it was taken)."""
    now = at or utcnow()
    run_data, task_data = _start_data(run, task)
    task_changes = task_data is not None
    lease = now + timedelta(seconds=lease_s)
    with autocommit() as driver:  # one statement, its own transaction
        cursor = driver.cursor()
        cursor.execute(
            _start_sql(events.activity_recorded.version),
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
                "task_data": json.dumps(task_data) if task_data is not None else None,
            },
        )
        moved, ids, listening, stop = cursor.fetchone()
        cursor.close()
    if not moved:
        return None if listening else False
    # the loaded objects follow without a reload, as `_transition` keeps them
    for key, value in (
        ("stop_requested_at", as_utc(stop) if stop is not None else None),
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
    _announce(run, _start_entries(run_data, task_data, now), ids, [("running", None)])
    return True


def _start_data(run: Run, task: Task) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The start's `run.status` entry, and its `task.status` entry when the task changes (its
    latest run starting, the task not running yet)."""
    run_data = lifecycle.run_status_data(run.id, run.task_id, run.attempt, "running", run.exit_code)
    if task.latest_run_id != run.id or task.status == "running":
        return run_data, None
    return run_data, lifecycle.task_status_data(task.id, task.title, "running", task.status_reason)


def _start_entries(
    run_data: dict[str, Any], task_data: dict[str, Any] | None, at: datetime
) -> list[tuple[str, dict[str, Any], datetime]]:
    entries = [("run.status", run_data, at)]
    if task_data is not None:
        entries.append(("task.status", task_data, at))
    return entries


def _announce(
    run: Run,
    entries: list[tuple[str, dict[str, Any], datetime]],
    ids: list[int],
    statuses: list[tuple[str, int | None]],
) -> None:
    """As the ORM path sends them after its commit: the activity entries (`ids` in the same
    order), then the run's status changes, in one round trip."""
    channel = pubsub.activity_channel()
    with pubsub.batched():
        for (kind, data, at), entry_id in zip(entries, ids, strict=True):
            pubsub.publish(channel, activity.message(entry_id, run.project_id, kind, data, at))
        for status, exit_code in statuses:
            pubsub.run_status(run.id, status, exit_code)


#: run columns an agent's output or the workspace may set at the end
END_VALUES = (
    "session_id",
    "model",
    "cost_usd",
    "input_tokens",
    "output_tokens",
    "branch",
    "commit_sha",
    "diff_stat",
)
_SETS = ",\n    ".join(f"{c} = CASE WHEN %(set_{c})s THEN %({c})s ELSE {c} END" for c in END_VALUES)
# The rows are locked first, in the ORM path's order (run, then task), each in its own
# statement: the end's statement then reads with a snapshot taken after the locks, so it sees a
# dependent that a concurrent creation committed while holding its lock on this task.
_LOCK_RUN = "SELECT id FROM runs WHERE id = %(run_id)s FOR UPDATE"
_LOCK_TASK = "SELECT id FROM tasks WHERE id = %(task_id)s FOR UPDATE"
_STARTED = """started_at = %(started_at)s, pid = %(pid)s, agent_version = %(version)s,
    """


def _end_sql(starting: bool) -> str:
    return _end_statement(
        starting,
        events.activity_recorded.version,
        events.task_ended.version,
        events.run_ended.version,
    )


@functools.cache
def _end_statement(starting: bool, *_bus: int) -> str:
    """The end's statement; `starting`: the run is still `assigned` (its agent exited before
    its start was written), and the start's changes and activity rows go with the end's. Plain
    when the lifecycle says the end is quiet (`lifecycle.ends_quietly_sql`); `_bus`: the event
    bus's versions, which a new listener changes."""
    runs_were = status_in_sql({"assigned"} if starting else RUN_ACTIVE)
    entries = [(3, "run.status", "run_data", "now"), (4, "task.status", "task_data", "now")]
    if starting:  # as `start` writes them, then the end's
        entries[:0] = [
            (1, "run.status", "start_run_data", "started_at"),
            (2, "task.status", "start_task_data", "started_at"),
        ]
    quiet = lifecycle.ends_quietly_sql(
        status="%(status)s", run_id="%(run_id)s", task="t", project="p"
    )
    rows = ",\n         ".join(
        f"({n}, '{kind}', %({data})s::text, %({at})s)" for n, kind, data, at in entries
    )
    return f"""
WITH plain AS (
  SELECT {quiet} AS yes
  FROM tasks t JOIN projects p ON p.id = t.project_id
  WHERE t.id = %(task_id)s
), r AS (
  UPDATE runs SET status = %(status)s, exit_code = %(exit_code)s, error_summary = %(summary)s,
    finished_at = %(now)s, lease_expires_at = NULL, log_size = log_size + %(log_size)s,
    event_count = event_count + %(event_n)s,
    {_STARTED if starting else ""}{_SETS}
  -- "IS TRUE" keeps PostgreSQL on the primary key (see service.status_in)
  WHERE id = %(run_id)s AND {runs_were}
    AND executor = %(executor)s AND log_size = %(log_offset)s
    AND event_count = %(event_offset)s AND (SELECT yes FROM plain)
  RETURNING id
), c AS (
  INSERT INTO run_log_chunks (run_id, "offset", size, data, created_at)
  SELECT id, %(log_offset)s, %(log_size)s, %(log)s, %(now)s FROM r WHERE %(log_size)s > 0
), e AS (
  INSERT INTO run_events (run_id, seq, type, data, created_at)
  SELECT r.id, %(event_offset)s + x.n, x.e ->> 0, x.e -> 1, %(now)s
  FROM r, json_array_elements(%(events)s::json) WITH ORDINALITY AS x(e, n)
), t AS (
  UPDATE tasks SET status = %(task_status)s, status_reason = %(summary)s, finished_at = %(now)s,
    updated_at = %(now)s
  WHERE id = %(task_id)s AND EXISTS (SELECT 1 FROM r)
), a AS (
  INSERT INTO activities (project_id, kind, data, created_at)
  SELECT %(project_id)s, v.kind, v.data::json, v.at
  FROM r, (VALUES {rows}) AS v(n, kind, data, at)
  WHERE v.data IS NOT NULL
  ORDER BY v.n
  RETURNING id
)
SELECT (SELECT count(*) FROM r), (SELECT json_agg(id ORDER BY id) FROM a)
"""


def finish(
    run: Run,
    task: Task,
    status: str,
    *,
    exit_code: int,
    log: tuple[int, bytes],
    values: dict[str, Any],
    events: list[tuple[str, dict[str, Any]]] | None = None,
    started: Started | None = None,
) -> bool:
    """End the run as `service.finish` does after an agent exited by itself (`status` is
    succeeded or failed), with its last output (`log`: offset, bytes), the events parsed from
    it (numbered after the run's `event_count`, as `service.add_events` numbers them) and the
    run columns its output or workspace set. False when this is not the plain case: nothing
    was written.

    `started`: the run is still `assigned`: its agent exited before the executor wrote its
    start (`service.mark_running`), which is then written with the end, as `start` writes it."""
    if set(values) - set(END_VALUES):
        return False
    now = utcnow()
    summary = error_summary(exit_code)
    task_status = lifecycle.TASK_FOR_RUN[status]
    run_data = lifecycle.run_status_data(run.id, run.task_id, run.attempt, status, exit_code)
    task_data = lifecycle.task_status_data(task.id, task.title, task_status, summary)
    offset, data = log
    entries = [("run.status", run_data, now), ("task.status", task_data, now)]
    statuses: list[tuple[str, int | None]] = [(status, exit_code)]
    start_params: dict[str, Any] = {}
    if started is not None:
        start_run, start_task = _start_data(run, task)
        start_params = {
            "started_at": naive_utc(started.at),
            "pid": started.pid,
            "version": started.version,
            "start_run_data": json.dumps(start_run),
            "start_task_data": json.dumps(start_task) if start_task is not None else None,
        }
        entries[:0] = _start_entries(start_run, start_task, started.at)
        statuses.insert(0, ("running", None))
    params: dict[str, Any] = {
        "run_id": run.id,
        "task_id": task.id,
        "project_id": run.project_id,
        "executor": run.executor,
        "status": status,
        "task_status": task_status,
        "exit_code": exit_code,
        "summary": summary,
        "now": naive_utc(now),
        "log_offset": offset,
        "log_size": len(data),
        "log": data,
        "event_offset": run.event_count,
        "event_n": len(events or ()),
        "events": json.dumps([[kind, value] for kind, value in events or ()]),
        "run_data": json.dumps(run_data),
        "task_data": json.dumps(task_data),
        **start_params,
    }
    for column in END_VALUES:
        params[f"set_{column}"] = column in values
        params[column] = values.get(column)
    with autocommit() as driver:  # the transaction is ours: BEGIN … COMMIT in one pipeline
        cursors = [driver.cursor() for _ in range(5)]
        with driver.pipeline():
            cursors[0].execute("BEGIN")
            cursors[1].execute(_LOCK_RUN, params)
            cursors[2].execute(_LOCK_TASK, params)
            cursors[3].execute(_end_sql(started is not None), params)
            cursors[4].execute("COMMIT")
        ended, ids = cursors[3].fetchone()
    if not ended:
        return False
    _announce(run, entries, ids, statuses)
    return True
