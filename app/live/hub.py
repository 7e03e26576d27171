"""One Redis pub/sub listener per process, and what streams wait on.

The listener thread holds one pub/sub connection and fans messages out to per-client queues
(`Subscription`); channels are subscribed while at least one client wants them (ref-counted), so
a process receives only the traffic its clients watch. Channels heard for the life of the process
(credential changes, waiters) get callbacks instead (`Hub.on`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import current_app

from app.live import access
from app.live.pubsub import unpack

log = logging.getLogger(__name__)

#: a client that falls this far behind is disconnected (it resumes with Last-Event-ID)
QUEUE_LIMIT = 10_000
#: what `Subscription.nudge` puts in a queue to wake a thread blocked on it
_NUDGE: dict[str, Any] = {"type": "nudge"}


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

    def cut(self) -> None:
        """Its client must reconnect (Redis went away, or the process is stopping): a waiting
        thread wakes, and its next `get` raises `Overflow`."""
        with self.lock:
            self.overflowed = True
            self.parked = None
            with contextlib.suppress(queue.Full):
                self.queue.put_nowait(None)
            self.wake.set()

    def close(self) -> None:
        if self.watch is not None:
            self.watch.detach(self)
        self.hub.unsubscribe(self)


class Forwarding(Subscription):
    """A subscription whose messages are handed to `deliver` in the listener's thread, for a
    connection written to directly (a machine's WebSocket): no thread waits for them. `cut`
    tells the connection to go (Redis went away, or the process is stopping)."""

    def __init__(
        self,
        hub: Hub,
        channels: list[str],
        deliver: Callable[[dict[str, Any]], None],
        on_cut: Callable[[], None],
    ) -> None:
        super().__init__(hub, channels)
        self.deliver, self.on_cut = deliver, on_cut

    def offer(self, item: dict[str, Any]) -> None:
        try:
            self.deliver(item)
        except Exception:
            log.exception("forwarding a message on %s failed", item.get("channel"))

    def cut(self) -> None:
        super().cut()
        try:
            self.on_cut()
        except Exception:
            log.exception("ending a forwarded connection failed")


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

    def subscribe(
        self, channels: list[str], timeout: float = 5.0, *, forward: Any = None
    ) -> Subscription:
        """A subscription to `channels`, listening when this returns. `forward`: a
        `(deliver, on_cut)` pair to hand messages to instead of queueing them (`Forwarding`)."""
        if forward is not None:
            sub: Subscription = Forwarding(self, list(channels), *forward)
        else:
            sub = Subscription(self, list(channels))
        if stopping():  # a stopping process takes no new followers: they go elsewhere
            sub.cut()
            return sub
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

    def cut_all(self) -> None:
        with self.lock:
            members = [sub for subs in self.subscribers.values() for sub in subs]
        for sub in members:
            sub.cut()

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
                self.cut_all()
                with self.lock:
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
_stopping = threading.Event()


def stopping() -> bool:
    """Whether this process is stopping (SIGTERM): its followers are sent elsewhere."""
    return _stopping.is_set()


def stop_following() -> None:
    """The process is stopping: every stream and long-poll waiting on a hub returns now, as
    when Redis goes away, and new ones are cut at once."""
    _stopping.set()
    with _hubs_lock:
        hubs = list(_hubs.values())
    for each in hubs:
        each.cut_all()


def hub() -> Hub:
    url = current_app.config["SWITCHBOARD_REDIS_URL"]
    with _hubs_lock:
        if url not in _hubs:
            _hubs[url] = Hub(url)
        return _hubs[url]
