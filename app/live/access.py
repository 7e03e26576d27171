"""Streams end when their access does.

A stream is authorized once, when it opens, and may then stay open for hours. Whatever changes
what a user may see (a membership or role, deactivation, a logout, a revoked token) is already
announced on Redis (`auth.cache.changed`); every process hears it through its one listener, and
each stream of that user is *nudged*: its thread wakes from whatever it waits on (a Redis
subscription, a parked socket, the pause between a task's runs), the stream checks its
credential and the resource again as it did when it opened, and ends if either is gone.

The nudge reaches a stream's subscriptions because they are made in the stream's own thread:
`sse()` makes the stream's `Watch` current while it steps the stream, and `Hub.subscribe` ties
new subscriptions to the current watch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

#: the stream stepped by this thread, if any
_local = threading.local()


class Watch:
    """One open stream's claim to access: who holds it, and how to check it again."""

    def __init__(self, user_id: int, check: Callable[[], None]) -> None:
        self.user_id = user_id
        #: raises a `DomainError` (401/403/404) when the stream may no longer follow
        self.check = check
        self.due = False
        self.lock = threading.Lock()
        self.subscriptions: set[Any] = set()

    def heard(self) -> None:
        """From the listener thread: access may have changed; wake the stream to look."""
        with self.lock:
            self.due = True
            subs = list(self.subscriptions)
        for sub in subs:
            sub.nudge()

    def take_due(self) -> bool:
        """In the stream's thread: whether a check is due (and it is no longer)."""
        with self.lock:
            due, self.due = self.due, False
            subs = list(self.subscriptions)
        if due:
            for sub in subs:
                sub.nudged = False
        return due

    def attach(self, sub: Any) -> None:
        with self.lock:
            self.subscriptions.add(sub)
            if self.due:
                sub.nudge()

    def detach(self, sub: Any) -> None:
        with self.lock:
            self.subscriptions.discard(sub)


class Watches:
    """A process's open streams by user, told when an announcement concerns them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_user: dict[int, set[Watch]] = {}

    def add(self, watch: Watch) -> None:
        with self.lock:
            self.by_user.setdefault(watch.user_id, set()).add(watch)

    def remove(self, watch: Watch) -> None:
        with self.lock:
            watches = self.by_user.get(watch.user_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self.by_user[watch.user_id]

    def heard(self, message: dict[str, Any]) -> None:
        """An announcement (`{"user_id": n}`), or the listener saying it may have missed some:
        then every stream looks again."""
        user_id = message.get("user_id")
        with self.lock:
            if message.get("missed") or user_id is None:
                targets = [w for ws in self.by_user.values() for w in ws]
            else:
                targets = list(self.by_user.get(int(user_id), ()))
        for watch in targets:
            watch.heard()


def current() -> Watch | None:
    return getattr(_local, "watch", None)


def stepping(watch: Watch | None) -> None:
    """Make `watch` the stream this thread steps (None: no stream)."""
    _local.watch = watch


def check_due() -> bool:
    """For a stream that waits without a subscription (a task between runs): whether its
    access should be checked now (it then yields a heartbeat, and `sse()` checks)."""
    watch = current()
    return watch is not None and watch.due
