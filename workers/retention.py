"""Workspace retention, on each host for its own disk: a finished run's worktree and its home and
temporary directory are removed `SWITCHBOARD_WORKSPACE_RETENTION_HOURS` after the run ended (its
branch and commits stay in the cached clone), a task's scratch directory when the task ended that
long ago, and everything of an archived (deleted) project. Places whose run no longer exists go
too. Bounded batches: a sweep removes at most `batch` places and leaves the rest to the next."""

from __future__ import annotations

import logging
import socket
from datetime import timedelta

import sqlalchemy as sa
from flask import Flask

from app.database import db, remove_session
from app.projects.models import Project
from app.queues import get_redis
from app.runs.models import RUN_TERMINAL, Run
from app.tasks.models import TASK_TERMINAL, Task
from app.timeutil import as_utc, utcnow
from workers import workspace

log = logging.getLogger(__name__)
#: how often each host sweeps its workspaces
EVERY_S = 60


def sweep(app: Flask, batch: int = 200) -> int:
    """Remove what retention lets go of; the number of places removed."""
    cfg = app.config
    root = cfg["SWITCHBOARD_WORKSPACE_ROOT"]
    cutoff = utcnow() - timedelta(hours=cfg["SWITCHBOARD_WORKSPACE_RETENTION_HOURS"])
    found = list(workspace.places(root))
    if not found:
        return 0
    task_ids = {task_id for (_p, task_id, _a), _path in found}
    runs: dict[tuple[int, int], tuple[str, object, str, object]] = {}
    tasks: dict[int, tuple[str, object, str, object]] = {}
    for chunk in _chunks(sorted(task_ids), 500):
        for task_id, attempt, status, finished, key, archived in db.session.execute(
            sa.select(
                Run.task_id,
                Run.attempt,
                Run.status,
                Run.finished_at,
                Project.key,
                Project.archived_at,
            )
            .join(Project, Project.id == Run.project_id)
            .where(Run.task_id.in_(chunk))
        ):
            runs[(task_id, attempt)] = (status, finished, key, archived)
        for task_id, status, finished, key, archived in db.session.execute(
            sa.select(Task.id, Task.status, Task.finished_at, Project.key, Project.archived_at)
            .join(Project, Project.id == Task.project_id)
            .where(Task.id.in_(chunk))
        ):
            tasks[task_id] = (status, finished, key, archived)
    db.session.rollback()
    removed = 0
    for (project_dir, task_id, attempt), path in found:
        if removed >= batch:
            break
        if attempt is None:
            row, ended = tasks.get(task_id), TASK_TERMINAL
        else:
            row, ended = runs.get((task_id, attempt)), RUN_TERMINAL
        if row is not None:
            status, finished, key, archived = row
            if key != project_dir:
                row = None  # the place is of a run that no longer exists
            elif archived is None and not (
                status in ended and finished is not None and as_utc(finished) < cutoff
            ):
                continue
        workspace.remove(root, path)
        removed += 1
    removed += _archived_clones(root)
    if removed:
        log.info("workspace retention: %s places removed", removed)
    return removed


def _archived_clones(root: str) -> int:
    """The cached clones of archived projects (the runs' places are gone by now)."""
    keys = list(db.session.scalars(sa.select(Project.key).where(Project.archived_at.is_not(None))))
    db.session.rollback()
    return sum(workspace.remove_project(root, key) for key in keys)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sweep_once(app: Flask) -> int | None:
    """At most every `EVERY_S` seconds per host (several supervisors may share one)."""
    with app.app_context():
        try:
            root = app.config["SWITCHBOARD_WORKSPACE_ROOT"]
            lock = f"sb:workspace-sweep:{socket.gethostname()}:{root}"
            if not get_redis().set(lock, "1", nx=True, ex=EVERY_S):
                return None
            return sweep(app)
        except Exception:
            log.exception("workspace retention failed")
            db.session.rollback()
            return None
        finally:
            remove_session()
