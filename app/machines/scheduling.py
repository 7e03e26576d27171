"""Scheduling runs onto machines: a queued run of a task whose target is `machine:<name>` or
`labels:<a>,<b>` goes, by priority then age, to an eligible machine with a free slot.

Eligible: online (heartbeats arrive, not draining), named by the target or holding all its
labels, with the run's agent installed. The database decides, exactly once: the assignment is one
conditional UPDATE (the run still queued, the machine's occupied slots still under its `slots`),
and on PostgreSQL schedulers take a transaction lock first, so two web processes cannot fill one
slot twice. The `assign` frame is published on the machine's channel after commit; the process
holding its socket sends it. A machine that does not start an assigned run within `OFFER_S`
gives it back (`reclaim_unstarted`): nothing ran, so no attempt is spent.

While no machine can take a run its task stays `queued` with a `status_reason` saying why.
"""

from __future__ import annotations

import json
import logging
import random
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app.auth import tokens
from app.database import after_commit, db, on_postgresql
from app.live import pubsub
from app.machines.models import Machine, executor_name, state
from app.projects.models import Project
from app.runs.models import Run, status_in
from app.tasks import limits
from app.tasks.lifecycle import OCCUPYING
from app.tasks.models import Task
from app.timeutil import utcnow
from app.vault import service as vault

log = logging.getLogger(__name__)

#: seconds a machine has to start an assigned run before it goes back to the queue
OFFER_S = 10
#: runs looked at per pass
BATCH = 200
_LOCK_KEY = 0x5B_4D_43  # "machine scheduling", for pg_advisory_xact_lock


def _eligible(target: str, agent: str, machine: Machine) -> bool:
    if agent not in (machine.agents or {}):
        return False
    if target.startswith(limits.MACHINE_TARGET):
        return machine.name == target[len(limits.MACHINE_TARGET) :]
    wanted = set(target[len(limits.LABELS_TARGET) :].split(","))
    return wanted <= set(machine.labels or ())


def _why_waiting(target: str, agent: str, machines: list[Machine], now: Any) -> str:
    """The task's `status_reason` while no machine takes it."""
    if target.startswith(limits.MACHINE_TARGET):
        name = target[len(limits.MACHINE_TARGET) :]
        found = [m for m in machines if m.name == name]
        if not found:
            return f"waiting: no machine is named {name}"
        where = f"machine {name}"
    else:
        labels = target[len(limits.LABELS_TARGET) :]
        wanted = set(labels.split(","))
        found = [m for m in machines if wanted <= set(m.labels or ())]
        if not found:
            return f"waiting: no machine has labels {labels}"
        where = f"machines with labels {labels}"
    online = [m for m in found if state(m, now) == "online"]
    if not online:
        return f"waiting: no online machine among the {where}"
    if not any(agent in (m.agents or {}) for m in online):
        return f"waiting: agent {agent} is not installed on the {where}"
    return f"waiting: every slot of the {where} is busy"


def _occupied(executors: list[str]) -> dict[str, int]:
    if not executors:
        return {}
    rows = db.session.execute(
        sa.select(Run.executor, sa.func.count(Run.id))
        .where(Run.executor.in_(executors), status_in(set(OCCUPYING)))
        .group_by(Run.executor)
    ).all()
    return {executor: count for executor, count in rows}


def _lock() -> None:
    if on_postgresql():
        db.session.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})


def _project_room(project_id: int, cap: int | None, busy: dict[int, int]) -> bool:
    if cap is None:
        return True
    if project_id not in busy:
        busy[project_id] = (
            db.session.scalar(
                sa.select(sa.func.count(Run.id)).where(
                    Run.project_id == project_id, status_in(set(OCCUPYING))
                )
            )
            or 0
        )
    return busy[project_id] < cap


