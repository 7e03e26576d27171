"""RQ job functions: thin. They receive ids, run inside the worker's app context and call
services; running one twice is harmless."""

from __future__ import annotations

import logging


def job_started() -> None:
    """The job's work has begun: the worker may now record the job's start in RQ (see
    `workers.worker.AppWorker`). A no-op outside a worker. A Redis failure here must not end
    the agent that just started: the run's lease, not RQ's record, keeps track of it."""
    from flask import g

    started = g.pop("job_started", None)
    if started is None:
        return
    try:
        started()
    except Exception as exc:
        logging.getLogger(__name__).warning("could not record the job's start in RQ: %s", exc)


def end_messages() -> list[tuple[str, str]] | None:
    """Where a job's last messages wait to go out with the worker's end-of-job bookkeeping, in
    one round trip (`live.handed_over`); None outside a worker (they are sent at once)."""
    from flask import g

    return g.get("job_end_messages")


def execute_run(run_id: int) -> str:
    from workers.executor import execute

    return execute(run_id)


def sweep() -> dict[str, int]:
    from app.runs.sweep import sweep as run_sweep

    return run_sweep()


def drain_events() -> int:
    from app.webhooks.service import drain

    return drain()


def deliver(delivery_id: int) -> str:
    from app.subscriptions.service import deliver as send

    return send(delivery_id)
