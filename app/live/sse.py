"""Server-Sent Events over Redis pub/sub.

One listener thread per process holds one Redis pub/sub connection and fans messages out to
per-client queues; channels are subscribed while at least one client wants them (ref-counted), so a
process receives only the traffic its clients watch. A stream subscribes *before* it replays from
the database, so nothing published in between is missed, and skips what it already sent.

`sse()` turns a generator of `Event`s into a streaming response with an immediate first comment
(proxies flush headers), `:ping` heartbeats, a `retry:` hint and `X-Accel-Buffering: no`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
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
from app.database import db
from app.errors import DomainError, ServiceUnavailable, TooManyRequests
from app.live import access
from app.live.pubsub import unpack
from app.queues import get_redis

log = logging.getLogger(__name__)

#: a client that falls this far behind is disconnected (it resumes with Last-Event-ID)
QUEUE_LIMIT = 10_000
#: what `Subscription.nudge` puts in a queue to wake a thread blocked on it
_NUDGE: dict[str, Any] = {"type": "nudge"}


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


class Overflow(Exception):
    """The client could not keep up; it will reconnect and resume."""


class Parking:
    """A stream's socket, for the hub to write to directly while the stream's thread sleeps.

    With a thousand subscribers of one busy run, waking a thousand threads per line is what a
    Python process cannot do; writing one pre-encoded frame to a thousand sockets from the hub
    thread it can. A stream parks only when it is caught up and idle; the hub writes the frames
    that simply continue it (`Follower.continue_with`) and wakes the thread for anything else
    (a status change, a gap, a slow client), which then takes its socket back."""

    def __init__(self, sock: socket.socket, chunked: bool) -> None:
        self.sock = sock
        self.chunked = chunked
        #: bytes of a frame the socket did not take at once: the thread sends them first
        self.owed = b""
        self.broken = False

    def frame(self, data: bytes) -> bytes:
        return b"%X\r\n%s\r\n" % (len(data), data) if self.chunked else data

    def try_send(self, data: bytes) -> bool:
        """Send without blocking; False when the thread must take over."""
        framed = self.frame(data)
        try:
            sent = self.sock.send(framed, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        except Exception:  # gone (EPIPE, reset): the thread ends the stream
            self.broken = True
            return False
        if sent < len(framed):
            self.owed = framed[sent:]
            return False
        return True

    def settle(self) -> None:
        """In the stream's thread, after it woke: finish what the hub started."""
        if self.broken:
            raise Overflow()  # the client is gone; end the stream
        if self.owed:
            owed, self.owed = self.owed, b""
            try:
                self.sock.sendall(owed)
            except OSError:
                raise Overflow() from None


