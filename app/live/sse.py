"""Server-Sent Events over Redis pub/sub (the process's listener is `hub`).

A stream subscribes *before* it replays from the database, so nothing published in between is
missed, and skips what it already sent.

`sse()` turns a generator of `Event`s into a streaming response with an immediate first comment
(proxies flush headers), `:ping` heartbeats, a `retry:` hint and `X-Accel-Buffering: no`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from flask import Response, current_app, g, request

from app.auth import cache as auth_cache
from app.auth import service as auth_service
from app.auth.guard import check_abilities, current_principal, required_abilities
from app.database import database_unavailable, db
from app.errors import DomainError, ServiceUnavailable, TooManyRequests
from app.live import access, alive
from app.live.hub import Overflow, Parking, hub, stop_following, stopping
from app.queues import get_redis

log = logging.getLogger(__name__)


@dataclass
class Event:
    event: str
    data: Any
    id: str | None = None

    def encode(self) -> bytes:
        lines = []
        if self.id is not None:
            lines.append(f"id: {self.id}")
        lines.append(f"event: {self.event}")
        lines.append("data: " + json.dumps(self.data, separators=(",", ":"), default=str))
        return ("\n".join(lines) + "\n\n").encode()


# -- caps on concurrent streams: per process (threads left for the API), per user ---------------


class ProcessStreams:
    """The streams this process serves. Each holds a web thread for as long as it is open; past
    `SWITCHBOARD_STREAMS_PER_PROCESS` a new one is refused (503, Retry-After), so that some
    threads always answer the API (8 users with 4 streams each took every thread of two
    16-thread processes, and `/health` timed out)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0

    def take(self, cap: int) -> Callable[[], None]:
        """A slot, and the function that gives it back (once, however often called)."""
        with self.lock:
            if cap > 0 and self.open >= cap:
                raise ServiceUnavailable(
                    f"This server process serves {cap} streams already; try again shortly, "
                    "or ask the operator to run a stream process (docs/operations.md).",
                    retry_after=5,
                )
            self.open += 1
        given_back = threading.Event()

        def give_back() -> None:
            if not given_back.is_set():
                given_back.set()
                with self.lock:
                    self.open -= 1

        return give_back


process_streams = ProcessStreams()


