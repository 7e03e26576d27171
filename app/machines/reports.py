"""What a machine reports on its control channel, written as the external executors' REST
reports are (`runs.service`: the same offset rule for logs, the same ends): each function takes
the machine (`Holder`) and one checked frame, and returns the frames to answer with.

A machine reports only on runs it holds (`executor` is `machine:<name>`); anything else is an
`error` frame, and nothing changes. Resending after a reconnect is harmless: output already
stored, an event already numbered and an end already written are acknowledged again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app.database import db
from app.errors import Conflict, NotFound
from app.live import pubsub
from app.machines import protocol, scheduling
from app.machines.models import Machine, executor_name
from app.runs import service as runs
from app.runs.models import RUN_TERMINAL, Run, status_in
from app.tasks.models import Task

Frames = list[dict[str, Any]]


@dataclass(frozen=True)
class Holder:
    """The machine a connection serves, as its reports need it (read once, at `auth`: its
    name cannot change, and its retirement closes the connection)."""

    machine_id: int
    executor: str

    @classmethod
    def of(cls, machine: Machine) -> Holder:
        return cls(machine.id, executor_name(machine))


def _lease_s() -> int:
    return int(current_app.config["SWITCHBOARD_LEASE_SECONDS"])


def _refused(run_id: int) -> protocol.FrameError:
    return protocol.FrameError(f"run {run_id} is not assigned to this machine")


def _run(holder: Holder, run_id: int) -> Run:
    """The run, if this machine holds it (ended or not)."""
    try:
        run = runs.get_run(run_id)
    except NotFound:
        run = None
    if run is None or run.executor != holder.executor:
        raise _refused(run_id)
    return run


def _run_and_task(holder: Holder, run_id: int) -> tuple[Run, Task]:
    """`_run` with its task, in one query (the run's start and end write both)."""
    found = runs.get_run_and_task(run_id)
    if found is None or found[0].executor != holder.executor:
        raise _refused(run_id)
    return found


def resume(machine: Machine, run_ids: list[int]) -> Frames:
    """After a reconnect: for each run the machine still holds, what is stored (it resends from
    there), or that it must give the run up (ended, or taken from it meanwhile)."""
    found = {r.id: r for r in db.session.scalars(sa.select(Run).where(Run.id.in_(run_ids or [0])))}
    answers = []
    for run_id in run_ids:
        run = found.get(run_id)
        if run is None or run.executor != executor_name(machine):
            answers.append({"run_id": run_id, "abandon": True})
        elif run.status in RUN_TERMINAL:
            answers.append({"run_id": run_id, "finished": True, "status": run.status})
        else:
            answers.append({"run_id": run_id, "offset": run.log_size, "seq": run.event_count})
    return answers


def accept(holder: Holder, frame: dict[str, Any]) -> Frames:
    """The machine takes the run: it is `running` from now (preparing its workspace, then its
    agent), its lease renewed by the machine's heartbeats."""
    run, task = _run_and_task(holder, frame["run_id"])
    if run.status == "assigned":
        runs.mark_running(run, pid=None, agent_version=None, lease_s=_lease_s(), task=task)
    return []


def reject(holder: Holder, frame: dict[str, Any]) -> Frames:
    """The machine will not run it (an agent missing, no room after all): back to the queue,
    as if it had never been assigned."""
    run = _run(holder, frame["run_id"])
    db.session.execute(
        sa.update(Run)
        .where(Run.id == run.id, Run.status == "assigned", Run.executor == run.executor)
        .values(status="queued", executor=None, lease_expires_at=None, token_hash=None)
        .execution_options(synchronize_session=False)
    )
    db.session.commit()
    return []


def started(holder: Holder, frame: dict[str, Any]) -> Frames:
    """Its agent started: its pid and version. The run is running since `accept`, so this is
    one statement; the run's start is written here only when the `accept` went missing."""
    version = frame.get("agent_version")
    noted = db.session.execute(
        sa.update(Run)
        .where(
            Run.id == frame["run_id"],
            Run.executor == holder.executor,
            status_in({"running", "waiting"}),
        )
        .values(pid=frame.get("pid"), agent_version=sa.func.coalesce(version, Run.agent_version))
        .execution_options(synchronize_session=False)
    ).rowcount
    db.session.commit()
    if noted:
        return []
    run, task = _run_and_task(holder, frame["run_id"])
    if run.status == "assigned":
        runs.mark_running(
            run, pid=frame.get("pid"), agent_version=version, lease_s=_lease_s(), task=task
        )
    return []


def log(holder: Holder, frame: dict[str, Any]) -> Frames:
    """Output at an offset: stored and published once, whatever is resent; the answer says how
    much is stored (after a gap, where to resend from)."""
    run = _run(holder, frame["run_id"])
    if run.status in RUN_TERMINAL:
        return [{"type": "ack", "run_id": run.id, "offset": run.log_size, "finished": True}]
    runs.held(run, run.executor or "", _lease_s())
    data = protocol.log_bytes(frame)
    try:
        appended = runs.append_log(run, frame["offset"], data)
    except Conflict:  # a gap: the machine resends from what is stored
        db.session.rollback()
        db.session.refresh(run)
        return [{"type": "ack", "run_id": run.id, "offset": run.log_size}]
    if appended is not None:
        pubsub.run_log(run.id, appended.offset, appended.data)
    return [{"type": "ack", "run_id": run.id, "offset": run.log_size}]


def event(holder: Holder, frame: dict[str, Any]) -> Frames:
    run = _run(holder, frame["run_id"])
    if run.status in RUN_TERMINAL:
        return [{"type": "ack", "run_id": run.id, "seq": run.event_count, "finished": True}]
    runs.held(run, run.executor or "", _lease_s())
    body = frame["event"]
    try:
        stored = runs.add_event_at(run, frame["seq"], body["type"], body["data"])
    except Conflict:
        db.session.rollback()
        db.session.refresh(run)
        return [{"type": "ack", "run_id": run.id, "seq": run.event_count}]
    db.session.commit()
    if stored is not None:
        pubsub.run_events(run.id, [stored])
    return [{"type": "ack", "run_id": run.id, "seq": run.event_count}]


def finished(holder: Holder, frame: dict[str, Any]) -> Frames:
    """The run's end, once every byte of its output is stored (else the answer says where to
    resend from, and the machine sends the end again after)."""
    run, task = _run_and_task(holder, frame["run_id"])
    if run.status in RUN_TERMINAL:
        return [{"type": "ack", "run_id": run.id, "finished": True}]
    if run.log_size < frame["log_size"] or run.event_count < frame["event_count"]:
        return [{"type": "ack", "run_id": run.id, "offset": run.log_size, "seq": run.event_count}]
    facts = {k: v for k, v in frame["facts"].items() if v is not None}
    if "agent_version" in facts and facts["agent_version"] == run.agent_version:
        del facts["agent_version"]  # said by `started` already
    extra = {k: frame[k] for k in ("branch", "commit_sha", "diff_stat") if frame.get(k)}
    exited = (
        frame["exit_code"] is not None
        and frame["summary"] is None
        and frame["status"] == runs.exited_status(frame["exit_code"])
    )
    if not (
        exited
        and run.status != "assigned"
        and runs.finish_exited(
            run,
            task,
            exit_code=frame["exit_code"],
            log=(run.log_size, b""),
            values={**facts, **extra},
            events=[],
        )
    ):
        runs.finish(
            run.id,
            frame["status"],
            exit_code=frame["exit_code"],
            summary=frame["summary"],
            executor=run.executor,
            **facts,
            **extra,
        )
    scheduling.offer()  # its slot is free
    return [{"type": "ack", "run_id": run.id, "finished": True}]


#: what each frame type does (`auth` is the connection's own)
HANDLERS = {
    "accept": accept,
    "reject": reject,
    "started": started,
    "log": log,
    "event": event,
    "finished": finished,
}
