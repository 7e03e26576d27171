"""Heartbeats, written together: each web process gathers the heartbeats its connections
receive and writes them in one transaction every `FLUSH_S` (the machines' figures, their runs'
leases, the stops asked for those runs read back), however many machines it serves.

Written one by one, a heartbeat was a transaction of its own, and 500 idle machines beating
every 5 s kept 35-45% of a core busy in the web processes. A heartbeat's effects have seconds
of slack (a machine is online for three intervals after its last one, a lease runs three
heartbeats, a stop is told live and only said again here), so half a second more changes
nothing a user sees.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import Flask

from app.database import db
from app.machines import scheduling
from app.machines.models import Machine
from app.runs.models import Run, held_by
from app.timeutil import utcnow

log = logging.getLogger(__name__)

#: how long a heartbeat may wait for others before they are written together
FLUSH_S = 0.5


@dataclass
class Beat:
    """One machine's latest heartbeat, and how to answer it (from the flushing thread)."""

    machine_id: int
    executor: str
    figures: dict[str, Any]
    agents: dict[str, Any] | None
    #: more free slots than the machine said last: what waits may be assigned now
    freed: bool
    at: datetime = field(default_factory=utcnow)
    #: sends frames to the machine; closes its connection when given None (decommissioned)
    answer: Callable[[list[dict[str, Any]] | None], None] = lambda _frames: None


class Collector:
    """A process's pending heartbeats (the latest per machine) and the thread that writes them."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.pending: dict[int, Beat] = {}
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None

    def add(self, beat: Beat) -> None:
        with self.lock:
            earlier = self.pending.get(beat.machine_id)
            if earlier is not None:
                beat.freed = beat.freed or earlier.freed
                beat.agents = beat.agents if beat.agents is not None else earlier.agents
            self.pending[beat.machine_id] = beat
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(
                    target=self._run, name="machine-heartbeats", daemon=True
                )
                self.thread.start()
            self.lock.notify()

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.pending:
                    self.lock.wait()
            time.sleep(FLUSH_S)  # the heartbeats that arrive meanwhile come along
            with self.lock:
                beats, self.pending = list(self.pending.values()), {}
            try:
                with self.app.app_context():
                    try:
                        config = self.app.config
                        found = write(beats, int(config["SWITCHBOARD_LEASE_SECONDS"]))
                        answer(beats, found, int(config["SWITCHBOARD_STOP_GRACE_SECONDS"]))
                    finally:
                        db.session.remove()
            except Exception:  # the database away: the next heartbeats are written instead
                log.exception("could not write %d machine heartbeats", len(beats))


def collector(app: Flask) -> Collector:
    """The app's collector (one per process and app)."""
    found = app.extensions.get("switchboard_heartbeats")
    if found is None:
        found = app.extensions.setdefault("switchboard_heartbeats", Collector(app))
    return found


#: what `write` found, per beat: the stops to say again, or None when the machine is retired
Found = dict[int, list[tuple[int, datetime | None]] | None]


def write(beats: list[Beat], lease_s: int) -> Found:
    """The beats' machines heard from, their runs' leases renewed (an offer not yet accepted
    keeps its own short lease), in one transaction; and what is asked of each."""
    now = utcnow()
    ids = [b.machine_id for b in beats]
    alive = set(
        db.session.scalars(
            sa.select(Machine.id).where(Machine.id.in_(ids), Machine.decommissioned_at.is_(None))
        )
    )
    table = Machine.__table__
    heard = [b for b in beats if b.machine_id in alive]
    if heard:  # Core executemany, one round trip on PostgreSQL (psycopg pipelines it)
        db.session.execute(
            table.update()
            .where(table.c.id == sa.bindparam("mid"))
            .values(last_heartbeat_at=sa.bindparam("at"), heartbeat=sa.bindparam("figures")),
            [{"mid": b.machine_id, "at": b.at, "figures": b.figures} for b in heard],
        )
    with_agents = [b for b in heard if b.agents is not None]
    if with_agents:
        db.session.execute(
            table.update()
            .where(table.c.id == sa.bindparam("mid"))
            .values(agents=sa.bindparam("agents")),
            [{"mid": b.machine_id, "agents": b.agents} for b in with_agents],
        )
    executors = {b.executor: b.machine_id for b in heard}
    renewed = db.session.execute(
        sa.update(Run)
        # an offer not yet accepted keeps its own short lease
        .where(held_by(*executors, ""), Run.status != sa.literal_column("'assigned'"))
        .values(lease_expires_at=now + timedelta(seconds=lease_s))
        .returning(Run.executor, Run.id, Run.stop_requested_at)
        .execution_options(synchronize_session=False)
    ).all()
    db.session.commit()
    found: Found = {b.machine_id: ([] if b.machine_id in alive else None) for b in beats}
    for executor, run_id, stop_requested_at in renewed:
        stops = found.get(executors[executor])
        if stops is not None:
            stops.append((run_id, stop_requested_at))
    if any(b.freed and b.machine_id in alive for b in beats):
        scheduling.offer()  # what waits for a slot (a cap freed elsewhere, a retry)
    return found


def answer(beats: list[Beat], found: Found, grace_s: int) -> None:
    """Each machine told what its heartbeat found: a stop said again for each run asked to
    stop (the live one may have been missed), or the end of a retired machine's connection."""
    for beat in beats:
        stops = found.get(beat.machine_id)
        if stops is None:
            beat.answer(None)
            continue
        frames = [
            {"type": "stop", "run_id": run_id, "grace_s": grace_s}
            for run_id, stop_requested_at in stops
            if stop_requested_at is not None
        ]
        if frames:
            beat.answer(frames)
