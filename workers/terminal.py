"""A pool run's terminal: what people type and resize (popped from the run's inbox by
`app.terminals.inbox.Inbox`), applied to the agent's pseudo-terminal in the order they did it;
notes for the run's events handed to the driver (`notes`), the run's only writer of events."""

from __future__ import annotations

import queue
from typing import Any

from app.terminals import relay, sizes
from workers.process import AgentProcess


class Terminal:
    """Applies inbox items to a running agent's terminal (an `inbox.Target`)."""

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
