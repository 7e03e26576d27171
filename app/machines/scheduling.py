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

import functools
import json
import logging
import random
from collections.abc import Collection
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app.agents.registry import DEFAULT_INSTRUCTIONS
from app.auth import tokens
from app.combining import Combiner
from app.database import after_commit, db, on_postgresql
from app.live import pubsub
from app.machines.models import Machine, executor_name, state
from app.projects.models import Project
from app.runs.models import Run, held_by, status_in
from app.tasks import limits
from app.tasks.lifecycle import OCCUPYING
from app.tasks.models import Task, in_machine_queue
from app.terminals import service as terminals
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
        .where(held_by(*executors))
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
    occupied = sa.select(sa.func.count(Run.id)).where(held_by(executor)).scalar_subquery()
    runs = Run.__table__  # a Core statement: the ORM's bulk update has nothing to add here
    moved = db.session.execute(
        sa.update(runs)
        .where(runs.c.id == run_id, runs.c.status == "queued", occupied < machine.slots)
        .values(
            status="assigned",
            executor=executor,
            dispatched_at=now,
            lease_expires_at=now + timedelta(seconds=OFFER_S),
            token_hash=tokens.digest(token),
        )
    ).rowcount
    return token if moved == 1 else None


@functools.cache
def _waiting() -> sa.Select[Any]:
    """Queued runs for machines, by priority then the task's age, with what deciding needs:
    read in the order of `ix_tasks_machine_queue` (the machines' queue is short, whatever
    waits for the worker pool). Built once: building it cost as much as running it."""
    return (
        sa.select(
            Run.id,
            Run.project_id,
            Run.agent,
            Task.id,
            Task.target,
            Task.status_reason,
            Project.max_concurrent_runs,
        )
        .select_from(Task)
        .join(Run, Run.id == Task.latest_run_id)
        .join(Project, Project.id == Task.project_id)
        .where(in_machine_queue(), status_in({"queued"}))  # each run by its id
        .order_by(Task.priority_rank.desc(), Task.id)
        .limit(BATCH)
    )


class _Pass:
    """One scheduling pass, in the current transaction, under the schedulers' lock: the
    machines as they are now, and what it assigned."""

    def __init__(self) -> None:
        _lock()
        self.now = utcnow()
        self.machines = list(db.session.scalars(sa.select(Machine).order_by(Machine.id)))
        self.usable = [m for m in self.machines if state(m, self.now) == "online"]
        self.load = _occupied([executor_name(m) for m in self.usable])
        self.room = sum(max(0, m.slots - self.load.get(executor_name(m), 0)) for m in self.usable)
        self.busy: dict[int, int] = {}
        self.done: list[tuple[int, Machine, str]] = []

    def place(self, row: Any) -> None:
        """The run to the least loaded eligible machine with a free slot, or its task's
        `status_reason` saying why it waits (also on the task if the session holds it: the
        creation's answer says why)."""
        run_id, project_id, agent, task_id, target, reason, cap = row
        load = self.load
        free = [
            m
            for m in self.usable
            if _eligible(target, agent, m) and load.get(executor_name(m), 0) < m.slots
        ]
        if not free:
            why = _why_waiting(target, agent, self.machines, self.now)
            if why != reason:
                db.session.execute(
                    sa.update(Task)
                    .where(Task.id == task_id, Task.status == "queued")
                    .values(status_reason=why)
                    .execution_options(synchronize_session="evaluate")
                )
            return
        if not _project_room(project_id, cap, self.busy):
            return
        # the least loaded (by share of its slots); among equals any, by chance: short runs
        # free their slots at once, and a fixed order sent most of them to the first machine
        free.sort(key=lambda m: (load.get(executor_name(m), 0) / m.slots, random.random()))
        for machine in free:
            token = _assign(run_id, machine, self.now)
            if token is None:
                continue
            load[executor_name(machine)] = load.get(executor_name(machine), 0) + 1
            self.busy[project_id] = self.busy.get(project_id, 0) + 1
            self.room -= 1
            if reason:
                db.session.execute(
                    sa.update(Task)
                    .where(Task.id == task_id)
                    .values(status_reason=None)
                    .execution_options(synchronize_session="evaluate")
                )
            self.done.append((run_id, machine, token))
            return

    def told(self) -> list[tuple[int, int]]:
        """Each assignment published on its machine's channel once committed."""
        specs = _assignments({run_id: token for run_id, _machine, token in self.done})
        for run_id, machine, _token in self.done:
            message = specs[run_id]
            after_commit(lambda m=machine.id, msg=message: pubsub.to_machine(m, msg))
        return [(run_id, machine.id) for run_id, machine, _token in self.done]


