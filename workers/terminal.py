"""The executor's side of a terminal run: what people type and resize, applied to the agent's
pseudo-terminal in the order they did it.

`Inbox` pops the run's Redis inbox (`app.terminals.relay`) in a thread of its own, so a
keystroke reaches the agent within a round trip whatever the run's driver is doing; notes for
the run's events are handed to the driver (`notes`), the run's only writer of events. No Flask
here: names are resolved by the caller, and the machine client applies the same frames (`apply`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import redis

from app.terminals import relay, sizes
from workers.process import AgentProcess

log = logging.getLogger(__name__)

#: how long a pop waits before the thread looks whether it should stop
POP_WAIT_S = 1


@dataclass(frozen=True)
class Names:
    inbox: str
    notice: str
    size: str

    @classmethod
    def of(cls, run_id: int) -> Names:
        """In an app context: the run's terminal names."""
        return cls(relay.inbox_key(run_id), relay.notice_channel(run_id), relay.size_key(run_id))


class Terminal:
    """Applies inbox items to a running agent's terminal; says what changed through `publish`
    (a resize, for every attached socket) and `note` (for the run's events)."""

    def __init__(self, proc: AgentProcess, size: tuple[int, int]) -> None:
        self.proc = proc
        self.size = size
        #: (kind, data) for the run's events, taken by the driver
        self.notes: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()

    def apply(self, kind: bytes, payload: Any) -> dict[str, Any] | None:
        """One inbox item; the notice to tell attached sockets, if any."""
        if kind == relay.KEYS:
            self.proc.type_in(payload)
        elif kind == relay.RESIZE:
            size = sizes.valid(payload.get("cols"), payload.get("rows"))
            if size is not None and self.proc.resize(*size):
                self.size = size
                self.notes.put(
                    ("terminal_resize", {"cols": size[0], "rows": size[1], "by": payload.get("by")})
                )
                return {"type": "resize", "cols": size[0], "rows": size[1]}
        elif kind == relay.NOTE:
            self.notes.put((str(payload.get("type")), dict(payload.get("data") or {})))
        return None


class Inbox:
    """A pool run's terminal inbox, read by a thread of its own until `close`."""

    def __init__(self, url: str, names: Names, terminal: Terminal) -> None:
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
