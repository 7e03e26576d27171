"""Redis and the RQ queues: one client (one connection pool) per process, built from the app's
config the first time it is asked for, never at import."""

from __future__ import annotations

import redis
from flask import current_app
from rq import Queue

RUN_QUEUES = ("runs-urgent", "runs-high", "runs-default", "runs-low")
ALL_QUEUES = (*RUN_QUEUES, "events", "maintenance")


def get_redis() -> redis.Redis:
    """The app's Redis client (one connection pool per process)."""
    client = current_app.extensions.get("switchboard_redis")
    if client is None:
        client = redis.Redis.from_url(
            current_app.config["SWITCHBOARD_REDIS_URL"],
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
        current_app.extensions["switchboard_redis"] = client
    return client


def get_queue(name: str) -> Queue:
    queues: dict[str, Queue] = current_app.extensions.setdefault("switchboard_queues", {})
    if name not in queues:
        if name not in ALL_QUEUES:
            raise KeyError(f"unknown queue {name!r}")
        queues[name] = Queue(name, connection=get_redis())
    return queues[name]