class Subscription:
    def __init__(self, hub: Hub, channels: list[str]) -> None:
        self.hub = hub
        self.channels = channels
        self.queue: queue.Queue[Any] = queue.Queue(QUEUE_LIMIT)
        self.ready = threading.Event()
        self.overflowed = False
        #: guards parking: the hub writes for a parked stream, its thread otherwise
        self.lock = threading.Lock()
        #: the follower of a parked stream (its `parking` holds the socket)
        self.parked: Any = None
        self.wake = threading.Event()
        #: the stream's access may have changed: its thread returns from waiting (get: None,
        #: park: False, as after a quiet interval) until `sse()` has checked it
        self.nudged = False
        #: the stream this subscription serves (`access`), told apart from `Hub.on`'s
        self.watch: access.Watch | None = None

    def nudge(self) -> None:
        """From the listener thread: wake the stream's thread, wherever it waits."""
        with self.lock:
            self.nudged = True
            self.parked = None
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(_NUDGE)
            self.wake.set()

    def park(self, follower: Any, timeout: float) -> bool:
        """Sleep until the hub needs this stream's thread (True) or `timeout` passes (False);
        meanwhile the hub sends what `follower.continue_with` accepts. Returns at once (True)
        when a message is already waiting."""
        parking: Parking = follower.parking
        with self.lock:
            if self.nudged:
                return False
            if not self.queue.empty() or self.overflowed:
                return True
            self.wake.clear()
            self.parked = follower
        try:
            woken = self.wake.wait(timeout)
        finally:
            with self.lock:
                self.parked = None
        parking.settle()
        return woken

    def offer(self, item: dict[str, Any]) -> None:
        """From the hub: write it for a parked stream, or queue it for the thread."""
        with self.lock:
            follower = self.parked
            if follower is not None:
                frame = follower.continue_with(item)
                if frame is not None:
                    if follower.parking.try_send(frame):
                        return
                    self.parked = None  # the thread takes over (owed bytes, or broken)
                    self.wake.set()
                    return
                self.parked = None
            try:
                self.queue.put_nowait(item)
            except queue.Full:
                self.overflowed = True
            self.wake.set()

    def get(self, timeout: float) -> dict[str, Any] | None:
        if self.overflowed:
            raise Overflow()
        if self.nudged:
            return None
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            raise Overflow()
        if item is _NUDGE:
            return None
        return item

    def drain(self, limit: int) -> list[dict[str, Any]]:
        """Messages already waiting, without blocking."""
        items = []
        while len(items) < limit:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.overflowed = True
                break
            if item is not _NUDGE:
                items.append(item)
        return items

    def close(self) -> None:
        if self.watch is not None:
            self.watch.detach(self)
        self.hub.unsubscribe(self)


