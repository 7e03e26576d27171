"""RQ job functions: thin. They receive ids, run inside the worker's app context and call
services; running one twice is harmless."""

from __future__ import annotations


def execute_run(run_id: int) -> str:
    from workers.executor import execute

    return execute(run_id)


def sweep() -> dict[str, int]:
    from app.runs.sweep import sweep as run_sweep

    return run_sweep()


def drain_events() -> int:
    from app.webhooks.processing import drain

    return drain()


def deliver(delivery_id: int) -> str:
    from app.subscriptions.deliveries import deliver as send

    return send(delivery_id)