def _assign(run_id: int, machine: Machine, now: Any) -> str | None:
    """The run to the machine, if it is still queued and the machine still has a slot (one
    statement: the check and the write cannot be split by another scheduler); its token."""
    executor = executor_name(machine)
    token = tokens.new_run_token(run_id)
    occupied = (
        sa.select(sa.func.count(Run.id))
        .where(Run.executor == executor, status_in(set(OCCUPYING)))
        .scalar_subquery()
    )
    moved = db.session.execute(
        sa.update(Run)
        .where(Run.id == run_id, Run.status == "queued", occupied < machine.slots)
        .values(
            status="assigned",
            executor=executor,
            dispatched_at=now,
            lease_expires_at=now + timedelta(seconds=OFFER_S),
            token_hash=tokens.digest(token),
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    return token if moved == 1 else None


def schedule(only_run: int | None = None) -> list[tuple[int, int]]:
    """Assign what waits, in the current transaction (committed by the caller): (run, machine)
    pairs. `only_run`: look at that run alone (a run just queued)."""
    stmt = (
        sa.select(Run.id, Run.project_id, Run.agent, Task.id, Task.target, Task.status_reason)
        .join(Task, Task.id == Run.task_id)
        .where(
            Run.status == "queued",
            Task.latest_run_id == Run.id,
            sa.or_(
                Task.target.startswith(limits.MACHINE_TARGET),
                Task.target.startswith(limits.LABELS_TARGET),
            ),
        )
        .order_by(Task.priority_rank.desc(), Run.id)
        .limit(BATCH)
    )
    if only_run is not None:
        stmt = stmt.where(Run.id == only_run)  # it waits: it was just queued
    elif not db.session.execute(stmt).first():
        return []  # nothing waits: no lock taken (heartbeats ask this often)
    _lock()
    waiting = db.session.execute(stmt).all()  # again, now that no other scheduler runs
    now = utcnow()
    machines = list(db.session.scalars(sa.select(Machine).order_by(Machine.id)))
    usable = [m for m in machines if state(m, now) == "online"]
    load = _occupied([executor_name(m) for m in usable])
    caps = dict(
        db.session.execute(
            sa.select(Project.id, Project.max_concurrent_runs).where(
                Project.id.in_({w.project_id for w in waiting})
            )
        ).all()
    )
    busy: dict[int, int] = {}
    done: list[tuple[int, int]] = []
    for run_id, project_id, agent, task_id, target, reason in waiting:
        free = [
            m
            for m in usable
            if _eligible(target, agent, m) and load.get(executor_name(m), 0) < m.slots
        ]
        if not free:
            why = _why_waiting(target, agent, machines, now)
            if why != reason:
                db.session.execute(
                    sa.update(Task)
                    .where(Task.id == task_id, Task.status == "queued")
                    .values(status_reason=why)
                    .execution_options(synchronize_session=False)
                )
            continue
        if not _project_room(project_id, caps.get(project_id), busy):
            continue
        # the least loaded (by share of its slots); among equals any, by chance: short runs
        # free their slots at once, and a fixed order sent most of them to the first machine
        free.sort(key=lambda m: (load.get(executor_name(m), 0) / m.slots, random.random()))
        for machine in free:
            token = _assign(run_id, machine, now)
            if token is None:
                continue
            load[executor_name(machine)] = load.get(executor_name(machine), 0) + 1
            busy[project_id] = busy.get(project_id, 0) + 1
            if reason:
                db.session.execute(
                    sa.update(Task)
                    .where(Task.id == task_id)
                    .values(status_reason=None)
                    .execution_options(synchronize_session=False)
                )
            message = _assignment(run_id, token)
            after_commit(lambda m=machine.id, msg=message: pubsub.to_machine(m, msg))
            done.append((run_id, machine.id))
            break
    return done


def schedule_now() -> list[tuple[int, int]]:
    """`schedule` in a transaction of its own (a slot was freed, a machine came online)."""
    try:
        done = schedule()
        db.session.commit()
        return done
    except Exception:
        db.session.rollback()
        raise


def tell_stop(run: Run) -> None:
    """A run on a machine is to stop: its machine hears it after commit (and again with each
    heartbeat until the run ends)."""
    executor = run.executor or ""
    if not executor.startswith("machine:"):
        return
    machine_id = db.session.scalar(
        sa.select(Machine.id).where(Machine.name == executor.removeprefix("machine:"))
    )
    if machine_id is None:
        return
    grace = int(current_app.config["SWITCHBOARD_STOP_GRACE_SECONDS"])
    frame = {"type": "stop", "run_id": run.id, "grace_s": grace}
    after_commit(lambda: pubsub.to_machine(machine_id, {"frame": frame}))


def reoffer(machine: Machine) -> int:
    """A machine (re)connected: the runs offered to it and not yet accepted are offered again
    (the first offer may have gone to a connection that was closing), each with a new token."""
    now = utcnow()
    offered = list(
        db.session.scalars(
            sa.select(Run.id).where(
                Run.executor == executor_name(machine), Run.status == "assigned"
            )
        )
    )
    for run_id in offered:
        token = tokens.new_run_token(run_id)
        moved = db.session.execute(
            sa.update(Run)
            .where(
                Run.id == run_id, Run.status == "assigned", Run.executor == executor_name(machine)
            )
            .values(
                token_hash=tokens.digest(token),
                lease_expires_at=now + timedelta(seconds=OFFER_S),
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if moved:
            message = _assignment(run_id, token)
            after_commit(lambda m=machine.id, msg=message: pubsub.to_machine(m, msg))
    db.session.commit()
    return len(offered)


def reclaim_unstarted() -> int:
    """Runs a machine was offered but did not start in time go back to the queue: no agent
    ran, so no attempt is spent (their machine went away, or never took the offer)."""
    now = utcnow()
    moved = db.session.execute(
        sa.update(Run)
        .where(
            Run.status == "assigned",
            Run.started_at.is_(None),
            Run.executor.startswith("machine:"),
            Run.lease_expires_at < now,
        )
        .values(
            status="queued",
            executor=None,
            lease_expires_at=None,
            dispatched_at=None,
            token_hash=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    return moved


def sweep() -> dict[str, int]:
    """The maintenance sweep's part: offers not taken go back, and what waits is assigned."""
    reclaimed = reclaim_unstarted()
    db.session.commit()
    return {"offers_reclaimed": reclaimed, "machine_runs_assigned": len(schedule_now())}


# -- the assignment, as the machine gets it ----------------------------------------------------


def _assignment(run_id: int, token: str) -> dict[str, Any]:
    """The run's spec, to publish on the machine's channel once the assignment commits. Its
    environment (the project's secrets, the run's token) travels sealed with the server's
    secrets key: only a server process opens it, to write it to the machine's socket."""
    run = db.session.get(Run, run_id)  # in the session already when it was just queued
    assert run is not None
    task = db.session.get(Task, run.task_id)
    project = db.session.get(Project, run.project_id)
    assert task is not None
    assert project is not None
    cfg = current_app.config
    env = {
        **vault.values_for(project.id),
        "SWITCHBOARD_RUN_ID": str(run.id),
        "SWITCHBOARD_TASK_ID": str(task.id),
        "SWITCHBOARD_PROJECT": project.key,
        "SWITCHBOARD_ATTEMPT": str(run.attempt),
        "SWITCHBOARD_URL": cfg["SWITCHBOARD_PUBLIC_URL"],
        "SWITCHBOARD_RUN_TOKEN": token,
    }
    timeout = task.timeout_s if task.timeout_s is not None else cfg["SWITCHBOARD_DEFAULT_TIMEOUT_S"]
    frame = {
        "type": "assign",
        "run": {
            "run_id": run.id,
            "task_id": task.id,
            "attempt": run.attempt,
            "project": project.key,
            "agent": run.agent,
            "prompt": task.prompt,
            "repo_url": project.repo_url,
            "base_branch": project.default_branch,
            "timeout_s": timeout,
            "loop": task.loop,
            "config": task.config,
            "offer_s": OFFER_S,
        },
    }
    return {"frame": frame, "sealed_env": vault.encrypt(json.dumps(env))}


def open_assignment(message: dict[str, Any]) -> dict[str, Any]:
    """The `assign` frame with its environment opened (in the process holding the socket)."""
    frame = json.loads(json.dumps(message["frame"]))
    frame["run"]["env"] = json.loads(vault.decrypt(message["sealed_env"]))
    return frame
