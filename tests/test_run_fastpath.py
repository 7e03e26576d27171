"""A run's take, start and end on PostgreSQL in one round trip each (`app/runs/pg_fastpath.py`)
must write what the ORM path writes, and leave to it everything outside the plain case."""

from __future__ import annotations

import time
from datetime import UTC
from typing import Any

import pytest
import sqlalchemy as sa
from fastpaths import deliveries, hear, post_task, queue_counts, rows, subscribe
from flask import Flask
from flask.testing import FlaskClient
from helpers import Account, account


@pytest.mark.postgres
def test_a_runs_start_in_one_statement_matches_the_orm_path(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`runs.pg_fastpath.start` (the worker's mark_running on PostgreSQL) writes and sends what the
    ORM path does, and leaves the case with a listening subscription to it."""
    from app.database import db
    from app.live import pubsub
    from app.queues import get_redis
    from app.runs import pg_fastpath
    from app.runs import service as runs
    from app.tasks.models import Task

    body = {"project": "demo", "title": "t", "prompt": "p"}
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(3)]

    def start(task_id: int, fast: bool) -> bool:
        with app.app_context():
            run_id = db.session.get(Task, task_id).latest_run_id
            run, task, _project = runs.take(run_id, "e1", 30)
            try:
                return runs.mark_running(
                    run, pid=4242, agent_version="bash 5", lease_s=30, task=task if fast else None
                )
            finally:
                db.session.remove()

    with app.app_context():
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel())
    assert [start(ids[0], True), start(ids[1], False)] == [True, True]
    a, b = (rows(app, i) for i in ids[:2])
    for r in (a, b):
        assert (r["run"]["status"], r["run"]["pid"], r["run"]["agent_version"]) == (
            "running",
            4242,
            "bash 5",
        )
        assert r["run"]["started_at"] is not None and r["task"]["status"] == "running"
        r["run"].pop("started_at"), r["run"].pop("lease_expires_at")
    assert a == b
    kept, counted = queue_counts(app)
    assert kept == counted  # the third task is still queued; the trigger followed both starts
    heard = [m for _channel, m in hear(listener, 4)]
    assert [(m["kind"], m["data"]["status"], m["data"]["task_id"]) for m in heard] == [
        ("run.status", "running", ids[0]),
        ("task.status", "running", ids[0]),
        ("run.status", "running", ids[1]),
        ("task.status", "running", ids[1]),
    ]

    # a listening subscription: the one statement writes nothing and the ORM path takes over
    admin_headers = account(app, client, "root", "admin").headers
    sub = subscribe(app, client, admin_headers, "run.started", monkeypatch)
    with app.app_context():
        run_id = db.session.get(Task, ids[2]).latest_run_id
        run, task, _project = runs.take(run_id, "e1", 30)
        assert pg_fastpath.start(run, task, pid=1, agent_version=None, lease_s=30) is None
        assert runs.mark_running(run, pid=1, agent_version=None, lease_s=30, task=task)
        db.session.remove()
    assert deliveries(client, admin_headers, sub) == ["run.started"]


@pytest.mark.postgres
def test_a_take_in_one_round_trip_loads_what_the_orm_would(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """`runs.pg_fastpath.take` builds the run, its task and its project from one row: they must
    equal what the ORM loads (UTC-aware times, JSON, every column), be persistent in the session
    (the executor's output batches and facts are ORM writes on them), and a second take gets
    None."""
    from sqlalchemy.orm import object_session

    from app.database import db
    from app.projects.models import Project
    from app.runs import pg_fastpath
    from app.runs.models import Run
    from app.tasks.models import Task

    body = {
        "project": "demo",
        "title": "t",
        "prompt": "p",
        "priority": "high",
        "timeout_s": 90,
        "max_attempts": 2,
        "config": {"env": {"A": "1"}},
        "loop": {"max_iterations": 3, "done_marker": "DONE"},
    }
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(2)]

    def columns(instance: Any) -> dict[str, Any]:
        return {c.key: getattr(instance, c.key) for c in sa.inspect(type(instance)).column_attrs}

    with app.app_context():
        run_id = db.session.get(Task, ids[0]).latest_run_id
        db.session.remove()
        taken = pg_fastpath.take(run_id, "e1", 30, "d" * 64)
        assert taken is not None
        fast = [columns(i) for i in taken]
        assert all(object_session(i) is db.session() and not db.session.dirty for i in taken)
        run = taken[0]
        assert (run.status, run.executor, run.lease_expires_at.tzinfo) == ("assigned", "e1", UTC)
        assert run.token_hash == "d" * 64
        run.model = "m-1"  # a fact from the agent's output, written as the executor does
        db.session.commit()
        db.session.remove()
        loaded = [
            db.session.get(entity, instance["id"])
            for entity, instance in zip((Run, Task, Project), fast, strict=True)
        ]
        assert loaded[0].model == "m-1"
        fast[0]["model"] = "m-1"
        assert [columns(i) for i in loaded] == fast
        assert fast[1]["config"] == {"env": {"A": "1"}} and fast[1]["loop"]["done_marker"]
        assert pg_fastpath.take(run_id, "e2", 30) is None  # taken already
        db.session.remove()

        # a session that holds the run already gets that instance, brought up to date
        other = db.session.get(Task, ids[1]).latest_run_id
        held = db.session.get(Run, other)
        taken = pg_fastpath.take(other, "e1", 30)
        assert taken is not None and taken[0] is held and held.status == "assigned"
        assert not db.session.dirty
        db.session.remove()


def started(app: Flask, task_id: int) -> int:
    """Take and start the task's run as executor e1; its id."""
    from app.database import db
    from app.runs import service as runs
    from app.tasks.models import Task

    with app.app_context():
        run, task, _project = runs.take(db.session.get(Task, task_id).latest_run_id, "e1", 30)
        assert runs.mark_running(run, pid=4242, agent_version=None, lease_s=30, task=task)
        db.session.remove()
        return run.id


def end_fast(
    app: Flask,
    run_id: int,
    code: int,
    log: tuple[int, bytes],
    meanwhile: str = "",
    events: list | None = None,
    **values: Any,
) -> bool:
    """`pg_fastpath.finish` as the worker calls it, with the run and task it loaded; `meanwhile`:
    SQL that changes the run (:i) after they were loaded."""
    from app.database import db
    from app.runs import pg_fastpath
    from app.runs.models import Run
    from app.tasks.models import Task

    with app.app_context():
        run = db.session.get(Run, run_id)
        task = db.session.get(Task, run.task_id)
        db.session.commit()
        if meanwhile:
            with db.engine.begin() as conn:
                conn.execute(sa.text(meanwhile), {"i": run_id})
        status = "succeeded" if code == 0 else "failed"
        try:
            return pg_fastpath.finish(
                run, task, status, exit_code=code, log=log, values=values, events=events
            )
        finally:
            db.session.remove()


def end_orm(
    app: Flask,
    run_id: int,
    code: int,
    log: tuple[int, bytes],
    events: list | None = None,
    **values: Any,
) -> None:
    """What the executor does when the end is not the plain case."""
    from app.database import db
    from app.runs import service as runs

    with app.app_context():
        run = runs.get_run(run_id)
        runs.append_log(run, log[0], log[1], commit=False)
        runs.add_events(run, events or [])
        extra = {k: values.pop(k) for k in ("branch", "commit_sha", "diff_stat") if k in values}
        for key, value in values.items():
            setattr(run, key, value)
        status = "succeeded" if code == 0 else "failed"
        runs.finish(run_id, status, exit_code=code, executor="e1", **extra)
        db.session.remove()


def ended_rows(app: Flask, task_id: int) -> dict[str, Any]:
    from app.database import db

    found = rows(app, task_id)
    for key in ("started_at", "finished_at", "lease_expires_at"):
        found["run"].pop(key)
    found["task"].pop("finished_at")
    with app.app_context(), db.engine.connect() as conn:
        found["log"] = conn.execute(
            sa.text(
                "SELECT c.offset, c.size, c.data FROM run_log_chunks c JOIN runs r"
                " ON r.id = c.run_id WHERE r.task_id = :i ORDER BY c.offset"
            ),
            {"i": task_id},
        ).all()
        found["events"] = conn.execute(
            sa.text(
                "SELECT e.seq, e.type, e.data::text FROM run_events e JOIN runs r"
                " ON r.id = e.run_id WHERE r.task_id = :i ORDER BY e.seq"
            ),
            {"i": task_id},
        ).all()
    return found


def claude_output() -> tuple[bytes, list, dict[str, Any]]:
    """What the suite's fake Claude Code prints, and the events and run facts parsed from it."""
    import subprocess
    from pathlib import Path

    from app.agents.registry import BUILTIN

    fake = Path(__file__).parent / "fake_agents" / "claude"
    out = subprocess.run([str(fake)], input=b"fix it", capture_output=True, check=True).stdout
    events: list = []
    facts: dict[str, Any] = {}
    for line in out.decode().splitlines():
        parsed = BUILTIN["claude"].parse(line)
        events += parsed.events
        facts.update(parsed.facts)
    return out, events, facts


@pytest.mark.postgres
def test_a_claude_runs_end_with_its_events_in_one_round_trip_matches_the_orm_path(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """A real agent's end (parsed events, session, model, cost, tokens) takes the one round
    trip too, and stores exactly what the ORM path stores: events numbered from 1, in order."""
    out, events, facts = claude_output()
    assert len(events) >= 5 and facts["cost_usd"] == 0.0123 and facts["session_id"]
    body = {"project": "demo", "title": "t", "prompt": "p", "agent": "claude"}
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(2)]
    run_ids = [started(app, i) for i in ids]
    assert end_fast(app, run_ids[0], 0, (0, out), events=events, **facts) is True
    end_orm(app, run_ids[1], 0, (0, out), events=events, **facts)

    fast, orm = ended_rows(app, ids[0]), ended_rows(app, ids[1])
    assert fast == orm
    assert [row[:2] for row in fast["events"]] == [
        (n, kind) for n, (kind, _data) in enumerate(events, 1)
    ]
    assert fast["run"]["event_count"] == len(events)
    assert (fast["run"]["cost_usd"], fast["run"]["input_tokens"], fast["run"]["model"]) == (
        facts["cost_usd"],
        facts["input_tokens"],
        facts["model"],
    )


@pytest.fixture
def failures_told_to_nobody() -> Any:
    """The fast end of a failed run, as it is where nothing listens to failures: notifications
    do (its creator is told), and make such an end take the ORM path
    (`test_a_failed_end_that_someone_is_told_of_takes_the_orm_path`)."""
    from app import events
    from app.notifications import listeners

    events.task_ended.disconnect(listeners._task_ended)
    yield
    listeners.connect()


@pytest.mark.postgres
def test_a_failed_end_that_someone_is_told_of_takes_the_orm_path(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    body = {"project": "demo", "title": "t", "prompt": "p", "max_attempts": 1}
    task_id = post_task(client, member, body, False, intake).get_json()["id"]
    run_id = started(app, task_id)
    assert end_fast(app, run_id, 3, (0, b"bye\n")) is False  # nothing written: the ORM's turn
    end_orm(app, run_id, 3, (0, b"bye\n"))
    got = client.get("/api/v1/notifications", headers=member.headers).get_json()["data"]
    assert [n["kind"] for n in got] == ["task_failed"]


@pytest.mark.postgres
@pytest.mark.parametrize("code", [0, 3])
def test_a_runs_end_in_one_round_trip_matches_the_orm_path(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    code: int,
    failures_told_to_nobody: Any,
) -> None:
    """`runs.pg_fastpath.finish` (the worker's end of a run whose agent exited by itself) writes and
    sends what the ORM path does: the last output, the run's and the task's end, the activity."""
    from app.live import pubsub
    from app.queues import get_redis

    body = {"project": "demo", "title": "t", "prompt": "p", "max_attempts": 1}
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(2)]
    run_ids = [started(app, i) for i in ids]
    values = {"cost_usd": 0.25, "input_tokens": 7, "branch": "switchboard/t-1"}
    log = (0, "done: héllo\n".encode())
    with app.app_context():
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel(), *map(pubsub.run_channel, run_ids))
    assert end_fast(app, run_ids[0], code, log, **values) is True
    end_orm(app, run_ids[1], code, log, **values)

    fast, orm = ended_rows(app, ids[0]), ended_rows(app, ids[1])
    assert fast == orm
    status = "succeeded" if code == 0 else "failed"
    assert (fast["run"]["status"], fast["run"]["exit_code"], fast["run"]["log_size"]) == (
        status,
        code,
        len(log[1]),
    )
    assert fast["task"]["status"] == ("completed" if code == 0 else "failed")
    assert fast["run"]["cost_usd"] == 0.25 and fast["run"]["branch"] == "switchboard/t-1"
    assert fast["log"] == [(0, len(log[1]), log[1])]
    heard = hear(listener, 6)
    shapes = [
        (m["kind"], m["data"]["status"], m["data"]["task_id"]) if "kind" in m else (m, ch)
        for ch, m in heard
    ]
    with app.app_context():
        channels = [pubsub.run_channel(r) for r in run_ids]
    task_status = "completed" if code == 0 else "failed"
    assert shapes == [
        ("run.status", status, ids[0]),
        ("task.status", task_status, ids[0]),
        ({"type": "status", "status": status, "exit_code": code}, channels[0]),
        ("run.status", status, ids[1]),
        ("task.status", task_status, ids[1]),
        ({"type": "status", "status": status, "exit_code": code}, channels[1]),
    ]


@pytest.mark.postgres
@pytest.mark.parametrize("code", [0, 3])
def test_an_agent_gone_before_its_start_was_written_ends_as_if_it_had_been(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    code: int,
    failures_told_to_nobody: Any,
) -> None:
    """An agent that exits within its first tick has its start written with its end
    (`pg_fastpath.finish(started=…)`, one round trip): the same rows as the start and then the end
    (the start's time, pid and version; both activity pairs, in order), the same messages."""
    from datetime import timedelta

    from app.database import db
    from app.live import pubsub
    from app.queues import get_redis
    from app.runs import pg_fastpath
    from app.runs import service as runs
    from app.tasks.models import Task
    from app.timeutil import naive_utc, utcnow

    body = {"project": "demo", "title": "t", "prompt": "p", "max_attempts": 1}
    ids = [post_task(client, member, body, False, intake).get_json()["id"] for _ in range(2)]
    orm_run = started(app, ids[1])
    spawned = utcnow() - timedelta(milliseconds=5)
    log = (0, b"bye\n")
    with app.app_context():
        run, task, _project = runs.take(db.session.get(Task, ids[0]).latest_run_id, "e1", 30)
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        listener.subscribe(pubsub.activity_channel(), *map(pubsub.run_channel, (run.id, orm_run)))
        channels = [pubsub.run_channel(r) for r in (run.id, orm_run)]
        status = "succeeded" if code == 0 else "failed"
        assert pg_fastpath.finish(
            run,
            task,
            status,
            exit_code=code,
            log=log,
            values={},
            started=pg_fastpath.Started(spawned, 4242, None),
        )
        db.session.remove()
    end_orm(app, orm_run, code, log)

    fast, orm = ended_rows(app, ids[0]), ended_rows(app, ids[1])
    assert fast == orm
    task_status = "completed" if code == 0 else "failed"
    assert [(a[0], a[1]["status"]) for a in fast["activities"][-4:]] == [
        ("run.status", "running"),
        ("task.status", "running"),
        ("run.status", status),
        ("task.status", task_status),
    ]
    with app.app_context(), db.engine.connect() as conn:
        times = conn.execute(
            sa.text(
                "SELECT r.started_at, array_agg(a.created_at ORDER BY a.id) FROM runs r"
                " JOIN activities a ON a.data::jsonb ->> 'run_id' = r.id::text"
                " WHERE r.id = :i GROUP BY r.started_at"
            ),
            {"i": run.id},
        ).one()
    started_at, (_queued, running, end) = times
    assert started_at == naive_utc(spawned) == running
    assert end > running  # the end's own time

    heard = hear(listener, 9)
    shapes = [
        (m["kind"], m["data"]["status"], m["data"]["task_id"]) if "kind" in m else (m, ch)
        for ch, m in heard
    ]
    fast_heard = [s for s in shapes if s[-1] in (ids[0], channels[0])]
    orm_heard = [s for s in shapes if s[-1] in (ids[1], channels[1])]
    assert orm_heard == [  # its start was sent before the subscription
        ("run.status", status, ids[1]),
        ("task.status", task_status, ids[1]),
        ({"type": "status", "status": status, "exit_code": code}, channels[1]),
    ]
    assert fast_heard == [
        ("run.status", "running", ids[0]),
        ("task.status", "running", ids[0]),
        ("run.status", status, ids[0]),
        ("task.status", task_status, ids[0]),
        ({"type": "status", "status": "running", "exit_code": None}, channels[0]),
        ({"type": "status", "status": status, "exit_code": code}, channels[0]),
    ]


@pytest.mark.postgres
def test_a_runs_end_outside_the_plain_case_writes_nothing(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Retries left, a task waiting on this one, a log that moved, a run that is no longer the
    executor's, a listening subscription: the one round trip declines and changes nothing, and
    the ORM path then ends the run."""
    from app.database import db

    def post(**extra: Any) -> int:
        body = {"project": "demo", "title": "t", "prompt": "p", **extra}
        return post_task(client, member, body, False, intake).get_json()["id"]

    def untouched(run_id: int) -> None:
        with app.app_context(), db.engine.connect() as conn:
            status, size, chunks = conn.execute(
                sa.text(
                    "SELECT status, log_size, (SELECT count(*) FROM run_log_chunks"
                    " WHERE run_id = :i) FROM runs WHERE id = :i"
                ),
                {"i": run_id},
            ).one()
        assert (status, size, chunks) == ("running", 0, 0)

    retry = started(app, post(max_attempts=2))
    assert end_fast(app, retry, 1, (0, b"x")) is False
    untouched(retry)
    end_orm(app, retry, 1, (0, b"x"))
    with app.app_context(), db.engine.connect() as conn:
        attempts = conn.execute(
            sa.text("SELECT attempts FROM tasks t JOIN runs r ON r.task_id = t.id WHERE r.id = :i"),
            {"i": retry},
        ).scalar()
    assert attempts == 2  # the ORM path queued the retry

    awaited = post()
    awaited_run = started(app, awaited)
    dependent = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "d", "prompt": "p", "depends_on": [awaited]},
    ).get_json()
    assert dependent["status"] == "blocked"
    assert end_fast(app, awaited_run, 0, (0, b"x")) is False
    untouched(awaited_run)
    end_orm(app, awaited_run, 0, (0, b"x"))
    released = client.get(f"/api/v1/tasks/{dependent['id']}", headers=member.headers)
    assert released.get_json()["status"] == "queued"

    moved = started(app, post())
    assert end_fast(app, moved, 0, (5, b"x")) is False  # 5 bytes stored? none are
    untouched(moved)

    taken_over = "UPDATE runs SET executor = 'e2' WHERE id = :i"
    assert end_fast(app, moved, 0, (0, b"x"), meanwhile=taken_over) is False  # no longer e1's
    untouched(moved)

    listened = started(app, post())
    admin_headers = account(app, client, "root", "admin").headers
    sub = subscribe(app, client, admin_headers, "run.finished", monkeypatch)
    assert end_fast(app, listened, 0, (0, b"x")) is False
    untouched(listened)
    end_orm(app, listened, 0, (0, b"x"))
    assert deliveries(client, admin_headers, sub) == ["run.finished"]


@pytest.mark.postgres
def test_a_runs_end_sees_a_dependent_committed_while_it_waited(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """A dependent's creation locks the task it depends on while it reads its status. The end
    waits for that lock and must then see the new dependent (and leave it to the ORM path, which
    releases it); reading with a snapshot from before the wait would leave it blocked."""
    import threading

    from app.database import db

    ending = post_task(
        client, member, {"project": "demo", "title": "a", "prompt": "p"}, False, intake
    ).get_json()["id"]
    run_id = started(app, ending)
    other = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "x", "prompt": "p", "target": "external"},
    ).get_json()
    waiting = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "b", "prompt": "p", "depends_on": [other["id"]]},
    ).get_json()
    assert waiting["status"] == "blocked"
    answer: list[bool] = []
    with app.app_context():
        creator = db.engine.connect()
        creator.execute(
            sa.text("SELECT id FROM tasks WHERE id = :i FOR SHARE"), {"i": ending}
        )  # what `tasks.service._dependencies` does, then it adds the dependency
        creator.execute(
            sa.text("INSERT INTO task_dependencies (task_id, depends_on_id) VALUES (:b, :a)"),
            {"a": ending, "b": waiting["id"]},
        )
        ender = threading.Thread(target=lambda: answer.append(end_fast(app, run_id, 0, (0, b""))))
        ender.start()
        with db.engine.connect() as watcher:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the end waits on the creator's lock
                if watcher.execute(
                    sa.text("SELECT count(*) FROM pg_locks WHERE NOT granted")
                ).scalar():
                    break
                time.sleep(0.01)
            else:
                pytest.fail("the end never waited for the creator's lock")
        creator.commit()
        creator.close()
    ender.join(10)
    assert answer == [False]


@pytest.mark.postgres
def test_a_run_is_found_by_its_primary_key_whatever_the_queue_holds(
    app: Flask, client: FlaskClient, intake: Any, member: Account, project: dict
) -> None:
    """The worker's statements find a run by id and check its status. Before the table's
    statistics exist PostgreSQL answered such a check from the status index, reading every
    queued run to find one: a take cost more the longer the queue."""
    from app.database import db
    from app.runs.pg_fastpath import _take_sql

    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    task_id = post_task(client, member, body, False, intake).get_json()["id"]
    with app.app_context():
        conn = db.session.connection()
        conn.execute(
            sa.text(
                "INSERT INTO runs (task_id, project_id, attempt, status, agent, queued_at,"
                " log_size, event_count) SELECT task_id, project_id, n, 'queued', agent, now(),"
                " 0, 0 FROM runs, generate_series(2, 3000) n WHERE task_id = :t"
            ),
            {"t": task_id},
        )
        # what a table looks like before its first ANALYZE
        conn.execute(sa.text("DELETE FROM pg_statistic WHERE starelid = 'runs'::regclass"))
        conn.execute(sa.text("UPDATE pg_class SET reltuples = -1 WHERE oid = 'runs'::regclass"))
        run_id = conn.execute(
            sa.text("SELECT min(id) FROM runs WHERE task_id = :t"), {"t": task_id}
        ).scalar()
        cursor = conn.connection.driver_connection.cursor()
        params = {"run_id": run_id, "executor": "e1", "lease": None, "token_hash": None}
        cursor.execute("EXPLAIN " + _take_sql(), params)
        plan = [row[0] for row in cursor]
        db.session.rollback()
    assert any("pk_runs" in line for line in plan), plan


@pytest.mark.postgres
def test_a_failed_end_writes_nothing_and_spoils_no_pooled_connection(
    app: Flask,
    client: FlaskClient,
    intake: Any,
    member: Account,
    project: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database refusing the end's statement: the caller gets that error (the worker then
    ends the run through its failure path), nothing is written, and the next end works."""
    import psycopg

    from app.database import db
    from app.runs import pg_fastpath

    body = {"project": "demo", "title": "t", "prompt": "p"}
    run_id = started(app, post_task(client, member, body, False, intake).get_json()["id"])
    with monkeypatch.context() as mp:
        mp.setattr(
            pg_fastpath,
            "_end_sql",
            lambda _starting: "SELECT 1 / (%(log_size)s - %(log_size)s)",
        )
        with pytest.raises(psycopg.errors.DivisionByZero):
            end_fast(app, run_id, 0, (0, b"x"))
    with app.app_context(), db.engine.connect() as conn:
        status, size = conn.execute(
            sa.text("SELECT status, log_size FROM runs WHERE id = :i"), {"i": run_id}
        ).one()
    assert (status, size) == ("running", 0)
    assert end_fast(app, run_id, 0, (0, b"x")) is True
