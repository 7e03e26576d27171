"""The server's own worker pool: a supervisor process and its worker processes (`rq_worker`).

`switchboard worker` starts a supervisor that keeps `SWITCHBOARD_WORKER_PROCESSES` worker
processes alive (restarting any that die, e.g. after kill -9) and runs the maintenance sweep every
few seconds. Each worker process is an RQ worker that runs jobs inside the app context, in the
process itself: our jobs mostly wait on an agent, which is its own process already, and a fork per
job costs ~13 ms here. One worker process executes one agent at a time; one more takes the `events`
queue (webhook matching, outbound deliveries) so that those never wait behind a long agent run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from flask import Flask
from sqlalchemy.orm import configure_mappers

from app.database import database_unavailable, db
from app.queues import RUN_QUEUES, get_redis
from app.runs.sweep import sweep
from workers import orphans, retention
from workers.process import die_with_parent
from workers.rq_worker import run_worker

log = logging.getLogger("workers.pool")
SWEEP_LOCK = "sb:sweep-lock"


def sweep_once(app: Flask, interval: int) -> dict[str, int] | None:
    """Run the sweep unless another supervisor (on any host) ran it within `interval`."""
    with app.app_context():
        try:
            if not get_redis().set(SWEEP_LOCK, "1", nx=True, ex=max(1, interval)):
                return None
            result = sweep()
            if any(result.values()):
                log.info("sweep: %s", result)
            return result
        except Exception as exc:
            if database_unavailable(exc):  # a restart: the next sweep catches up
                log.warning("sweep skipped: the database is unreachable (%s)", exc)
            else:
                log.exception("sweep failed")
            with contextlib.suppress(Exception):
                db.session.rollback()
            return None
        finally:
            db.session.remove()


def plan(processes: int, queue_names: list[str] | None) -> list[list[str]]:
    """The queues of each worker process. By default `processes` of them execute runs (and
    maintenance jobs), and one more takes the `events` queue alone: webhook matching and
    outbound deliveries must not wait behind agents that run for an hour."""
    if queue_names:
        return [list(queue_names) for _ in range(processes)]
    runs = [*RUN_QUEUES, "maintenance"]
    return [list(runs) for _ in range(processes)] + [["events"]]


class ForkedWorker:
    """A worker process forked from the supervisor, which has imported everything already: it
    starts in milliseconds where a new interpreter took seconds (importing the app again), so a
    worker that died is replaced at once. What `Supervisor` needs of `subprocess.Popen`."""

    def __init__(self, app: Flask, queues: list[str]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns: its exit must not run the parent's clean-up
            code = 1
            try:
                code = _forked_worker(app, queues)
            except BaseException:
                log.exception("worker process failed")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: gone all the same
                self.returncode = -1
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _forked_worker(app: Flask, queues: list[str]) -> int:
    """In the child: a session of its own (Ctrl-C reaches the supervisor, which stops the
    children in order), gone with its parent, and none of the parent's connections."""
    os.setsid()
    die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with app.app_context():
        db.engine.dispose(close=False)  # the parent's pooled sockets stay the parent's
        app.extensions.pop("switchboard_redis", None)
        app.extensions.pop("switchboard_queues", None)
        return 0 if run_worker(app, queues) else 1


class Supervisor:
    def __init__(self, app: Flask, processes: int, queue_names: list[str] | None) -> None:
        self.app = app
        self.plan = plan(processes, queue_names)
        self.children: list[ForkedWorker] = []
        self.stopping = False

    def _spawn(self, queues: list[str]) -> ForkedWorker:
        child = ForkedWorker(self.app, queues)
        log.info("started worker process %s", child.pid)
        return child

    def _stop(self, _signum: int, _frame: Any) -> None:
        self.stopping = True

    def run(self) -> None:
        import workers.executor  # noqa: F401 - imported once here, forked into every child

        orphans.connect()  # its sweep ends the agents a dead worker of this host left
        configure_mappers()
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        interval = self.app.config["SWITCHBOARD_SWEEP_INTERVAL"]
        self.children = [self._spawn(queues) for queues in self.plan]
        next_sweep = time.monotonic()
        while not self.stopping:
            for i, child in enumerate(self.children):
                if child.poll() is not None and not self.stopping:
                    log.warning(
                        "worker process %s exited (%s); starting another",
                        child.pid,
                        child.returncode,
                    )
                    self.children[i] = self._spawn(self.plan[i])
            if time.monotonic() >= next_sweep:
                sweep_once(self.app, interval)
                retention.sweep_once(self.app)  # this host's own disk
                next_sweep = time.monotonic() + interval
            time.sleep(0.2)
        self.shutdown()

    def shutdown(self) -> None:
        """Warm stop: each worker ends its agent (TERM, short grace) and requeues its run."""
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
