"""What questions hear on the event bus: a run's end cancels its pending questions; the
maintenance sweep expires those nobody looked at."""

from __future__ import annotations

from typing import Any

from app import events
from app.questions import service


def _run_ended(*, run: Any, **_: Any) -> None:
    service.cancel_for(run)


def _sweep(**_: Any) -> None:
    service.expire_due()


def _has_pending(*, run_id: str, **_columns: str) -> str:
    return service.pending_for_run_sql(run_id)


def connect() -> None:
    events.run_ended.connect(_run_ended, interest=_has_pending)
    events.maintenance_sweep.connect(_sweep)
