"""A run's terminal inbox, read in order by a thread of its own (see `relay`).

The executor holding the terminal reads it: a pool worker for its own runs (the target is the
agent's PTY, `workers.terminal.Terminal`), or the web process holding a machine's control
channel for that machine's runs (the target sends `pty_*` frames, `app.machines.terminals`).
A thread of its own, so a keystroke reaches the agent within a round trip whatever the rest of
the executor is doing. No Flask here: names are resolved by the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from app.terminals import relay

log = logging.getLogger(__name__)

#: how long a pop waits before the thread looks whether it should stop
POP_WAIT_S = 1


class Target(Protocol):
    size: tuple[int, int]

    def apply(self, kind: bytes, payload: Any) -> dict[str, Any] | None:
        """One inbox item; the notice to tell attached sockets (a new size), if any."""


@dataclass(frozen=True)
class Names:
    inbox: str
    notice: str
    size: str

    @classmethod
    def of(cls, run_id: int) -> Names:
        """In an app context: the run's terminal names."""
        return cls(relay.inbox_key(run_id), relay.notice_channel(run_id), relay.size_key(run_id))


class Inbox:
    """A run's terminal inbox, read by a thread of its own until `close`."""

    def __init__(self, url: str, names: Names, terminal: Target) -> None:
        self.names, self.terminal = names, terminal
        # its own connection: a blocking pop holds it
        self.client = redis.Redis.from_url(url, socket_timeout=POP_WAIT_S + 5)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="terminal-inbox", daemon=True)

    def start(self) -> None:
        self._say_size()
        self.thread.start()

    def close(self) -> None:
        """Stop reading; the thread ends after its current wait (it writes nothing after)."""
        self.stopped.set()
        with contextlib.suppress(redis.RedisError):
            self.client.delete(self.names.size)

    def _say_size(self) -> None:
        cols, rows = self.terminal.size
        with contextlib.suppress(redis.RedisError):
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.names.size, mapping={"cols": cols, "rows": rows})
            pipe.expire(self.names.size, relay.INBOX_TTL_S * 6)
            pipe.execute()

    def _run(self) -> None:
        try:
            while not self.stopped.is_set():
                try:
                    popped = self.client.blpop([self.names.inbox], timeout=POP_WAIT_S)
                except redis.RedisError as exc:  # Redis away: keystrokes wait there
                    log.warning("terminal inbox: %s", exc)
                    self.stopped.wait(0.5)
                    continue
                if popped is None or self.stopped.is_set():
                    continue
                try:
                    kind, payload = relay.decode(popped[1])
                    notice = self.terminal.apply(kind, payload)
                except (ValueError, AttributeError, TypeError):
                    continue  # not ours to read: dropped
                if notice is not None:
                    self._say_size()
                    with contextlib.suppress(redis.RedisError):
                        self.client.publish(self.names.notice, json.dumps(notice))
        finally:
            with contextlib.suppress(Exception):
                self.client.close()