class Hub:
    """The process's single Redis pub/sub listener."""

    def __init__(self, url: str) -> None:
        self.url = url
        #: the listener's own channel: a message there wakes it to take new subscriptions now,
        #: instead of at its next poll (50 ms)
        self.wake_channel = f"sb:hub-wake:{socket.gethostname()}:{os.getpid()}:{id(self)}"
        self.wake_client: redis.Redis | None = None
        #: channels the process always hears, with what to call for each message
        self.callbacks: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self.lock = threading.Lock()
        self.subscribers: dict[str, set[Subscription]] = {}
        #: wakes the listener to (un)subscribe; a Subscription is told when it is listening
        self.changes: queue.Queue[Subscription | None] = queue.Queue()
        self.thread: threading.Thread | None = None

    # -- client side -----------------------------------------------------------------------------

    def subscribe(self, channels: list[str], timeout: float = 5.0) -> Subscription:
        sub = Subscription(self, list(channels))
        sub.watch = access.current()  # the stream this thread steps: it nudges `sub`
        if sub.watch is not None:
            sub.watch.attach(sub)
        self._ensure_thread()
        with self.lock:
            for ch in channels:
                self._attach(sub, ch)
        self.changes.put(sub)
        self._wake()
        if not sub.ready.wait(timeout):
            self.unsubscribe(sub)
            raise RuntimeError("Redis subscription timed out")
        return sub

    def on(
        self, channel: str, callback: Callable[[dict[str, Any]], None], wait: float = 1.0
    ) -> bool:
        """Call `callback(message)` for every message on `channel`, for the life of the process
        (it is heard again after Redis comes back). Whether the listener hears it already,
        after at most `wait` seconds."""
        sub = Subscription(self, [])
        self._ensure_thread()
        with self.lock:
            self.callbacks.setdefault(channel, []).append(callback)
        self.changes.put(sub)
        self._wake()
        return sub.ready.wait(wait)

    def _wake(self) -> None:
        try:
            if self.wake_client is None:
                self.wake_client = redis.Redis.from_url(self.url, socket_timeout=2)
            self.wake_client.publish(self.wake_channel, b"")
        except redis.RedisError:
            pass  # the listener takes the subscription at its next poll

    def _attach(self, sub: Subscription, channel: str) -> None:
        self.subscribers.setdefault(channel, set()).add(sub)

    def unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            for ch in sub.channels:
                members = self.subscribers.get(ch)
                if members is not None:
                    members.discard(sub)
                    if not members:
                        del self.subscribers[ch]
        self.changes.put(None)

    def channel_count(self) -> int:
        with self.lock:
            return len(self.subscribers)

    # -- listener thread -------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            with self.lock:
                if self.thread is None or not self.thread.is_alive():
                    self.thread = threading.Thread(target=self._run, name="sse-hub", daemon=True)
                    self.thread.start()

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                self._listen()
                failures = 0
            except Exception as exc:  # Redis went away: tell clients to reconnect, then retry
                failures += 1
                if failures == 1:
                    log.warning("stream hub lost Redis (%s); reconnecting", exc)
                with self.lock:
                    for members in self.subscribers.values():
                        for sub in members:
                            sub.overflowed = True
                            with contextlib.suppress(queue.Full):
                                sub.queue.put_nowait(None)
                            sub.wake.set()
                    callbacks = [c for cs in self.callbacks.values() for c in cs]
                for callback in callbacks:  # messages may have been missed meanwhile
                    with contextlib.suppress(Exception):
                        callback({"missed": True})
                time.sleep(0.5)

    def _listen(self) -> None:
        client = redis.Redis.from_url(self.url, health_check_interval=30)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(self.wake_channel)
        active: set[str] = set()
        try:
            while True:
                self._sync(pubsub, active)
                msg = pubsub.get_message(timeout=0.05)
                if msg is None:
                    continue
                channel = msg["channel"].decode()
                if channel == self.wake_channel:
                    continue  # new subscriptions: taken at the top of the loop
                try:
                    messages = unpack(msg["data"])
                except ValueError:
                    continue
                callbacks = self.callbacks.get(channel)
                if callbacks:
                    for data in messages:
                        for callback in list(callbacks):
                            try:
                                callback(data)
                            except Exception:
                                log.exception("a listener of %s failed", channel)
                    continue
                with self.lock:
                    targets = list(self.subscribers.get(channel, ()))
                for data in messages:
                    item = {"channel": channel, **data}  # shared: frames are encoded once
                    for sub in targets:
                        sub.offer(item)
        finally:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _sync(self, pubsub: redis.client.PubSub, active: set[str]) -> None:
        woken: list[Subscription] = []
        try:
            while True:
                sub = self.changes.get_nowait()
                if sub is not None:
                    woken.append(sub)
        except queue.Empty:
            pass
        if not woken and not self._dirty(active):
            return
        with self.lock:
            wanted = set(self.subscribers) | set(self.callbacks)
        new, gone = wanted - active, active - wanted
        if new:
            pubsub.subscribe(*new)
        if gone:
            pubsub.unsubscribe(*gone)
        active.clear()
        active.update(wanted)
        for sub in woken:
            sub.ready.set()

    def _dirty(self, active: set[str]) -> bool:
        with self.lock:
            return (set(self.subscribers) | set(self.callbacks)) != active


_hubs: dict[str, Hub] = {}
_hubs_lock = threading.Lock()


def hub() -> Hub:
    url = current_app.config["SWITCHBOARD_REDIS_URL"]
    with _hubs_lock:
        if url not in _hubs:
            _hubs[url] = Hub(url)
        return _hubs[url]


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
    """A user's open stream, counted in Redis so the cap holds across processes; each slot
    expires unless refreshed, so a crashed process cannot leak slots."""

    def __init__(self, user_id: int, cap: int, ttl: int) -> None:
        self.redis = get_redis()
        self.key = f"sb:streams:{user_id}"
        self.member = uuid.uuid4().hex
        self.ttl = ttl
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
                if event is None:
                    slot.refresh()
                    yield b":ping\n\n"
                elif isinstance(event, bytes):
                    yield event  # already encoded (shared by many subscribers)
                else:
                    yield event.encode()  # type: ignore[union-attr]
        except Overflow:
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
