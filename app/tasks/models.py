from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.database import db
from app.projects.models import Project
from app.tasks.limits import LABELS_TARGET, MACHINE_TARGET
from app.timeutil import UTCDateTime, utcnow

PRIORITIES = ("low", "normal", "high", "urgent")
#: higher runs first
PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}
#: `review`: its run succeeded with a change that waits for a person's approval
TASK_STATUSES = (
    "blocked",
    "queued",
    "running",
    "waiting",
    "review",
    "completed",
    "failed",
    "cancelled",
)
TASK_TERMINAL = frozenset({"completed", "failed", "cancelled"})


class Task(db.Model):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(sa.String(300))
    prompt: Mapped[str] = mapped_column(sa.Text)
    agent: Mapped[str] = mapped_column(sa.String(64))
    #: "pool" (the server's workers), "external" (claimed over REST), later machines/labels
    target: Mapped[str] = mapped_column(sa.String(200), default="pool")
    priority: Mapped[str] = mapped_column(sa.String(8), default="normal")
    priority_rank: Mapped[int] = mapped_column(default=1)
    status: Mapped[str] = mapped_column(sa.String(16))
    status_reason: Mapped[str | None] = mapped_column(sa.String(500))
    timeout_s: Mapped[int | None]
    max_attempts: Mapped[int] = mapped_column(default=1)
    attempts: Mapped[int] = mapped_column(default=0)
    #: attempts that do not count against `max_attempts` (the user's field, never changed for
    #: this): runs handed back by a worker that stopped, retries a person asked for
    attempts_not_counted: Mapped[int] = mapped_column(default=0, server_default="0")
    loop: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    config: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    #: the agent runs in a pseudo-terminal (people may attach to it); None: its agent's default
    tty: Mapped[bool | None]
    source: Mapped[str] = mapped_column(sa.String(16), default="api")
    source_ref: Mapped[str | None] = mapped_column(sa.String(500))
    creator_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200))
    latest_run_id: Mapped[int | None]
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    project: Mapped[Project] = relationship(lazy="select", viewonly=True)

    __table_args__ = (
        sa.Index("ix_tasks_project_status", "project_id", "status"),
        sa.Index("ix_tasks_status_rank", "status", "priority_rank", "id"),
        sa.UniqueConstraint("creator_id", "idempotency_key", name="uq_tasks_idempotency"),
    )


def in_machine_queue() -> sa.ColumnElement[bool]:
    """The tasks the machines' scheduler looks at: queued, for machines (`limits.for_machines`).
    Written with literals, so that a query holding it matches `ix_tasks_machine_queue`."""
    return sa.and_(
        Task.status == sa.literal_column("'queued'"),
        sa.or_(
            Task.target.like(sa.literal_column(f"'{MACHINE_TARGET}%'")),
            Task.target.like(sa.literal_column(f"'{LABELS_TARGET}%'")),
        ),
    )


# the machines' queue: their scheduler reads it often, and it is short whatever waits elsewhere
sa.Index(
    "ix_tasks_machine_queue",
    Task.priority_rank,
    Task.id,
    postgresql_where=in_machine_queue(),
    sqlite_where=in_machine_queue(),
)


class TaskDependency(db.Model):
    __tablename__ = "task_dependencies"

    task_id: Mapped[int] = mapped_column(
        sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    depends_on_id: Mapped[int] = mapped_column(
        sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class TaskQueueCount(db.Model):
    """How many tasks wait `queued` per project and priority, so that a new task's queue position
    costs a handful of rows instead of counting the whole queue.

    On PostgreSQL the trigger `tasks_queue_count` (migration 7c1e5a9b3d20) keeps it, whatever
    changes a task: each database session adds its +1/-1 to its own row (`shard` is the server
    process id), so concurrent transactions never wait on each other; the sweep folds rows of
    ended sessions into shard 0. The sum over shards is what `count(*)` would say, in the same
    snapshot. SQLite has no trigger and no fast path: it counts."""

    __tablename__ = "task_queue_counts"

    project_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    priority_rank: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    shard: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    queued: Mapped[int] = mapped_column(sa.BigInteger, default=0)
