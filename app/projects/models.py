from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.agents.registry import DEFAULT_INSTRUCTIONS
from app.database import db
from app.timeutil import UTCDateTime, utcnow

PROJECT_ROLES = ("viewer", "developer", "maintainer")
#: whether an agent's change waits for a person's approval before it is pushed
REVIEW_MODES = ("required", "none")


class Project(db.Model):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(sa.String(64), unique=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    description: Mapped[str | None] = mapped_column(sa.Text)
    repo_url: Mapped[str | None] = mapped_column(sa.String(1000))
    default_branch: Mapped[str] = mapped_column(sa.String(200), default="main")
    workdir: Mapped[str | None] = mapped_column(sa.String(1000))
    default_agent: Mapped[str] = mapped_column(sa.String(64), default="claude")
    #: None: no project-wide cap
    max_concurrent_runs: Mapped[int | None]
    #: bumped by every change to the project's secrets: workers remember them until it moves
    secrets_version: Mapped[int] = mapped_column(default=0, server_default="0")
    created_by: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    archived_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: None: `required` for a project with a repository, else `none` (`review_mode`)
    review: Mapped[str | None] = mapped_column(sa.String(8))
    #: who may approve a change: maintainers, or developers too
    review_role: Mapped[str] = mapped_column(
        sa.String(16), default="maintainer", server_default="maintainer"
    )

    #: what its agents are told of Switchboard (None: the default, `agents.registry`; "": none)
    agent_instructions: Mapped[str | None] = mapped_column(sa.Text)

    @property
    def instructions(self) -> str:
        return DEFAULT_INSTRUCTIONS if self.agent_instructions is None else self.agent_instructions

    @property
    def review_mode(self) -> str:
        """Whether a run's change waits for approval before it is pushed."""
        return self.review or ("required" if self.repo_url else "none")


class ProjectMember(db.Model):
    __tablename__ = "project_members"

    project_id: Mapped[int] = mapped_column(
        sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(sa.String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
