"""The server's own worker: an RQ worker that runs jobs inside the Flask app context.

Jobs run in the worker process itself (no fork per job): our jobs mostly wait on an agent, which is
its own process already, and a fork per job costs ~13 ms here. The worker configures SQLAlchemy's
mappers once, up front, and each job gets a fresh app context and DB session.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from rq import Queue, SimpleWorker
from sqlalchemy.orm import configure_mappers

from app.extensions import ALL_QUEUES, db, get_redis


class AppWorker(SimpleWorker):
    app: Flask

    def execute_job(self, job: Any, queue: Queue) -> Any:
        with self.app.app_context():
            try:
                return super().execute_job(job, queue)
            finally:
                db.session.remove()


def run_worker(app: Flask, queue_names: list[str] | None = None, *, burst: bool = False) -> bool:
    configure_mappers()
    connection = get_redis()
    queues = [Queue(name, connection=connection) for name in (queue_names or ALL_QUEUES)]
    worker = AppWorker(queues, connection=connection)
    worker.app = app
    return worker.work(burst=burst, with_scheduler=True, logging_level="INFO")
