"""Live notifications on Redis pub/sub: what streams fan out and what executors listen to.

Publishing is best-effort: the database is the record, so a Redis hiccup never fails a run; a
stream that missed a message resumes from the database by offset.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import redis

from app.queues import get_redis

log = logging.getLogger(__name__)


def namespace() -> str:
    """Pub/sub channels ignore Redis database numbers: installations (or test sessions) sharing
    a Redis server on different dbs would hear each other. Channels carry the db number."""
    from flask import current_app

    return f"sb:{channel_db(current_app.config['SWITCHBOARD_REDIS_URL'])}"


@functools.lru_cache(maxsize=16)
def channel_db(url: str) -> str:
    from urllib.parse import parse_qs, urlparse

    parsed = urlparse(url)
    if parsed.scheme == "unix":
        return parse_qs(parsed.query).get("db", ["0"])[0]
    return (parsed.path or "/0").strip("/") or "0"


def run_channel(run_id: int) -> str:
    return f"{namespace()}:run:{run_id}"


def control_channel(run_id: int) -> str:
    return f"{namespace()}:run:{run_id}:control"


def machine_channel(machine_id: int) -> str:
    """What the server says to a machine, heard by the process holding its WebSocket."""
    return f"{namespace()}:machine:{machine_id}"


def to_machine(machine_id: int, message: dict[str, Any]) -> None:
    """`{"frame": {...}}` to send it, `{"close": reason}` to end its connection."""
    publish(machine_channel(machine_id), message)


def user_channel(user_id: int) -> str:
    """What concerns one person only (their notifications), heard by their activity stream."""
    return f"{namespace()}:user:{user_id}"


def activity_channel() -> str:
    return f"{namespace()}:activity"


#: what a transaction's after-commit callbacks send: jobs to enqueue, then messages to publish
_batch: ContextVar[tuple[list[Callable[[Any], Any]], list[tuple[str, str]]] | None] = ContextVar(
    "sb_publish_batch", default=None
)


@contextlib.contextmanager
def batched() -> Iterator[None]:
    """Send every publish (and job enqueued with `defer`) inside in one round trip, in order,
    when the block ends."""
    if _batch.get() is not None:
        yield
        return
    jobs: list[Callable[[Any], Any]] = []
    messages: list[tuple[str, str]] = []
    token = _batch.set((jobs, messages))
    try:
        yield
    finally:
        _batch.reset(token)
        send(_coalesced(messages), jobs)


#: after Redis could not be reached, sends are skipped for this long: the client's retries take
#: seconds, and every request and every agent's output would wait for them while Redis is away.
#: Nothing skipped is lost for good: live subscribers resume from the database (Last-Event-ID),
#: the sweep queues again the runs whose job never came, a stop is also seen by the lease.
REDIS_BACKOFF_SECONDS = 2.0


def _redis_to_send() -> Any:
    """The app's Redis client, or None while it is backing off after a failure."""
    client = get_redis()
    if time.monotonic() < getattr(client, "sb_away_until", 0.0):
        return None
    return client


def _failed(client: Any, exc: Exception) -> None:
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        client.sb_away_until = time.monotonic() + REDIS_BACKOFF_SECONDS


def send(messages: list[tuple[str, str]], jobs: list[Callable[[Any], Any]] | None = None) -> None:
    """Send (channel, text) messages as they are, and `jobs` before them, in one round trip; a
    failure is logged, never raised: a notification must not break what it reports."""
    if not jobs and not messages:
        return
    into = _handover.get()
    if into is not None and not jobs:
        into.extend(messages)
        return
    client = _redis_to_send()
    if client is None:
        log.debug("Redis is away: %d jobs, %d messages not sent", len(jobs or []), len(messages))
        return
    try:
        _send(client, jobs or [], messages)
    except Exception as exc:
        _failed(client, exc)
        log.warning("could not send %d jobs, %d messages: %s", len(jobs or []), len(messages), exc)


#: where a block's messages go instead of Redis (see `handed_over`)
_handover: ContextVar[list[tuple[str, str]] | None] = ContextVar("sb_handover", default=None)


@contextlib.contextmanager
def handed_over(into: list[tuple[str, str]] | None) -> Iterator[None]:
    """The messages that batches inside would send are added to `into` instead (channel, text),
    for the caller to send with its own next round trip: the worker sends a run's last ones with
    its end-of-job bookkeeping. None: sent as usual."""
    token = _handover.set(into)
    try:
        yield
    finally:
        _handover.reset(token)


def _send(client: Any, jobs: list[Callable[[Any], Any]], publishes: list[tuple[str, str]]) -> None:
    if not jobs and len(publishes) == 1:  # one command needs no pipeline
        client.publish(*publishes[0])
        return
    # jobs first: RQ puts the pipeline in MULTI mode, which must precede any command
    pipe = client.pipeline(transaction=False)
    for command in jobs:
        command(pipe)
    for channel, text in publishes:
        pipe.publish(channel, text)
    pipe.execute()


def _coalesced(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One publish per channel: several messages for a channel go as one JSON array, in order
    (`unpack` reads both forms)."""
    by_channel: dict[str, list[str]] = {}
    for channel, text in messages:
        by_channel.setdefault(channel, []).append(text)
    return [
        (channel, texts[0] if len(texts) == 1 else "[" + ",".join(texts) + "]")
        for channel, texts in by_channel.items()
    ]


def unpack(data: bytes | str) -> list[dict[str, Any]]:
    """The messages in one pub/sub payload (a message, or an array of them)."""
    value = json.loads(data)
    return value if isinstance(value, list) else [value]


def defer(command: Callable[[Any], Any]) -> bool:
    """Add `command(pipeline)` to the open batch; False when there is none (run it yourself)."""
    pending = _batch.get()
    if pending is None:
        return False
    pending[0].append(command)
    return True


def publish(channel: str, message: dict[str, Any]) -> None:
    text = json.dumps(message, separators=(",", ":"))
    pending = _batch.get()
    if pending is not None:
        pending[1].append((channel, text))
        return
    client = _redis_to_send()
    if client is None:
        return  # Redis is away (see REDIS_BACKOFF_SECONDS)
    try:
        client.publish(channel, text)
    except Exception as exc:  # never let a notification break the state change it reports
        _failed(client, exc)
        log.warning("could not publish on %s: %s", channel, exc)


def run_log(run_id: int, offset: int, data: bytes) -> None:
    publish(
        run_channel(run_id),
        {
            "type": "log",
            "offset": offset,
            "size": len(data),
            "text": data.decode("utf-8", "replace"),
        },
    )


def run_status(run_id: int, status: str, exit_code: int | None = None) -> None:
    publish(run_channel(run_id), {"type": "status", "status": status, "exit_code": exit_code})


def run_events(run_id: int, events: list[dict[str, Any]]) -> None:
    publish(run_channel(run_id), {"type": "events", "events": events})


def request_stop(run_id: int) -> None:
    publish(control_channel(run_id), {"type": "stop"})