class StreamSlot:
    """A user's open stream, counted in Redis so the cap holds across processes. Each slot is
    marked with its process (`alive`): the slots of a process that died are dropped when the
    next is taken, once its heartbeat is gone (seconds); each also expires unless refreshed."""

    def __init__(self, user_id: int, cap: int, ttl: int) -> None:
        self.redis = get_redis()
        self.key = f"sb:streams:{user_id}"
        me = alive.heartbeat.me(self.redis)
        self.member = f"{me}|{uuid.uuid4().hex}"
        self.ttl = ttl
        self._drop_the_dead(me)
        now = time.time()
        pipe = self.redis.pipeline()
        pipe.zremrangebyscore(self.key, "-inf", now)
        pipe.zadd(self.key, {self.member: now + ttl})
        pipe.zcard(self.key)
        pipe.expire(self.key, ttl)
        count = pipe.execute()[2]
        if count > cap:
            self.redis.zrem(self.key, self.member)
            raise TooManyRequests(f"At most {cap} streams may be open at once.", retry_after=5)

    def _drop_the_dead(self, me: str) -> None:
        """Give back the slots of processes whose heartbeat is gone (killed with -9); this
        process is alive whatever Redis says (it may have lost the key a moment ago)."""
        held = [m.decode() for m in self.redis.zrange(self.key, 0, -1)]
        owners = {m.split("|", 1)[0] for m in held if "|" in m} - {me}
        dead = owners - alive.living(self.redis, owners)
        if dead:
            self.redis.zrem(self.key, *[m for m in held if m.split("|", 1)[0] in dead])

    def refresh(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.redis.zadd(self.key, {self.member: time.time() + self.ttl})
            self.redis.expire(self.key, self.ttl)

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.redis.zrem(self.key, self.member)


def last_event_id() -> str | None:
    return request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or None


def _no_delay() -> None:
    """Small events must leave at once, not wait for Nagle and delayed ACKs (~40 ms)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parking() -> Parking | None:
    """This request's socket, when the server lets a stream write to it from another thread
    (gunicorn: the socket and the response's framing are known); None elsewhere."""
    sock = request.environ.get("gunicorn.socket")
    if (
        sock is None
        or isinstance(sock, ssl.SSLSocket)  # TLS records are gunicorn's to write
        or request.environ.get("SERVER_PROTOCOL") not in ("HTTP/1.1", "HTTP/1.0")
    ):
        return None
    return Parking(sock, chunked=request.environ["SERVER_PROTOCOL"] == "HTTP/1.1")


def sse(events: Iterator[Event | bytes | None], still_allowed: Callable[[], object]) -> Response:
    """A streaming response from `events`, which yields an `Event` to send or None when it has
    waited `ping_interval()` with nothing to say (a heartbeat goes out instead).

    `still_allowed` is the view's own check of the resource (it raises when the current
    principal may not follow it); when a change to the user's access is announced, the stream
    checks its credential and that again, and ends with a `closed` event if either fails."""
    cfg = current_app.config
    principal = current_principal()
    required = required_abilities()
    give_back = process_streams.take(cfg["SWITCHBOARD_STREAMS_PER_PROCESS"])
    try:
        slot = StreamSlot(
            principal.user.id,
            cfg["SWITCHBOARD_STREAM_CAP"],
            ttl=max(30, cfg["SWITCHBOARD_STREAM_PING_SECONDS"] * 3),
        )
    except BaseException:
        give_back()
        raise
    _no_delay()
    db.session.remove()  # streams hold no database connection between replays

    def check() -> None:
        fresh = auth_service.reconfirm(principal)
        check_abilities(fresh, required)
        g.principal = fresh
        still_allowed()

    watch = access.Watch(principal.user.id, check)
    watches().add(watch)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    done = object()

    def body() -> Iterator[bytes]:
        # Each step runs in its own app context, entered and left between yields: a stream
        # holds no context (nor database session) while it waits for its client.
        try:
            yield f": stream open\nretry: {cfg['SWITCHBOARD_STREAM_RETRY_MS']}\n\n".encode()
            while True:
                access.stepping(watch)
                try:
                    with app.app_context():
                        event = next(events, done)
                        ended = _access_ended(watch)
                finally:
                    access.stepping(None)
                if ended is not None:
                    yield ended
                    return
                if event is done:
                    return
                if stopping():
                    yield RECONNECT
                    return
                if event is None:
                    slot.refresh()
                    yield b":ping\n\n"
                elif isinstance(event, bytes):
                    yield event  # already encoded (shared by many subscribers)
                else:
                    yield event.encode()  # type: ignore[union-attr]
        except Overflow:
            if stopping():
                yield RECONNECT
            return
        except Exception as exc:
            # the stream ends with its last chunk, not cut off: the client resumes with
            # Last-Event-ID (the database away is a fault to ride out, not a bug to report)
            if database_unavailable(exc):
                log.warning("a stream ended: the database is unavailable (%s)", type(exc).__name__)
            else:
                log.exception("a stream failed; it ends and its client resumes")
            return
        finally:
            _watches.remove(watch)
            slot.release()
            give_back()
            with contextlib.suppress(Exception), app.app_context():
                events.close()  # type: ignore[attr-defined]

    resp = Response(body(), mimetype="text/event-stream")
    resp.call_on_close(give_back)  # also when the body never started
    resp.call_on_close(slot.release)
    resp.call_on_close(lambda: _watches.remove(watch))
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


#: the last frame of a stream whose process is stopping: come back soon, to another process
#: (EventSource reconnects by itself after `retry` ms, sending Last-Event-ID)
RECONNECT = b"retry: 500\n: server restarting; reconnect with Last-Event-ID\n\n"


def stop_streams() -> None:
    """SIGTERM (a deploy or a scale-down): every open stream of this process ends within a
    moment with `RECONNECT`, and every long-poll answers with what it has, so the process exits
    in seconds instead of at the platform's kill."""
    stop_following()
    _watches.heard({"missed": True})  # streams between a task's runs wait on no hub: wake them


def on_stop_signal(previous: Callable[..., Any]) -> Callable[..., None]:
    """A SIGTERM handler that ends the streams (in a thread: a signal handler must not wait on
    their locks), then does what `previous` (the server's own handler) did."""

    def handler(signum: int, frame: Any) -> None:
        threading.Thread(target=stop_streams, name="stop-streams", daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    return handler


def _access_ended(watch: access.Watch) -> bytes | None:
    """The `closed` frame when a due check finds the stream's access gone; else None."""
    if not watch.take_due():
        return None
    try:
        watch.check()
    except DomainError as exc:
        return Event(
            "closed", {"reason": "access_ended", "status": exc.status, "detail": exc.detail}
        ).encode()
    finally:
        db.session.remove()
    return None


_watches = access.Watches()
_watched: set[str] = set()
_watched_lock = threading.Lock()


def watches() -> access.Watches:
    """This process's open streams; the first call has the listener tell them of changes."""
    url = current_app.config["SWITCHBOARD_REDIS_URL"]
    if url not in _watched:
        with _watched_lock:
            if url not in _watched:
                hub().on(auth_cache.channel(), _watches.heard)
                _watched.add(url)
    return _watches


def ping_interval() -> float:
    return float(current_app.config["SWITCHBOARD_STREAM_PING_SECONDS"])


STREAM_DOC = {
    "responses": {
        "200": {
            "description": "Server-Sent Events (`text/event-stream`). Each event has `id:` "
            "(resume with the `Last-Event-ID` header or `?last_event_id=`), `event:` and "
            "`data:` (JSON); `:ping` comments keep idle connections open.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
    "parameters": [
        {
            "in": "query",
            "name": "last_event_id",
            "schema": {"type": "string"},
            "description": "resume after this event id (EventSource sends the header itself)",
        },
        {
            "in": "query",
            "name": "stream_token",
            "schema": {"type": "string"},
            "description": "a token from POST /api/v1/auth/stream-token, for clients that cannot "
            "send headers (EventSource)",
        },
    ],
}


def stream_view(func):  # type: ignore[no-untyped-def]
    """Mark a view as a stream: it accepts `?stream_token=` and is documented as SSE."""
    from flask_smorest.utils import deepupdate

    func._stream = True
    apidoc = getattr(func, "_apidoc", {})
    apidoc["manual_doc"] = deepupdate(apidoc.get("manual_doc", {}), STREAM_DOC)
    func._apidoc = apidoc
    return func
