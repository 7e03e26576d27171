from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.database import db
from app.projects.models import Project
from app.timeutil import UTCDateTime, utcnow

KINDS = ("confirm", "choice", "text")
STATUSES = ("pending", "answered", "expired", "cancelled")
#: what a `confirm` question is answered with
CONFIRM = ("yes", "no")


class Question(db.Model):
    __tablename__ = "questions"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(sa.ForeignKey("tasks.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(8))
    prompt: Mapped[str] = mapped_column(sa.Text)
    options: Mapped[list[str] | None] = mapped_column(sa.JSON)
    #: what an expired question answers (None: the agent is told it expired)
    default: Mapped[str | None] = mapped_column("default_answer", sa.Text)
    timeout_s: Mapped[int | None]
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(sa.String(10), default="pending")
    answer: Mapped[str | None] = mapped_column(sa.Text)
    answered_by_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("users.id", ondelete="SET NULL")
    )
    answered_by_name: Mapped[str | None] = mapped_column(sa.String(150))
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    project: Mapped[Project] = relationship(lazy="select", viewonly=True)

    __table_args__ = (
        sa.Index("ix_questions_project_status", "project_id", "status", "id"),
        sa.Index("ix_questions_run_status", "run_id", "status"),
    )

    def public(self) -> dict[str, Any]:
        """What streams, the activity feed and webhooks carry of it."""
        return {
            "id": self.id,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "kind": self.kind,
            "prompt": self.prompt,
            "options": self.options,
            "status": self.status,
            "answer": self.answer,
            "answered_by": self.answered_by_name,
        }
