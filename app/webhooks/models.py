from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.database import db
from app.timeutil import UTCDateTime, utcnow

SOURCE_KINDS = ("github", "generic")
EVENT_STATES = ("received", "matched", "skipped", "dispatched", "completed", "failed")
#: the `source` of the tasks a rule makes: their end is followed by their event
TASK_SOURCE = "webhook"


class WebhookSource(db.Model):
    """Where deliveries come from: one URL and one secret per GitHub organisation, app or system."""

    __tablename__ = "webhook_sources"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    #: kept to verify signatures (HMAC needs the secret itself); never returned by the API
    secret: Mapped[str] = mapped_column(sa.String(500))
    created_by: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class SourceGrant(db.Model):
    """A project may attach rules to a source: a source's deliveries (private repositories'
    issues and comments among them) reach only the projects an administrator granted it to."""

    __tablename__ = "webhook_source_projects"

    source_id: Mapped[int] = mapped_column(
        sa.ForeignKey("webhook_sources.id", ondelete="CASCADE"), primary_key=True
    )
    project_id: Mapped[int] = mapped_column(
        sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    granted_by: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WebhookEvent(db.Model):
    """One delivery, stored once per (source, delivery id)."""

    __tablename__ = "webhook_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("webhook_sources.id", ondelete="SET NULL")
    )
    #: kept as text so events outlive their source
    source_name: Mapped[str] = mapped_column(sa.String(64))
    delivery_id: Mapped[str] = mapped_column(sa.String(200))
    event_type: Mapped[str] = mapped_column(sa.String(100))
    action: Mapped[str | None] = mapped_column(sa.String(100))
    headers: Mapped[dict[str, str]] = mapped_column(sa.JSON)
    payload: Mapped[Any] = mapped_column(sa.JSON)
    state: Mapped[str] = mapped_column(sa.String(16), default="received")
    error: Mapped[str | None] = mapped_column(sa.Text)
    remote_addr: Mapped[str | None] = mapped_column(sa.String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        sa.UniqueConstraint("source_name", "delivery_id", name="uq_webhook_events_delivery"),
        sa.Index("ix_webhook_events_state", "state", "id"),
        sa.Index("ix_webhook_events_received_at", "received_at"),
    )


class Rule(db.Model):
    """A project's mapping from an event (type, action, conditions) to a task template."""

    __tablename__ = "webhook_rules"

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(
        sa.ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(sa.String(200))
    source_id: Mapped[int] = mapped_column(
        sa.ForeignKey("webhook_sources.id", ondelete="RESTRICT"), index=True
    )
    event: Mapped[str] = mapped_column(sa.String(100))
    actions: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    conditions: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    task: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    enabled: Mapped[bool] = mapped_column(default=True)
    #: tasks are created on this user's behalf (the rule's last editor), with their role
    author_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    #: the abilities the author saved it with (a token's, or a session's): its tasks are made
    #: with no more than those, and no more than the author's role allows now
    author_abilities: Mapped[list[str] | None] = mapped_column(sa.JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class EventMatch(db.Model):
    """An event matched a rule; the unique pair is what makes it one task per rule, ever."""

    __tablename__ = "webhook_event_matches"

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(
        sa.ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    rule_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("webhook_rules.id", ondelete="SET NULL")
    )
    project_id: Mapped[int] = mapped_column(
        sa.ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    task_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("tasks.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (sa.UniqueConstraint("event_id", "rule_id", name="uq_event_matches_rule"),)
