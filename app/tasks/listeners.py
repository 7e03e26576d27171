"""What the task lifecycle hears on the event bus: a project's cap changed, so queued runs may
fit now."""

from __future__ import annotations

from typing import Any

from app import events
from app.tasks import lifecycle


def _capacity_changed(*, project_id: int, **_: Any) -> None:
    lifecycle.dispatch(project_id)


def connect() -> None:
    events.project_capacity_changed.connect(_capacity_changed)