def schedule(
    only_run: int | None = None, *, explain: bool = False, new_runs: Collection[int] = ()
) -> list[tuple[int, int]]:
    """Assign what waits, in the current transaction (committed by the caller): (run, machine)
    pairs. `only_run`: that run alone (just queued in this transaction). Otherwise the pass
    ends when no slot is left; then the runs in `new_runs` (just queued) not assigned have
    their `status_reason` said, and with `explain` every waiting run has (the sweep's pass;
    a machine's labels changed)."""
    stmt = _waiting()
    if only_run is not None:
        stmt = stmt.where(Run.id == only_run)
    elif not new_runs and not db.session.execute(stmt.limit(1)).first():
        return []  # nothing waits: no lock taken (each end of a run asks)
    work = _Pass()
    thorough = explain or only_run is not None
    if work.room or thorough:
        for row in db.session.execute(stmt).all():
            if not work.room and not thorough:
                break
            work.place(row)
    placed = {run_id for run_id, _machine, _token in work.done}
    left = set(new_runs) - placed
    if left and not thorough:
        for row in db.session.execute(_waiting().where(Run.id.in_(left))).all():
            work.place(row)
    return work.told()


def schedule_now(*, explain: bool = False) -> list[tuple[int, int]]:
    """`schedule` in a transaction of its own (a machine came online, its labels changed)."""
    try:
        done = schedule(explain=explain)
        db.session.commit()
        return done
    except Exception:
        db.session.rollback()
        raise


def offer(run_id: int | None = None) -> None:
    """A slot was freed, or (`run_id`) a run was queued and committed: a scheduling pass, in a
    transaction of its own, shared with the other threads of this process that ask meanwhile
    (`app.combining`): under load one pass assigns what many ends of runs freed."""
    try:
        _scheduler().submit(run_id)
    except Exception:  # the database away: the sweep assigns what waits
        log.exception("a scheduling pass failed")


def _settle(asked: list[int | None]) -> None:
    try:
        schedule(new_runs={run_id for run_id in asked if run_id is not None})
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise


def _scheduler() -> Combiner[int | None]:
    extensions = current_app.extensions
    combiner = extensions.get("switchboard_machine_scheduler")
    if combiner is None:
        combiner = extensions.setdefault("switchboard_machine_scheduler", Combiner(_settle))
    return combiner


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
    renewed: dict[int, str] = {}
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
            renewed[run_id] = token
    specs = _assignments(renewed)
    for message in specs.values():
        after_commit(lambda msg=message: pubsub.to_machine(machine.id, msg))
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
    assigned = schedule_now(explain=True)
    return {"offers_reclaimed": reclaimed, "machine_runs_assigned": len(assigned)}


# -- the assignment, as the machine gets it ----------------------------------------------------


def _assignments(tokens_by_run: dict[int, str]) -> dict[int, dict[str, Any]]:
    """Each run's spec, to publish on its machine's channel once the assignment commits (one
    query for them all). Its environment (the project's secrets, the run's token) travels
    sealed with the server's secrets key: only a server process opens it, to write it to the
    machine's socket."""
    if not tokens_by_run:
        return {}
    rows = db.session.execute(
        sa.select(
            Run.id,
            Run.attempt,
            Run.agent,
            Task.id,
            Task.prompt,
            Task.timeout_s,
            Task.loop,
            Task.config,
            Task.tty,
            Project.id,
            Project.key,
            Project.repo_url,
            Project.default_branch,
            Project.agent_instructions,
        )
        .join(Task, Task.id == Run.task_id)
        .join(Project, Project.id == Run.project_id)
        .where(Run.id.in_(list(tokens_by_run)))
    ).all()
    cfg = current_app.config
    default_timeout = cfg["SWITCHBOARD_DEFAULT_TIMEOUT_S"]
    secrets: dict[int, dict[str, str]] = {}
    specs = {}
    for (run_id, attempt, agent, task_id, prompt, timeout_s, loop, config, tty, project_id, key,
         repo_url, base_branch, instructions) in rows:  # fmt: skip
        if project_id not in secrets:
            secrets[project_id] = vault.values_for(project_id)
        env = {
            **secrets[project_id],
            "SWITCHBOARD_RUN_ID": str(run_id),
            "SWITCHBOARD_TASK_ID": str(task_id),
            "SWITCHBOARD_PROJECT": key,
            "SWITCHBOARD_ATTEMPT": str(attempt),
            "SWITCHBOARD_URL": cfg["SWITCHBOARD_PUBLIC_URL"],
            "SWITCHBOARD_RUN_TOKEN": tokens_by_run[run_id],
        }
        frame = {
            "type": "assign",
            "run": {
                "run_id": run_id,
                "task_id": task_id,
                "attempt": attempt,
                "project": key,
                "agent": agent,
                "prompt": prompt,
                "repo_url": repo_url,
                "base_branch": base_branch,
                "timeout_s": default_timeout if timeout_s is None else timeout_s,
                "loop": loop,
                "config": config,
                "tty": terminals.in_terminal(agent, tty),
                "instructions": DEFAULT_INSTRUCTIONS if instructions is None else instructions,
                "offer_s": OFFER_S,
            },
        }
        specs[run_id] = {"frame": frame, "sealed_env": vault.encrypt(json.dumps(env))}
    return specs


def open_assignment(message: dict[str, Any]) -> dict[str, Any]:
    """The `assign` frame with its environment opened (in the process holding the socket)."""
    frame = json.loads(json.dumps(message["frame"]))
    frame["run"]["env"] = json.loads(vault.decrypt(message["sealed_env"]))
    return frame
