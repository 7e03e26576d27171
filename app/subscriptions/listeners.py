"""What outbound subscriptions hear on the event bus: every activity entry, which `fanout`
turns into deliveries for the subscriptions that want it."""

from __future__ import annotations

from typing import Any

from app import events
from app.subscriptions import deliveries


def _activity(*, project_id: int | None, kind: str, data: dict[str, Any], **_: Any) -> None:
    deliveries.fanout(project_id, kind, data)


def _a_subscription_listens(*, project_id: str, **_columns: str) -> str:
    """Any active subscription for the project (or for every project) may want the entry."""
    return (
        "EXISTS (SELECT 1 FROM subscriptions s WHERE s.active"
        f" AND (s.project_id IS NULL OR s.project_id = {project_id}))"
    )


def connect() -> None:
    events.activity_recorded.connect(_activity, interest=_a_subscription_listens)
