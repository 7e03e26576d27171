"""What the machines hear on the event bus: a run for machines was queued, so a machine with a
free slot may take it at once (in the transaction that queued it)."""

from __future__ import annotations

from typing import Any

from app import events
from app.machines import scheduling


def _queued(*, run: Any, **_: Any) -> None:
    scheduling.schedule(only_run=run.id)


def connect() -> None:
    events.machine_run_queued.connect(_queued)
