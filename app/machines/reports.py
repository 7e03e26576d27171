"""What a machine reports on its control channel, written as the external executors' REST
reports are (`runs.service`: the same offset rule for logs, the same ends): each function takes
the machine and one checked frame, and returns the frames to answer with.

A machine reports only on runs it holds (`executor` is `machine:<name>`); anything else is an
`error` frame, and nothing changes. Resending after a reconnect is harmless: output already
stored, an event already numbered and an end already written are acknowledged again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app.database import db
from app.errors import Conflict, NotFound
from app.live import pubsub
from app.machines import protocol, scheduling
from app.machines.models import Machine, executor_name
from app.runs import service as runs
from app.runs.models import RUN_ACTIVE, RUN_TERMINAL, Run, status_in
from app.timeutil import utcnow

Frames = list[dict[str, Any]]


def _lease_s() -> int:
    return int(current_app.config["SWITCHBOARD_LEASE_SECONDS"])


def _run(machine: Machine, run_id: int) -> Run:
    """The run, if this machine holds it (ended or not)."""
    try:
        run = runs.get_run(run_id)
    except NotFound:
        run = None
    if run is None or run.executor != executor_name(machine):
        raise protocol.FrameError(f"run {run_id} is not assigned to this machine")
    return run


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


def heartbeat(machine: Machine, frame: dict[str, Any]) -> Frames:
    """The machine is alive: its figures are kept, its runs' leases renewed and the stops asked
    for them read back in one statement (a stop is said again: the live one may have been
    missed). Scheduling is asked only when the machine has more free slots than it said last."""
    now = utcnow()
    previous_free = (machine.heartbeat or {}).get("free_slots")
    figures = {k: v for k, v in frame.items() if k not in ("type", "agents") and v is not None}
    machine.last_heartbeat_at = now
    machine.heartbeat = figures
    if frame.get("agents") is not None:
        machine.agents = frame["agents"]
    # the runs it took (an offer not yet accepted keeps its own short lease)
    renewed = db.session.execute(
        sa.update(Run)
        .where(Run.executor == executor_name(machine), status_in({"running", "waiting"}))
        .values(lease_expires_at=now + timedelta(seconds=_lease_s()))
        .returning(Run.id, Run.stop_requested_at)
        .execution_options(synchronize_session=False)
    ).all()
    db.session.commit()
    free = frame.get("free_slots") or 0
    if free and (previous_free is None or free > previous_free):
        scheduling.schedule_now()  # what waits for a slot (a cap freed elsewhere, a retry)
    grace = int(current_app.config["SWITCHBOARD_STOP_GRACE_SECONDS"])
    return [
        {"type": "stop", "run_id": run_id, "grace_s": grace}
        for run_id, stop_requested_at in renewed
        if stop_requested_at is not None
    ]


def accept(machine: Machine, frame: dict[str, Any]) -> Frames:
    """The machine takes the run: it is `running` from now (preparing its workspace, then its
    agent), its lease renewed by the machine's heartbeats."""
    run = _run(machine, frame["run_id"])
    if run.status == "assigned":
        runs.mark_running(run, pid=None, agent_version=None, lease_s=_lease_s())
    return []


def reject(machine: Machine, frame: dict[str, Any]) -> Frames:
    """The machine will not run it (an agent missing, no room after all): back to the queue,
    as if it had never been assigned."""
    run = _run(machine, frame["run_id"])
    db.session.execute(
        sa.update(Run)
        .where(Run.id == run.id, Run.status == "assigned", Run.executor == run.executor)
        .values(status="queued", executor=None, lease_expires_at=None, token_hash=None)
        .execution_options(synchronize_session=False)
    )
    db.session.commit()
    return []


def started(machine: Machine, frame: dict[str, Any]) -> Frames:
    """Its agent started: its pid and version (the run is running since `accept`)."""
    run = _run(machine, frame["run_id"])
    if run.status == "assigned":
        runs.mark_running(
            run,
            pid=frame.get("pid"),
            agent_version=frame.get("agent_version"),
            lease_s=_lease_s(),
        )
    elif run.status in RUN_ACTIVE:
        run.pid = frame.get("pid")
        run.agent_version = frame.get("agent_version") or run.agent_version
        db.session.commit()
    return []


def log(machine: Machine, frame: dict[str, Any]) -> Frames:
    """Output at an offset: stored and published once, whatever is resent; the answer says how
    much is stored (after a gap, where to resend from)."""
    run = _run(machine, frame["run_id"])
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


def event(machine: Machine, frame: dict[str, Any]) -> Frames:
    run = _run(machine, frame["run_id"])
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


def finished(machine: Machine, frame: dict[str, Any]) -> Frames:
    """The run's end, once every byte of its output is stored (else the answer says where to
    resend from, and the machine sends the end again after)."""
    run = _run(machine, frame["run_id"])
    if run.status in RUN_TERMINAL:
        return [{"type": "ack", "run_id": run.id, "finished": True}]
    if run.log_size < frame["log_size"] or run.event_count < frame["event_count"]:
        return [{"type": "ack", "run_id": run.id, "offset": run.log_size, "seq": run.event_count}]
    facts = {k: v for k, v in frame["facts"].items() if v is not None}
    extra = {k: frame[k] for k in ("branch", "commit_sha", "diff_stat") if frame.get(k)}
    runs.finish(
        run.id,
        frame["status"],
        exit_code=frame["exit_code"],
        summary=frame["summary"],
        executor=run.executor,
        **facts,
        **extra,
    )
    scheduling.schedule_now()  # its slot is free
    return [{"type": "ack", "run_id": run.id, "finished": True}]


#: what each frame type does (`auth` is the connection's own)
HANDLERS = {
    "heartbeat": heartbeat,
    "accept": accept,
    "reject": reject,
    "started": started,
    "log": log,
    "event": event,
    "finished": finished,
}
