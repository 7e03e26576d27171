"""RQ job functions: thin. They receive ids, run inside the worker's app context and call
services; running one twice is harmless."""

from __future__ import annotations

from app.runs.sweep import sweep as run_sweep
from app.subscriptions.deliveries import deliver as send
from app.webhooks.processing import drain
from workers.executor import execute


def execute_run(run_id: int) -> str:
    return execute(run_id)


def sweep() -> dict[str, int]:
    return run_sweep()


def drain_events() -> int:
    return drain()


def deliver(delivery_id: int) -> str:
    return send(delivery_id)
