"""Executing one run on the server's worker pool.

The job takes the run (queued -> assigned, atomically, so a duplicate job does nothing), prepares
the workspace, starts the agent (the run is marked running after the agent's first tick, or with
its end if it is gone by then: one write fewer for short agents), then drives it: output is
published live at once and written to the database in batches, parsed into events, the lease is
renewed, and stop requests, timeouts and worker shutdown end the agent with TERM, grace, KILL.
The run always ends in a terminal state.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app

from app.agents.registry import known_agents
from app.auth import tokens
from app.database import database_unavailable, db
from app.live import pubsub
from app.runs import service as runs
from app.runs.outcomes import Started, normalise_exit_code
from app.runs.redaction import Redactor
from app.tasks.models import Task
from app.terminals import sizes
from app.terminals.inbox import Inbox, Names
from app.timeutil import utcnow
from workers import agents, isolation, job_hooks, workspace
from workers.process import AgentProcess
from workers.run_driver import DB_RETRY_S, RunDriver, shutdown_requested
from workers.terminal import Terminal

log = logging.getLogger(__name__)
T = TypeVar("T")
#: a run interrupted because its worker was told to stop (SIGTERM): queued again, not counted
HANDED_BACK = "handed back: its worker shut down; queued again (not counted as an attempt)"


def executor_name(pid: int | None = None) -> str:
    """How a pool worker process (this one, or `pid` of this host) signs the runs it holds."""
    return f"pool:{socket.gethostname()}:{pid or os.getpid()}"


def _loop_done(ws: workspace.Workspace, marker: str | None) -> bool:
    return bool(marker) and (ws.path / marker).exists()


def execute(run_id: int) -> str:
    """Job body. Returns a one-word outcome for RQ's result."""
    cfg = current_app.config
    me = executor_name()
    lease_s = cfg["SWITCHBOARD_LEASE_SECONDS"]
    token = tokens.new_run_token(run_id)
    taken = _while_unavailable(
        lambda: runs.take(run_id, me, lease_s, tokens.digest(token)), lease_s
    )
    if taken is None:
        return "skipped"  # another job took it, or it was cancelled before it started
    run, task, project = taken
    agent = known_agents().get(run.agent)
    if agent is None:
        runs.finish(run.id, "failed", summary=f"unknown agent {run.agent!r}")
        return "failed"
    try:
        secrets = isolation.project_secrets(project)
        binary = agents.resolve_binary(agent, os.environ.get("PATH"))
        ws = workspace.prepare(
            cfg["SWITCHBOARD_WORKSPACE_ROOT"],
            project.key,
            project.repo_url,
            project.default_branch,
            project.workdir,
            task.id,
            run.attempt,
            policy=isolation.policy(cfg),
            git_token=secrets.get("GIT_TOKEN"),
        )
    except (
        agents.AgentNotInstalled,
        workspace.WorkspaceError,
        isolation.SecretsUnreadable,
    ) as exc:
        runs.finish(run.id, "failed", summary=str(exc))
        return "failed"
    env = isolation.agent_environment(
        cfg,
        ws,
        secrets,
        {
            "SWITCHBOARD_RUN_ID": str(run.id),
            "SWITCHBOARD_EXECUTOR": me,  # with the run id, finds agents a dead worker left
            "SWITCHBOARD_TASK_ID": str(task.id),
            "SWITCHBOARD_PROJECT": project.key,
            "SWITCHBOARD_ATTEMPT": str(run.attempt),
            "SWITCHBOARD_URL": cfg["SWITCHBOARD_PUBLIC_URL"],
            "SWITCHBOARD_RUN_TOKEN": token,
        },
    )
    wrap = isolation.wrapper(cfg, ws)
    version = agents.version(agent, binary, env)
    config = task.config or {}
    argv = agent.argv(task.prompt, str(ws.path), config, project.instructions)
    argv[0] = binary
    argv = wrap(argv)
    stdin = task.prompt.encode() if agent.prompt_on_stdin else None
    loop = task.loop or {}
    iterations = int(loop.get("max_iterations", 1)) if loop else 1
    marker = loop.get("done_marker") if loop else None
    # the run's token is masked too: a viewer of the log must not act as the run
    masked = [*secrets.values(), tokens.run_token_secret(token)]
    driver = RunDriver(run, task, agent, Redactor.of(masked))
    size = sizes.DEFAULT if agent.in_terminal(task.tty) else None
    # read now: when the agent ends the database may be away, and the rows expired with it
    review = Review(task.title, f"{task.agent} (Switchboard)", project.review_mode == "required")
    inbox: Inbox | None = None
    outcome: str | None = None
    code = 0
    proc: AgentProcess | None = None
    try:
        for n in range(1, iterations + 1):
            proc = AgentProcess(argv, cwd=str(ws.path), env=env, stdin_data=stdin, terminal=size)
            if size is not None:
                inbox = _attachable(driver, proc, inbox)
            if n == 1:
                driver.pending_start = Started(utcnow(), proc.pid, version)
                # a loop's iterations need the run running
                if loop and not driver.write_start():
                    proc.stop(0.5)
                    return "skipped"  # stopped between assignment and start
            if loop:
                driver.note("iteration", {"n": n, "max": iterations, "pid": proc.pid})
            outcome = driver.drive(proc)
            if outcome == "not_ours":
                return "skipped"  # stopped between assignment and start
            code = normalise_exit_code(proc.finish(driver.on_output))
            if outcome or code != 0 or not loop:
                break
            if _loop_done(ws, marker):
                driver.note("loop_done", {"iterations": n, "marker": marker})
                break
        else:
            if loop:
                driver.note("loop_exhausted", {"iterations": iterations, "marker": marker})
        driver.settle()
        extra = _change(driver.run_id, ws, wrap, review) if outcome is None and code == 0 else {}
        extra.update(workspace.results(ws, wrap))
        return _until_written(lambda: _end(driver, task, outcome, code, extra), driver)
    except BaseException:
        # worker killed mid-run (SystemExit from a cold shutdown) or our own bug: the agent
        # must not outlive us, and the run must not stay running.
        log.exception("run %s: executor failed", run_id)
        if proc is not None:
            proc.signal_group(signal.SIGKILL)
        db.session.rollback()
        try:
            driver.flush(final=True)
        except Exception:
            db.session.rollback()
        runs.finish(
            run.id,
            "lost",
            summary="worker stopped while running; queued again",
            executor=me,
            requeue=True,
        )
        raise
    finally:
        if inbox is not None:
            inbox.close()
        driver.close()


