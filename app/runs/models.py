from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.database import db
from app.projects.models import Project
from app.timeutil import UTCDateTime, utcnow

RUN_STATUSES = (
    "queued",
    "assigned",
    "running",
    "waiting",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "lost",
)
RUN_ACTIVE = frozenset({"queued", "assigned", "running", "waiting"})
#: an executor holds the run (it occupies one of its slots)
RUN_HELD = ("assigned", "running", "waiting")
HELD_SQL = "status IN ('assigned', 'running', 'waiting')"
RUN_TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out", "lost"})
#: a succeeded run's change: waiting for a person, being pushed, pushed, or turned down
REVIEW_STATES = ("pending", "approving", "approved", "rejected")


class Run(db.Model):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(sa.ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(default=1)
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    agent: Mapped[str] = mapped_column(sa.String(64))
    #: who executes it: "pool:<host>:<pid>" or an external executor's name
    executor: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: handed to the worker pool's queue (runs wait undispatched while the project is at its cap)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    exit_code: Mapped[int | None]
    error_summary: Mapped[str | None] = mapped_column(sa.String(1000))
    agent_version: Mapped[str | None] = mapped_column(sa.String(200))
    session_id: Mapped[str | None] = mapped_column(sa.String(200))
    model: Mapped[str | None] = mapped_column(sa.String(200))
    cost_usd: Mapped[float | None]
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    branch: Mapped[str | None] = mapped_column(sa.String(300))
    commit_sha: Mapped[str | None] = mapped_column(sa.String(64))
    diff_stat: Mapped[str | None] = mapped_column(sa.Text)
    pid: Mapped[int | None]
    #: its change's review (None: nothing to review), the last push's error, the pull request
    review: Mapped[str | None] = mapped_column(sa.String(10))
    review_error: Mapped[str | None] = mapped_column(sa.String(1000))
    pull_request_url: Mapped[str | None] = mapped_column(sa.String(500))
    log_size: Mapped[int] = mapped_column(sa.BigInteger, default=0)
    event_count: Mapped[int] = mapped_column(default=0)
    #: sha256 of the run's token (`sbr_…`, in its agent's environment), set when it is taken
    token_hash: Mapped[str | None] = mapped_column(sa.String(64))

    project: Mapped[Project] = relationship(lazy="select", viewonly=True)

    __table_args__ = (
        sa.Index("ix_runs_project_status", "project_id", "status"),
        sa.Index("ix_runs_status_lease", "status", "lease_expires_at"),
        # the runs an executor holds now (a machine's busy slots, its leases): few rows
        sa.Index(
            "ix_runs_executor_held",
            "executor",
            postgresql_where=sa.text(HELD_SQL),
            sqlite_where=sa.text(HELD_SQL),
        ),
    )


class RunLogChunk(db.Model):
    """Append-only: a chunk starts at `offset` bytes into the run's log."""

    __tablename__ = "run_log_chunks"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    offset: Mapped[int] = mapped_column(sa.BigInteger)
    size: Mapped[int]
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (sa.UniqueConstraint("run_id", "offset", name="uq_run_log_chunks_offset"),)


class RunEvent(db.Model):
    """Typed telemetry parsed from the agent's output; `seq` counts from 1 within a run."""

    __tablename__ = "run_events"

    id: Mapped[int] = mapped_column(
        sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    seq: Mapped[int]
    type: Mapped[str] = mapped_column(sa.String(64))
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (sa.UniqueConstraint("run_id", "seq", name="uq_run_events_seq"),)


class RunChange(db.Model):
    """What a repo run changed, captured when it ended (its workspace may be cleaned up, or on
    another host): the unified diff against its base (capped), its files, and a git bundle of
    its commits from which its branch is pushed when a person approves."""

    __tablename__ = "run_changes"

    run_id: Mapped[int] = mapped_column(
        sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    branch: Mapped[str] = mapped_column(sa.String(300))
    base_commit: Mapped[str] = mapped_column(sa.String(64))
    head_commit: Mapped[str] = mapped_column(sa.String(64))
    diff: Mapped[str] = mapped_column(sa.Text)
    truncated: Mapped[bool] = mapped_column(default=False)
    #: [{path, status, additions, deletions, binary}]
    files: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON)
    bundle: Mapped[bytes | None] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def status_in(statuses: frozenset[str] | set[str] | tuple[str, ...]) -> sa.ColumnElement[bool]:
    """`status IN (...)` for statements that find runs by id (or task): written so that
    PostgreSQL cannot answer it from the status index. Before the table's statistics existed it
    preferred that index, and found one run by reading every queued one."""
    return Run.status.in_([sa.literal_column(f"'{s}'") for s in sorted(statuses)]).is_(sa.true())


def held_by(*executors: str) -> sa.ColumnElement[bool]:
    """Runs the executors hold now, written (statuses as literals) so that PostgreSQL answers
    it from `ix_runs_executor_held`, whatever the plan's parameters."""
    return sa.and_(
        Run.executor.in_(executors),
        Run.status.in_([sa.literal_column(f"'{s}'") for s in RUN_HELD]),
    )


def status_in_sql(
    statuses: frozenset[str] | set[str] | tuple[str, ...], column: str = "status"
) -> str:
    """`status_in` as SQL text, for the hand-written statements of the fast paths."""
    listed = ", ".join(f"'{s}'" for s in sorted(statuses))
    return f"({column} IN ({listed})) IS TRUE"
