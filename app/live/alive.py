"""This process's heartbeat in Redis.

What a process holds in counts shared with other processes (a user's open stream slots) is
marked with its identity, and counts only while its heartbeat lives: a web process killed with
-9 gives back its slots within `TTL_S` seconds, instead of when each slot's own expiry (a
multiple of the ping interval) runs out.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis

#: how often the heartbeat is written, and how long one lasts
BEAT_S = 1.0
TTL_S = 3


def _key(ident: str) -> str:
    return f"sb:alive:{ident}"


class Heartbeat:
    """One per process and Redis: started by the first thing that needs it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid: int | None = None
        self.ident = ""
        self.beating: set[int] = set()

    def me(self, client: redis.Redis) -> str:
        """This process's identity (new after a fork), its heartbeat beating on `client`."""
        with self.lock:
            if self.pid != os.getpid():  # a forked child is not its parent
                self.pid = os.getpid()
                self.ident = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
                self.beating = set()
            if id(client) not in self.beating:
                self.beating.add(id(client))
                client.set(_key(self.ident), "1", ex=TTL_S)
                threading.Thread(
                    target=self._beat, args=(client, self.ident), name="sb-heartbeat", daemon=True
                ).start()
            return self.ident

    def _beat(self, client: redis.Redis, ident: str) -> None:
        while self.ident == ident:
            with contextlib.suppress(redis.RedisError):
                client.set(_key(ident), "1", ex=TTL_S)
            time.sleep(BEAT_S)


heartbeat = Heartbeat()


def living(client: redis.Redis, idents: Iterable[str]) -> set[str]:
    """Those of `idents` whose process is alive."""
    idents = list(idents)
    if not idents:
        return set()
    pipe: Any = client.pipeline(transaction=False)
    for ident in idents:
        pipe.exists(_key(ident))
    return {ident for ident, found in zip(idents, pipe.execute(), strict=True) if found}
