"""What a process remembers of credentials for a few seconds: a repeated bearer token's user, a
personal access token's row, and a user's role in a project — so that a script polling a run
costs one query, not three. `SWITCHBOARD_AUTH_CACHE_SECONDS` bounds how long (0: never).

A change that matters (a user deactivated, a role changed, a token revoked, a membership
changed) is forgotten at once by the process that made it and announced on Redis after its
commit; every process hears the announcement through its one Redis listener (`live.hub`) and
forgets too. Should Redis lose an announcement, the few seconds bound what is served.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from flask import Flask, current_app

from app.database import after_commit
from app.live import pubsub

log = logging.getLogger(__name__)
#: a process remembers at most this many credentials and roles (expired ones are dropped first)
MAX_ENTRIES = 10_000


class Remembered:
    """One app's memory (values are column dicts or roles, keyed by what a request presents)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.entries: dict[tuple[Any, ...], tuple[float, int, Any]] = {}  # key → (until, user, v)

    def get(self, key: tuple[Any, ...]) -> Any | None:
        found = self.entries.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        return found[2]

    def put(self, key: tuple[Any, ...], user_id: int, value: Any) -> None:
        if self.seconds > 0:
            now = time.monotonic()
            with self.lock:
                if len(self.entries) >= MAX_ENTRIES:  # what has expired goes, then the oldest
                    self.entries = {k: v for k, v in self.entries.items() if v[0] >= now}
                    while len(self.entries) >= MAX_ENTRIES:
                        del self.entries[next(iter(self.entries))]
                self.entries[key] = (now + self.seconds, user_id, value)

    def forget(self, user_id: int | None = None) -> None:
        """What concerns `user_id` (everything when None)."""
        with self.lock:
            if user_id is None:
                self.entries.clear()
            else:
                for key in [k for k, v in self.entries.items() if v[1] == user_id]:
                    del self.entries[key]

    def heard(self, message: dict[str, Any]) -> None:
        """An announcement from any process (or the listener saying it may have missed some)."""
        user_id = message.get("user_id")
        self.forget(None if message.get("missed") or user_id is None else int(user_id))


def remembered() -> Remembered:
    """The current app's memory; the first call starts hearing the announcements."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
    memory = app.extensions.get("switchboard_auth_cache")
    if memory is None:
        with _lock:
            memory = app.extensions.get("switchboard_auth_cache")
            if memory is None:
                memory = Remembered(float(app.config["SWITCHBOARD_AUTH_CACHE_SECONDS"]))
                if memory.seconds > 0:
                    from app.live.hub import hub

                    # without Redis now, what is remembered is bounded by the seconds alone
                    # until the listener hears the channel (it keeps trying)
                    if not hub().on(channel(), memory.heard):
                        log.warning("credential changes are not heard yet (Redis)")
                app.extensions["switchboard_auth_cache"] = memory
    return memory


_lock = threading.Lock()


def channel() -> str:
    """Where changes to what a user's credentials may do are announced."""
    return f"{pubsub.namespace()}:auth-changed"


def changed(user_id: int) -> None:
    """Something that decides what `user_id`'s credentials may do changed (in the current
    transaction): this process forgets it now, every process once it commits."""
    remembered().forget(user_id)
    where = channel()

    def announce() -> None:
        # should Redis be away, the seconds bound what other processes serve
        pubsub.publish(where, {"user_id": user_id})
        remembered().forget(user_id)  # a read between the forget and the commit

    after_commit(announce)
