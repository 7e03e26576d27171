"""Terminals of runs on machines: the web process holding a machine's control channel reads
the inbox of each of its terminal runs (`app.terminals.inbox`) and sends what people type and
resize as `pty_*` frames; the machine applies them with the pool's code, and its output comes
back as the run's `log` frames, the terminal's output as for the pool."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from flask import current_app

from app.terminals import relay, sizes
from app.terminals.inbox import Inbox, Names


class MachineTarget:
    """An `inbox.Target` that forwards to the machine holding the run."""

    def __init__(self, run_id: int, send: Callable[[dict[str, Any]], None]) -> None:
        self.run_id, self.send = run_id, send
        self.size = sizes.DEFAULT

    def apply(self, kind: bytes, payload: Any) -> dict[str, Any] | None:
        if kind == relay.KEYS:
            data = base64.b64encode(payload).decode()
            self.send({"type": "pty_input", "run_id": self.run_id, "data": data})
        elif kind == relay.RESIZE:
            size = sizes.valid(payload.get("cols"), payload.get("rows"))
            if size is not None:
                self.size = size
                self.send(
                    {
                        "type": "pty_resize",
                        "run_id": self.run_id,
                        "cols": size[0],
                        "rows": size[1],
                        "by": payload.get("by"),
                    }
                )
                return {"type": "resize", "cols": size[0], "rows": size[1]}
        elif kind == relay.NOTE:
            event = {"type": str(payload.get("type")), "data": dict(payload.get("data") or {})}
            self.send({"type": "pty_note", "run_id": self.run_id, "event": event})
        return None


class Relays:
    """A connection's terminal runs, each with its inbox read (in an app context)."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self.send = send
        self.inboxes: dict[int, Inbox] = {}

    def watch(self, run_id: int) -> None:
        if run_id in self.inboxes:
            return
        url = current_app.config["SWITCHBOARD_REDIS_URL"]
        inbox = Inbox(url, Names.of(run_id), MachineTarget(run_id, self.send))
        self.inboxes[run_id] = inbox
        inbox.start()

    def forget(self, run_id: int) -> None:
        inbox = self.inboxes.pop(run_id, None)
        if inbox is not None:
            inbox.close()

    def close(self) -> None:
        for run_id in list(self.inboxes):
            self.forget(run_id)
