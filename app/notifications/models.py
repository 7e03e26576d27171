from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.database import db
from app.timeutil import UTCDateTime, utcnow

#: what a person is told of
KINDS = ("question", "review", "task_failed", "machine_offline")
CHANNELS = ("in_app", "email", "chat")


class Notification(db.Model):
    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(32))
    #: the event it is about (one notification per event and user, however often it is said)
    key: Mapped[str] = mapped_column(sa.String(200))
    title: Mapped[str] = mapped_column(sa.String(300))
    body: Mapped[str] = mapped_column(sa.Text)
    #: the API path of what it is about
    link: Mapped[str | None] = mapped_column(sa.String(500))
    project_id: Mapped[int | None] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    data: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    read_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: the email and chat message, once sent (or folded into a digest: `folded`)
    emailed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    chatted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    folded: Mapped[bool] = mapped_column(default=False)
    send_error: Mapped[str | None] = mapped_column(sa.String(1000))

    __table_args__ = (
        sa.UniqueConstraint("user_id", "key", name="uq_notifications_user_key"),
        sa.Index("ix_notifications_user_unread", "user_id", "read_at", "id"),
    )


class NotificationSettings(db.Model):
    __tablename__ = "notification_settings"

    user_id: Mapped[int] = mapped_column(
        sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    #: {kind: {channel: bool}}; what is not said takes the default (`service.DEFAULTS`)
    channels: Mapped[dict[str, dict[str, bool]]] = mapped_column(sa.JSON, default=dict)
    #: a Slack-compatible incoming webhook (`{"text": …}` is posted to it)
    chat_url: Mapped[str | None] = mapped_column(sa.String(2000))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
