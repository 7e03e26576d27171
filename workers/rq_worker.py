"""The worker process: an RQ worker that runs our jobs inside the app context, in the process
itself (our jobs mostly wait on an agent, which is its own process already, and a fork per job
costs ~13 ms here), with parts of RQ's per-job bookkeeping folded into fewer round trips."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import redis
from flask import Flask, g
from redis.client import Pipeline
from rq import Queue, SimpleWorker
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.utils import now
from rq.worker import WorkerStatus
from sqlalchemy.orm import configure_mappers

from app.database import keep_autocommit_connection, remove_session
from app.live import pubsub
from app.queues import ALL_QUEUES, get_redis
from workers import orphans
from workers.run_driver import shutdown_requested

log = logging.getLogger("workers.pool")


#: how often the worker refreshes its RQ key outside of jobs (its time to live is minutes)
HEARTBEAT_EVERY = 30.0
#: how often the worker asks Redis whether `rq suspend` was called
SUSPENSION_CHECK_EVERY = 1.0


class AppWorker(SimpleWorker):
    app: Flask
    _beat_at = -HEARTBEAT_EVERY
    _suspension_checked_at = -SUSPENSION_CHECK_EVERY
    _state_written: str | None = None
    _preparing: Pipeline | None = None

    def check_for_suspension(self, burst: bool) -> None:
        """RQ asks Redis before every job; a suspension is seen within a second here (a worker
        already waiting for a job takes the next one either way, as with RQ's own check)."""
        at = time.monotonic()
        if not burst and at - self._suspension_checked_at < SUSPENSION_CHECK_EVERY:
            return
        self._suspension_checked_at = at
        super().check_for_suspension(burst)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ refreshes the worker's key before and after every dequeue and after every job,
        three commands and three round trips each time, one of them between a job's arrival
        and its start. Once every `HEARTBEAT_EVERY` seconds, in one round trip, is plenty."""
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        at = time.monotonic()
        if timeout is None and at - self._beat_at < HEARTBEAT_EVERY:
            return
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipeline=pipe)
            # the state too: `set_state` skips rewriting it, and a Redis that restarted lost it
            pipe.hset(self.key, "state", self._state)
            pipe.execute()
        self._beat_at = at if timeout is None else -HEARTBEAT_EVERY

    def execute_job(self, job: Any, queue: Queue) -> Any:
        with self.app.app_context():
            try:
                return super().execute_job(job, queue)
            finally:
                remove_session()

    # RQ records a job's start in two round trips before the job runs: its execution
    # (`prepare_execution`), then the job's state (`prepare_job_execution`). Here both are
    # queued in one pipeline that is sent when the job says its work has begun (`job_started`:
    # a run's agent is running) or when it ends, whichever comes first, so an agent's start
    # waits on none of RQ's bookkeeping. What happens to a run whose worker dies in between is
    # decided by the run's lease, not by RQ's registries.

    def prepare_execution(self, job: Job) -> Execution:
        pipe = self.connection.pipeline()
        execution = Execution.create(
            job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name
        )
        self.executions[execution.id] = execution
        self.set_state(WorkerStatus.BUSY, pipeline=pipe)
        self._preparing = pipe
        return execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        pipe = self._preparing or self.connection.pipeline()
        ttl = self.get_heartbeat_ttl(job)
        self.heartbeat(ttl, pipeline=pipe)
        job.heartbeat(now(), ttl, pipeline=pipe)
        job.prepare_for_execution(self.name, pipeline=pipe)
        pipe.persist(job.key)
        if remove_from_intermediate_queue:
            queue = Queue(job.origin, connection=self.connection)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        self._preparing = pipe
        g.job_started = self.send_preparation
        g.job_end_messages = []

    def send_preparation(self) -> None:
        pipe, self._preparing = self._preparing, None
        if pipe is not None:
            with pipe:
                pipe.execute()

    def perform_job(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """Whatever way the job ended, nothing it left to send with the end stays unsent."""
        try:
            return super().perform_job(job, queue, execution)
        finally:
            self.send_preparation()
            pubsub.send(g.pop("job_end_messages", None) or [])

    # After a job, RQ spends five round trips that the job's end does not need: the job's
    # heartbeat on its own, a WATCH and a read of the job's RQ dependents (to release them), and
    # the worker's IDLE state, written twice. Here the end is one transaction that also says
    # IDLE and carries the job's last messages (a run's end, `job_hooks.end_messages`); a job that
    # ended before its work was said to have begun skips the start bookkeeping, which the end
    # would undo (its job hash gets the start's fields with the end's); a state already written
    # is not written again.

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        job.ended_at = now()
        if self._preparing is not None:  # else the end's transaction follows at once
            job.heartbeat(now(), heartbeat_ttl, pipeline=self._preparing)

    def handle_job_failure(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        self.send_preparation()
        super().handle_job_failure(job, queue, *args, **kwargs)

    def handle_job_retry(self, job: Job, queue: Queue, *args: Any, **kwargs: Any) -> None:
        self.send_preparation()
        super().handle_job_retry(job, queue, *args, **kwargs)

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: Any, execution: Execution
    ) -> None:
        """RQ's, without releasing RQ-level dependents: no job of ours is enqueued with
        `depends_on` (a task's dependencies live in the database). A job that repeats, is
        rate-limited or has RQ dependencies takes RQ's own way."""
        if job.repeats_left or job.has_rate_limit or job._dependency_ids:
            self.send_preparation()
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        unsent, self._preparing = self._preparing, None
        if unsent is not None:
            # the job ended before its start was recorded: RQ's record goes from queued to
            # finished at once (the start's entries would be removed again in this transaction)
            unsent.reset()
        with self.connection.pipeline() as pipe:
            self.increment_successful_job_count(pipeline=pipe)
            self.increment_total_working_time(job.ended_at - job.started_at, pipe)  # type: ignore[operator]
            result_ttl = job.get_result_ttl(self.default_result_ttl)
            if result_ttl != 0:
                job._handle_success(
                    result_ttl,
                    pipeline=pipe,
                    worker_name=self.name,
                    execution_id=execution.id,
                    execution_started_at=execution.created_at,
                    execution_ended_at=job.ended_at,
                )
            job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
            job._status = JobStatus.FINISHED
            if unsent is None:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
            else:
                self.executions.pop(execution.id, None)
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            for channel, text in g.pop("job_end_messages", None) or ():
                pipe.publish(channel, text)
            try:
                pipe.execute()
            except redis.ConnectionError as exc:
                # Redis went away as the job ended: the run's end is in the database already;
                # only RQ's record of the job and the live notices are lost (streams replay)
                log.warning("job %s ended; RQ could not record it (Redis: %s)", job.id, exc)

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        """A state already written (or queued in a pipeline) is not written again on its own."""
        if pipeline is None and state == self._state_written:
            return
        super().set_state(state, pipeline)
        self._state_written = state

    def subscribe(self) -> None:
        """RQ's command channel, heard by a thread that looks up every second (RQ's asks it to
        wait 60 s for a message). Since redis-py 8.2, stopping that thread waits for it to look
        up: an idle worker took up to a minute to stop on SIGTERM, past every platform's kill."""
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def request_stop(self, signum: Any, frame: Any) -> None:
        """Warm shutdown: tell the running job to stop its agent (its run is queued again)."""
        shutdown_requested.set()
        super().request_stop(signum, frame)


def run_worker(app: Flask, queue_names: list[str] | None = None, *, burst: bool = False) -> bool:
    """One worker process (what the supervisor starts, and `--burst` runs directly)."""
    import workers.executor  # noqa: F401 - imported now, not by the first job (a slower start)

    orphans.connect()  # a sweep job here ends the agents a dead worker of this host left
    configure_mappers()
    connection = get_redis()
    queues = [Queue(name, connection=connection) for name in (queue_names or ALL_QUEUES)]
    worker = AppWorker(queues, connection=connection)
    worker.app = app
    keep_autocommit_connection()  # jobs run one at a time, in this thread
    # what start-up built lives as long as the process: keep the collector from walking it again
    # on every full collection (a pause of tens of ms in the middle of a run's start)
    gc.collect()
    gc.freeze()
    return worker.work(burst=burst, with_scheduler=False, logging_level="WARNING")
