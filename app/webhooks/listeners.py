"""What the webhooks module hears on the event bus: the end of the tasks its rules made."""

from __future__ import annotations

from app import events
from app.webhooks import processing
from app.webhooks.models import TASK_SOURCE


def _made_by_a_rule(*, source: str, **_columns: str) -> str:
    return f"{source} = '{TASK_SOURCE}'"


def connect() -> None:
    events.task_ended.connect(processing.task_finished, interest=_made_by_a_rule)
