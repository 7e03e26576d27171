"""What a running job tells the worker that runs it (`workers.rq_worker.AppWorker` sets these up in
`flask.g`): that its work has begun, and where its last messages wait to go out with the end of
the job. Outside a worker both do nothing."""

from __future__ import annotations

import logging


def job_started() -> None:
    """The job's work has begun: the worker may now record the job's start in RQ (see
    `workers.rq_worker.AppWorker`). A no-op outside a worker. A Redis failure here must not end
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
    one round trip (`pubsub.handed_over`); None outside a worker (they are sent at once)."""
    from flask import g

    return g.get("job_end_messages")