def _attachable(driver: RunDriver, proc: AgentProcess, inbox: Inbox | None) -> Inbox:
    """People's keystrokes and resizes reach `proc`'s terminal (a loop's next iteration takes
    over the terminal of the one before, at its size)."""
    if inbox is not None:
        inbox.terminal.proc = proc
        proc.resize(*inbox.terminal.size)
        return inbox
    terminal = Terminal(proc, sizes.DEFAULT)
    driver.terminal = terminal
    inbox = Inbox(current_app.config["SWITCHBOARD_REDIS_URL"], Names.of(driver.run_id), terminal)
    inbox.start()
    return inbox


@dataclass(frozen=True)
class Review:
    """What a run's change is committed with, and whether a person approves it before a push."""

    message: str
    author: str
    required: bool


def _change(
    run_id: int, ws: workspace.Workspace, wrap: workspace.Wrapper, review: Review
) -> dict[str, Any]:
    """A succeeded repo run's change, committed and kept (`runs.record_change`); with the run's
    end it says `review: pending` when the project wants a person to approve it first."""
    if ws.branch is None:
        return {}
    try:
        change = workspace.capture(ws, wrap, review.message, author=review.author)
    except workspace.WorkspaceError as exc:
        log.warning("run %s: its change could not be captured: %s", run_id, exc)
        return {}
    if change is None:
        return {}
    fields = dict(vars(change))
    _while_unavailable(lambda: runs.record_change(run_id, fields), 30)
    return {"review": "pending"} if review.required else {}


def _end(
    driver: RunDriver, task: Task, outcome: str | None, code: int, extra: dict[str, Any]
) -> str:
    """Write the run's end with its last output; the job's outcome."""
    if outcome is None and _ended_plainly(driver, task, code, extra):
        return runs.exited_status(code)
    if not driver.write_start():
        return "skipped"  # stopped between assignment and start
    batch = driver.batch
    try:
        driver.flush(final=True, commit=False)  # committed with the run's end
        return _finish(driver, outcome, code, extra)
    except BaseException:
        driver.batch = batch  # not written: tried again whole
        raise


def _until_written(write: Callable[[], str], driver: RunDriver) -> str:
    """The run's end, tried again while the database is unreachable (its writes are guarded
    by the run's state: one that was kept already makes the next a no-op), for as long as the
    lease lasts; then the lease decides, as for a worker that died."""
    deadline = time.monotonic() + driver.lease_s
    while True:
        outcome = driver.attempt(write)
        if outcome is not None:
            return outcome
        if time.monotonic() >= deadline or shutdown_requested.is_set():
            return write()  # its error ends the job; the sweep ends the run
        time.sleep(DB_RETRY_S)


def _while_unavailable(write: Callable[[], T], seconds: float) -> T:
    """`write`, tried again while the database is unreachable, for up to `seconds`: a run
    dispatched during a restart starts when the database is back, not when the sweep finds
    its failed job."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return write()
        except Exception as exc:
            if not database_unavailable(exc) or time.monotonic() >= deadline:
                raise
            db.session.rollback()
        if shutdown_requested.is_set():
            return write()
        time.sleep(DB_RETRY_S)


def _ended_plainly(driver: RunDriver, task: Task, code: int, extra: dict[str, Any]) -> bool:
    """The agent exited by itself: its end with its last output in one write, where the runs
    service finds that it applies. False when nothing was written."""
    b = driver.batch
    with pubsub.handed_over(job_hooks.end_messages()):  # sent with RQ's end of the job
        ended = runs.finish_exited(
            driver.run,
            task,
            exit_code=code,
            log=(b.offset, bytes(b.data)),
            values={**b.facts, **extra},
            events=b.events,
            started=driver.pending_start,
        )
    if ended:
        driver.pending_start = None
    return ended


def _finish(driver: RunDriver, outcome: str | None, code: int, extra: dict[str, Any]) -> str:
    run_id, me = driver.run_id, driver.executor
    if outcome == "cancelled":
        runs.finish(
            run_id, "cancelled", exit_code=code, summary="stopped by request", executor=me, **extra
        )
    elif outcome == "timed_out":
        runs.finish(
            run_id,
            "timed_out",
            exit_code=code,
            summary=f"timed out after {driver.timeout}s",
            executor=me,
            **extra,
        )
    elif outcome == "shutdown":
        # a hand-back, not a crash: the agent was stopped by us (its exit code says only
        # that), and the new attempt does not count against the task's max_attempts
        runs.finish(
            run_id,
            "lost",
            summary=HANDED_BACK,
            executor=me,
            requeue=True,
            **extra,
        )
    elif outcome == "lease_lost":
        return "lease_lost"  # the sweep already ended it
    else:
        runs.finish(run_id, runs.exited_status(code), exit_code=code, executor=me, **extra)
    return outcome or runs.exited_status(code)
