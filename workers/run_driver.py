"""Driving one agent process for its run: output published live at once and written to the
database in batches (parsed into events and facts), the agent's start written after its first
tick, the lease renewed, and stop requests, timeouts and a worker's shutdown turned into TERM,
grace, KILL. While the database is away the agent goes on and writes wait."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from flask import current_app

from app.agents.lines import Lines
from app.agents.parsers import Event
from app.agents.registry import Agent
from app.database import database_unavailable, db
from app.live import pubsub
from app.queues import get_redis
from app.runs import logs
from app.runs import service as runs
from app.runs.models import Run
from app.runs.outcomes import Started
from app.runs.redaction import ECHO_RELEASE_S, Redactor
from app.tasks.models import Task
from workers import job_hooks
from workers.process import AgentProcess
from workers.terminal import Terminal

log = logging.getLogger("workers.executor")
T = TypeVar("T")

#: set when the worker is asked to shut down: the running agent is stopped and its run requeued
shutdown_requested = threading.Event()
SHUTDOWN_GRACE = 3.0
TICK = 0.02
#: while the database is unreachable, how often a run's writes are tried again
DB_RETRY_S = 0.5


@dataclass
class Batch:
    """Output not yet in the database, and what was parsed from it."""

    offset: int
    data: bytearray = field(default_factory=bytearray)
    since: float | None = None
    events: list[Event] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


class RunDriver:
    def __init__(
        self, run: Run, task: Task, agent: Agent, redactor: Redactor | None = None
    ) -> None:
        cfg = current_app.config
        self.run, self.task, self.agent = run, task, agent
        #: masks the project's secrets in the output before anything else sees it
        self.redactor = redactor
        # kept apart from the row: after a failed write the session expires `run`, and reading
        # it again needs the database
        self.run_id, self.executor = run.id, run.executor or ""
        self.lease_s = cfg["SWITCHBOARD_LEASE_SECONDS"]
        self.renew_every = cfg["SWITCHBOARD_LEASE_RENEW_SECONDS"]
        self.grace = cfg["SWITCHBOARD_STOP_GRACE_SECONDS"]
        self.flush_s = cfg["SWITCHBOARD_LOG_FLUSH_MS"] / 1000
        self.flush_bytes = cfg["SWITCHBOARD_LOG_FLUSH_BYTES"]
        default_timeout = cfg["SWITCHBOARD_DEFAULT_TIMEOUT_S"]
        self.timeout = task.timeout_s if task.timeout_s is not None else default_timeout
        self.batch = Batch(offset=run.log_size)
        #: the output's lines, for the agent's parser
        self.lines = Lines()
        self.live_offset = run.log_size
        # events are numbered here and published at once; they are stored with the output
        self.next_seq = run.event_count + 1
        self.live_hold = b""
        self.pubsub: Any = None
        self.channel = b""
        # a stop requested before we listen is in the row we took, or the next lease renewal
        self.stop_requested = run.stop_requested_at is not None
        # the agent's start, until it is written (see `write_start`)
        self.pending_start: Started | None = None
        self.not_ours = False
        self.listening = False
        # the database is away (a restart, a failover): writes wait until then, the agent goes on
        self.db_retry_at = 0.0
        self.db_down_since: float | None = None
        #: a terminal run's terminal: its notes (take-overs, resizes) become the run's events
        self.terminal: Terminal | None = None
        self.last_output = 0.0

    def write_start(self) -> bool:
        """Write the agent's start (assigned → running) if it is still pending; False when the
        run is no longer ours. It waits for the agent's first tick: an agent that exits by
        then has its start written with its end, in one round trip (`runs.finish_exited`), and never
        listens for stop requests.

        Listening begins just before the start is written, which reads the run's
        `stop_requested_at`: a stop asked for before that write is in what it read, one asked
        for after it is published after the subscription. None is missed."""
        pending, self.pending_start = self.pending_start, None
        if pending is None:
            return not self.not_ours
        if not self.listening:
            self.listen()
        try:
            ours = runs.mark_running(
                self.run,
                pid=pending.pid,
                agent_version=pending.version,
                lease_s=self.lease_s,
                task=self.task,
                at=pending.at,
            )
        except BaseException:
            self.pending_start = pending  # still to be written
            raise
        if ours:
            job_hooks.job_started()  # RQ's bookkeeping (else it goes with the job's end)
            self.stop_requested = self.stop_requested or self.run.stop_requested_at is not None
        else:
            self.not_ours = True
        return not self.not_ours

    def listen(self) -> None:
        """Hear stop requests (see `write_start`).

        One subscriber connection serves every run of this worker process: closing a PubSub
        drops its connection, and the next Redis command of the run's end then paid for a new
        one. Subscribing only sends; a stop is also seen by the next lease renewal."""
        self.listening = True
        self.channel = pubsub.control_channel(self.run_id).encode()
        try:
            self.pubsub = _control_listener()
            self.pubsub.subscribe(self.channel)
        except redis.RedisError:
            log.warning("run %s: cannot hear stop requests live (Redis)", self.run_id)
            _reset_control_listener()
            self.pubsub = None

    # -- output --------------------------------------------------------------------------------

    def on_output(self, chunk: bytes) -> None:
        self.last_output = time.monotonic()
        if self.redactor is not None:
            chunk = self.redactor.feed(chunk)
            if not chunk:
                return
        self._take(chunk)

    def _take(self, chunk: bytes) -> None:
        """Output as stored and streamed (masked)."""
        b = self.batch
        self._publish(chunk)
        if b.since is None:
            b.since = time.monotonic()
        b.data += chunk
        for line in self.lines.feed(chunk):
            self._parse(line)
        if len(b.data) >= self.flush_bytes and self.db_ready():
            self.attempt(self.flush)

    def _publish(self, chunk: bytes, final: bool = False) -> None:
        """Live subscribers get output at once, in whole UTF-8 characters."""
        pending = self.live_hold + chunk
        cut = len(pending) if final else logs.utf8_boundary(pending)
        if cut:
            pubsub.run_log(self.run_id, self.live_offset, pending[:cut])
            self.live_offset += cut
        self.live_hold = pending[cut:]

    def _parse(self, line: bytes) -> None:
        parsed = self.agent.parse(line.decode("utf-8", "replace"))
        self._add_events(parsed.events)
        self.batch.facts.update(parsed.facts)

    def note(self, kind: str, data: dict[str, Any]) -> None:
        self._add_events([(kind, data)])

    def release_echo(self) -> None:
        """A terminal gone quiet shows a byte held back for masking (see `Redactor.release`)."""
        if self.redactor is not None and time.monotonic() - self.last_output >= ECHO_RELEASE_S:
            released = self.redactor.release()
            if released:
                self._take(released)

    def take_terminal_notes(self) -> None:
        """What happened at the run's terminal, as the run's events (this driver numbers them)."""
        notes = self.terminal.notes if self.terminal is not None else None
        while notes is not None and not notes.empty():
            self.note(*notes.get_nowait())

    def _add_events(self, events: list[Event]) -> None:
        """Live subscribers get events at once, numbered as they will be stored (this executor
        is the run's only writer of events while it holds the lease); the database gets them
        with the next batch of output, or with the run's end."""
        if not events:
            return
        b = self.batch
        if b.since is None:
            b.since = time.monotonic()
        numbered = [
            {"seq": self.next_seq + i, "type": kind, "data": data}
            for i, (kind, data) in enumerate(events)
        ]
        self.next_seq += len(events)
        b.events += events
        pubsub.run_events(self.run_id, numbered)

    def settle(self) -> None:
        """The agent is done: publish what was held back and parse an unfinished last line."""
        self.take_terminal_notes()
        if self.redactor is not None:
            rest = self.redactor.flush()
            if rest:
                self._take(rest)
        if self.live_hold:
            self._publish(b"", final=True)
        rest = self.lines.rest()
        if rest:
            self._parse(rest)

    def flush(self, final: bool = False, commit: bool = True) -> None:
        b = self.batch
        if final:
            self.settle()
        if not b.data and not b.events and not b.facts:
            return
        if not self.write_start():
            return  # the run is not ours: its output is not ours to write
        run = self.run
        if b.data:
            runs.append_log(run, b.offset, bytes(b.data), commit=False)
        first = run.event_count + 1
        stored = runs.add_events(run, b.events)
        for key, value in b.facts.items():
            setattr(run, key, value)
        if commit:
            db.session.commit()
        if stored and stored[0]["seq"] != first:  # numbered otherwise than published
            pubsub.run_events(self.run_id, stored)
        self.next_seq = run.event_count + 1
        self.batch = Batch(offset=run.log_size)

    def due(self) -> bool:
        """Output, events and facts go to the database together, `flush_s` after the first of
        them (a short agent's go with its end, in one write)."""
        b = self.batch
        return b.since is not None and time.monotonic() - b.since >= self.flush_s

    # -- the database away ---------------------------------------------------------------------

    def db_ready(self) -> bool:
        return time.monotonic() >= self.db_retry_at

    def attempt(self, write: Callable[[], T]) -> T | None:
        """`write`, or None when the database is unreachable: the session is rolled back, what
        was to be written stays (the batch, the pending start) and is tried again after
        `DB_RETRY_S`, while the agent goes on. A database restart must not end an agent's
        work; the lease decides if the database stays away longer than it lasts."""
        try:
            result = write()
        except Exception as exc:
            if not database_unavailable(exc):
                raise
            with contextlib.suppress(Exception):
                db.session.rollback()
            now = time.monotonic()
            if self.db_down_since is None:
                self.db_down_since = now
                log.warning("run %s: the database is unreachable; the agent goes on", self.run_id)
            self.db_retry_at = now + DB_RETRY_S
            return None
        if self.db_down_since is not None:
            log.warning(
                "run %s: the database is back after %.1f s",
                self.run_id,
                time.monotonic() - self.db_down_since,
            )
            self.db_down_since = None
        return result

    # -- control -------------------------------------------------------------------------------

    def stop_signalled(self) -> bool:
        if not self.stop_requested and self.pubsub is not None:
            try:
                msg = self.pubsub.get_message(timeout=0)
            except redis.RedisError:
                # Redis blinked: the agent goes on; lease renewal still reports stop requests
                msg = None
            if msg and msg.get("type") == "message" and msg.get("channel") == self.channel:
                self.stop_requested = True
        return self.stop_requested

    def drive(self, proc: AgentProcess) -> str | None:
        """Pump until the agent exits; the reason we ended it early, if we did."""
        next_renew = time.monotonic() + self.renew_every
        deadline = proc.started + self.timeout if self.timeout else None
        exiting = False
        while proc.poll() is None:
            proc.pump(self.on_output, TICK)
            if self.terminal is not None:
                self.take_terminal_notes()
                self.release_echo()
            if self.pending_start is not None and proc.poll() is None and self.db_ready():
                if proc.output_closed and not exiting:
                    exiting = True  # its exit follows at once: the next pump waits for it
                else:
                    self.attempt(self.write_start)
            if self.not_ours:
                proc.stop(0.5)
                return "not_ours"
            now = time.monotonic()
            if self.due() and self.db_ready():
                self.attempt(self.flush)
            if now >= next_renew and self.db_ready():
                renewed = self.attempt(
                    lambda: runs.renew_lease(self.run_id, self.executor, self.lease_s)
                )
                next_renew = now + self.renew_every
                if renewed is not None:
                    ours, stop = renewed
                    if not ours:
                        proc.stop(0.5, self.on_output)
                        return "lease_lost"
                    self.stop_requested = self.stop_requested or stop
            if self.stop_signalled():
                proc.stop(self.grace, self.on_output)
                return "cancelled"
            if deadline is not None and now >= deadline:
                proc.stop(self.grace, self.on_output)
                return "timed_out"
            if shutdown_requested.is_set():
                proc.stop(SHUTDOWN_GRACE, self.on_output)
                return "shutdown"
        return None

    def close(self) -> None:
        try:
            if self.pubsub is not None:
                self.pubsub.unsubscribe(self.channel)
        except Exception:
            log.debug("unsubscribing failed", exc_info=True)
            _reset_control_listener()


def _control_listener() -> Any:
    """This process's subscriber for stop requests (one per app, like its Redis client)."""
    listener = current_app.extensions.get("switchboard_control_listener")
    if listener is None:
        listener = get_redis().pubsub(ignore_subscribe_messages=True)
        current_app.extensions["switchboard_control_listener"] = listener
    return listener


def _reset_control_listener() -> None:
    listener = current_app.extensions.pop("switchboard_control_listener", None)
    if listener is not None:
        try:
            listener.close()
        except Exception:
            log.debug("closing the control listener failed", exc_info=True)
