"""What the machines hear on the event bus: a run for machines was queued, so a machine with a
free slot may take it at once (in the transaction that queued it, or in a pass of its own once
it is committed); a run on a machine is to
stop, so its machine is told now (not at its next heartbeat); the maintenance sweep runs, so
offers not taken go back and what waits is assigned."""

from __future__ import annotations

from typing import Any

from app import events
from app.machines import scheduling


def _queued(*, run_id: int, committed: bool = False, **_: Any) -> None:
    if committed:
        scheduling.offer(run_id)
    else:
        scheduling.schedule(only_run=run_id)


def _stop_requested(*, run: Any, **_: Any) -> None:
    scheduling.tell_stop(run)


def _sweep(**_: Any) -> None:
    scheduling.sweep()


def connect() -> None:
    events.machine_run_queued.connect(_queued)
    events.maintenance_sweep.connect(_sweep)
    events.run_stop_requested.connect(_stop_requested)
