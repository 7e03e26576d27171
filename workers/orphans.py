"""Agents a dead pool worker left behind: when the sweep finds a run's lease expired
(`events.lease_expired`) and the run was held by a worker of this host, its agent's processes
(tagged with the run id and the executor's name) are ended."""

from __future__ import annotations

import logging
import socket
from typing import Any

from app import events
from workers.process import kill_tagged

log = logging.getLogger(__name__)


def end_left_behind(*, run_id: int, executor: str | None, **_: Any) -> None:
    if not executor or not executor.startswith(f"pool:{socket.gethostname()}:"):
        return  # another host's, a machine's or an external executor's: not ours to end
    killed = kill_tagged(f"SWITCHBOARD_RUN_ID={run_id}", f"SWITCHBOARD_EXECUTOR={executor}")
    if killed:
        log.warning("run %s: killed %d orphaned agent processes", run_id, len(killed))


def connect() -> None:
    events.lease_expired.connect(end_left_behind)
