from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.database import db
from app.timeutil import UTCDateTime, utcnow

#: the events a subscription may ask for ("*" is all of them)
EVENTS = (
    "task.created",
    "task.status",
    "task.finished",
    "run.started",
    "run.finished",
    # a machine's state changed (to an installation-wide subscription: they belong to no project)
    "machine.online",
    "machine.offline",
    "machine.draining",
    "machine.decommissioned",
    # an agent asked a person something; it was answered, or it expired
    "question.asked",
    "question.answered",
    "question.expired",
)
DELIVERY_STATES = ("pending", "delivering", "delivered", "dead")


class Subscription(db.Model):
    __tablename__ = "subscriptions"

    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(sa.String(2000))
    #: signs each delivery; never returned after creation
    secret: Mapped[str] = mapped_column(sa.String(500))
    events: Mapped[list[str]] = mapped_column(sa.JSON)
    #: only this project's events (None: every project)
    project_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("projects.id", ondelete="CASCADE"), index=True
    )
    description: Mapped[str | None] = mapped_column(sa.String(500))
    active: Mapped[bool] = mapped_column(default=True)
    created_by: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class Delivery(db.Model):
    """One event for one subscription, tried until delivered or dead."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    subscription_id: Mapped[int] = mapped_column(
        sa.ForeignKey("subscriptions.id", ondelete="CASCADE")
    )
    #: the `X-Switchboard-Delivery` header: the same on every attempt and redelivery
    guid: Mapped[str] = mapped_column(sa.String(64), unique=True)
    event: Mapped[str] = mapped_column(sa.String(64))
    body: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    state: Mapped[str] = mapped_column(sa.String(16), default="pending")
    #: attempts since it was created or last redelivered (the retry schedule counts these)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: when its job was last queued (the sweep queues it again if that job was lost)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    #: a worker sending it holds it until then (a worker killed mid-send lets go)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(sa.String(2000))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        sa.Index("ix_deliveries_subscription", "subscription_id", "id"),
        sa.Index("ix_deliveries_state_next", "state", "next_attempt_at"),
        sa.Index("ix_deliveries_created_at", "created_at"),
    )


class DeliveryAttempt(db.Model):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        sa.ForeignKey("deliveries.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int]
    status_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(sa.String(2000))
    duration_ms: Mapped[int]
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
