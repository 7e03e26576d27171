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
from datetime import timedelta
from typing import Any

import redis
from flask import Flask
from sqlalchemy.orm import configure_mappers

from app.database import database_unavailable, db, remove_session
from app.queues import RUN_QUEUES, get_redis
from app.runs.sweep import executor_gone, requeue_lost_jobs, sweep
from workers import orphans, retention
from workers.process import die_with_parent, kill_tagged
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
            remove_session()


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
            except redis.ConnectionError as exc:  # the supervisor says it once, and waits
                log.warning("worker process %s: Redis is unreachable (%s)", os.getpid(), exc)
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


#: while Redis is unreachable the pool looks again after this long, doubling up to the cap
REDIS_WAIT_S, REDIS_WAIT_MAX_S = 0.25, 2.0


class Supervisor:
    def __init__(self, app: Flask, processes: int, queue_names: list[str] | None) -> None:
        self.app = app
        self.plan = plan(processes, queue_names)
        self.children: list[ForkedWorker | None] = []
        self.stopping = False
        #: None until first asked; then whether Redis answered the last time
        self.redis_up: bool | None = None
        self.redis_wait = REDIS_WAIT_S

    def _redis_answers(self) -> bool:
        """Whether Redis answers now; says so once per change. When it comes back, the runs
        whose jobs it lost (a restart empties it) are queued again at once, not a sweep later."""
        with self.app.app_context():
            try:
                get_redis().ping()
                up = True
            except redis.RedisError as exc:
                up, reason = False, exc
            if up and self.redis_up is False:
                log.warning("Redis is back: starting worker processes")
                self.redis_wait = REDIS_WAIT_S
                try:
                    requeued = requeue_lost_jobs(older_than=timedelta(0))
                    if requeued:
                        log.warning("queued %d runs again whose jobs Redis lost", requeued)
                except Exception as exc:  # the sweep does it later
                    log.warning("runs whose jobs Redis lost wait for the sweep (%s)", exc)
                finally:
                    remove_session()
            elif not up and self.redis_up is not False:
                log.warning("Redis is unreachable (%s): worker processes wait for it", reason)
        self.redis_up = up
        return up

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
        self.children = [None for _ in self.plan]
        next_sweep = next_redis_check = time.monotonic()
        while not self.stopping:
            for i, child in enumerate(self.children):
                if child is not None and child.poll() is not None:
                    log.warning("worker process %s exited (%s)", child.pid, child.returncode)
                    self._left_behind(child)
                    self.children[i] = child = None
                    next_redis_check = 0.0  # did it die of Redis going away? ask before forking
            now = time.monotonic()
            if now >= next_redis_check:
                # a worker process cannot live without Redis: while it is away, wait (one
                # line when it goes, one when it is back) instead of forking ones that die
                up = self._redis_answers()
                next_redis_check = now + (1.0 if up else self.redis_wait)
                if not up:
                    self.redis_wait = min(self.redis_wait * 2, REDIS_WAIT_MAX_S)
            if self.redis_up and not self.stopping:
                for i, child in enumerate(self.children):
                    if child is None:
                        self.children[i] = self._spawn(self.plan[i])
            if self.redis_up and time.monotonic() >= next_sweep:
                sweep_once(self.app, interval)
                retention.sweep_once(self.app)  # this host's own disk
                next_sweep = time.monotonic() + interval
            time.sleep(0.2)
        self.shutdown()

    def _left_behind(self, child: ForkedWorker) -> None:
        """A worker process died (killed, crashed): its agent must not go on working unseen
        (its retry would do the work again), so the agent's processes are killed now, and its
        run is lost and retried now rather than when its lease runs out."""
        from workers.executor import executor_name

        name = executor_name(child.pid)
        killed = kill_tagged(f"SWITCHBOARD_EXECUTOR={name}")
        if killed:
            log.warning("worker process %s: killed %d agent processes", child.pid, len(killed))
        with self.app.app_context():
            try:
                executor_gone(
                    name,
                    f"its worker process died (exit {child.returncode}); its agent was ended",
                )
            except Exception as exc:  # the lease expires, and the sweep does it
                log.warning(
                    "worker process %s: its runs wait for their leases (%s)", child.pid, exc
                )
                with contextlib.suppress(Exception):
                    db.session.rollback()
            finally:
                remove_session()

    def shutdown(self) -> None:
        """Warm stop: each worker ends its agent (TERM, short grace) and requeues its run."""
        children = [c for c in self.children if c is not None]
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
