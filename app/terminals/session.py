"""One person's socket attached to a run's terminal.

The serving thread sends `hello`, the scrollback and then the output as it comes (a
`TerminalFollower` of the run, which ends when the run does: `exit`, close 1000). A second
thread reads what the person sends: keystrokes and resizes go to the run's inbox (`relay`),
from a controller only. Notices (who holds the keyboard, a new size) are written by the hub's
thread as they are heard. Access is checked again whenever a change to the user's is announced
(`live.access`), as streams do; the socket closes (1008) when it is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Callable
from typing import Any

from flask import Flask
from simple_websocket import ConnectionClosed

from app.database import db
from app.errors import DomainError
from app.live import access
from app.live.hub import Overflow, Subscription, hub
from app.live.sse import Event, watches
from app.runs.stream import TerminalFollower
from app.terminals import relay, service, sizes
from app.terminals.service import Holder

log = logging.getLogger(__name__)

#: what a socket gets of the output before it was attached (a full-screen program redraws)
SCROLLBACK = 64 * 1024
CLOSE_NORMAL, CLOSE_POLICY = 1000, 1008


class Session:
    def __init__(
        self,
        ws: Any,
        app: Flask,
        run_id: int,
        mode: str,
        holder: Holder,
        start: int,
        check: Callable[[str], None],
    ) -> None:
        """`holder`: this socket (holding the keyboard when `mode` is control); `start`: the
        log offset its scrollback begins at; `check(mode)` raises when access is gone."""
        self.ws, self.app = ws, app
        self.run_id, self.mode, self.holder = run_id, mode, holder
        self.start = start
        self.lock = threading.Lock()
        self.said_hello = False
        self.done = threading.Event()
        self.watch = access.Watch(holder.user_id, lambda: check(self.mode))
        self.notices: Subscription | None = None

    @staticmethod
    def new_holder(user_id: int, username: str) -> Holder:
        return Holder(uuid.uuid4().hex, user_id, username)

    # -- writing ---------------------------------------------------------------------------------

    def send(self, frame: bytes | dict[str, Any]) -> None:
        data = frame if isinstance(frame, bytes) else json.dumps(frame, separators=(",", ":"))
        with self.lock:
            self.ws.send(data)

    def close(self, code: int, reason: str) -> None:
        self.done.set()
        with self.lock, contextlib.suppress(Exception):
            if self.ws.connected:
                self.ws.close(code, reason[:120])

    # -- serving ---------------------------------------------------------------------------------

    def serve(self) -> None:
        reader = threading.Thread(target=self._read, name="terminal-input", daemon=True)
        watches().add(self.watch)
        try:
            self.notices = hub().subscribe(
                [relay.notice_channel(self.run_id)], forward=(self._heard, self._cut)
            )
            controller = service.controller(self.run_id)
            cols, rows = relay.size(self.run_id, sizes.DEFAULT)
            db.session.remove()
            self.send(
                {
                    "type": "hello",
                    "run_id": self.run_id,
                    "mode": self.mode,
                    "cols": cols,
                    "rows": rows,
                    "controller": controller.public() if controller else None,
                }
            )
            self.said_hello = True
            reader.start()
            self._follow()
        except (ConnectionClosed, Overflow):
            pass
        except Exception:
            log.exception("run %s: a terminal socket failed", self.run_id)
        finally:
            self.done.set()
            watches().remove(self.watch)
            if self.notices is not None:
                self.notices.close()
            if self.mode == "control":
                with contextlib.suppress(Exception):
                    service.release(self.run_id, self.holder)
            db.session.remove()
            self.close(CLOSE_NORMAL, "bye")

    def _follow(self) -> None:
        follower = iter(TerminalFollower(self.run_id, f"{self.start}-0"))
        try:
            while not self.done.is_set():
                access.stepping(self.watch)
                try:
                    item = next(follower, None)
                    ended = self._access_ended()
                finally:
                    access.stepping(None)
                if ended is not None:
                    with contextlib.suppress(ConnectionClosed):
                        self.send({"type": "closed", "reason": "access_ended", "detail": ended})
                    self.close(CLOSE_POLICY, "access ended")
                    return
                if isinstance(item, bytes):
                    if item:
                        self.send(item)
                elif isinstance(item, Event):
                    if self._event(item):
                        return
                elif item is None:
                    self._idle()
        finally:
            with contextlib.suppress(Exception):
                follower.close()  # type: ignore[attr-defined]

    def _event(self, event: Event) -> bool:
        """A replayed event; True when the run has ended (the socket is closed then)."""
        if event.event == "log" and event.data["text"]:
            self.send(event.data["text"].encode())
        elif event.event == "done":
            self.send({"type": "exit", **event.data})
            self.close(CLOSE_NORMAL, "the run ended")
            return True
        return False

    def _idle(self) -> None:
        """A quiet ping interval: the keyboard's claim is renewed (or found taken)."""
        if self.mode == "control" and not service.keep_control(self.run_id, self.holder):
            self._demote(None)

    def _access_ended(self) -> str | None:
        if not self.watch.take_due():
            return None
        try:
            self.watch.check()
        except DomainError as exc:
            return exc.detail
        finally:
            db.session.remove()
        return None

    # -- notices (in the hub's thread) -----------------------------------------------------------

    def _heard(self, notice: dict[str, Any]) -> None:
        if not self.said_hello or self.done.is_set():
            return
        kind = notice.get("type")
        with contextlib.suppress(ConnectionClosed):
            if kind == "control":
                controller = notice.get("controller")
                taken = notice.get("action") != "release"  # only the controller hands back
                if (
                    taken
                    and self.mode == "control"
                    and (controller or {}).get("conn") != self.holder.conn
                ):
                    self._demote(notice.get("by"))
                    return
                public = {k: v for k, v in (controller or {}).items() if k != "conn"}
                self.send(
                    {
                        "type": "control",
                        "action": notice.get("action"),
                        "controller": public or None,
                        "mode": self.mode,
                    }
                )
            elif kind == "resize":
                self.send({"type": "resize", "cols": notice["cols"], "rows": notice["rows"]})

    def _demote(self, by: str | None) -> None:
        """Someone took the keyboard: this socket watches from now on."""
        self.mode = "view"
        with contextlib.suppress(ConnectionClosed):
            self.send(
                {
                    "type": "control",
                    "action": "takeover",
                    "controller": {"username": by} if by else None,
                    "mode": "view",
                    "detail": f"{by or 'someone'} took over the keyboard; you are watching",
                }
            )

    def _cut(self) -> None:
        """Redis went away, or the process is stopping: the client attaches again."""
        self.close(1012, "server restarting")

    # -- what the person sends (its own thread) --------------------------------------------------

    def _read(self) -> None:
        with self.app.app_context():
            try:
                while not self.done.is_set():
                    data = self.ws.receive(timeout=1)
                    if data is None:
                        continue
                    self._take(data)
                    db.session.remove()
            except ConnectionClosed:
                pass
            except Exception:
                log.exception("run %s: reading a terminal socket failed", self.run_id)
            finally:
                self.done.set()
                db.session.remove()

    def _take(self, data: bytes | str) -> None:
        if isinstance(data, bytes):
            if self.mode != "control":
                self._error("viewers cannot type: attach with mode control to take the keyboard")
            elif not relay.put(self.run_id, relay.KEYS, data):
                self._error("the agent is not reading its input; nothing was typed")
            return
        try:
            frame = json.loads(data)
        except ValueError:
            frame = None
        if not isinstance(frame, dict):
            self._error("text frames are JSON objects: resize or release")
            return
        kind = frame.get("type")
        if kind == "resize":
            size = sizes.valid(frame.get("cols"), frame.get("rows"))
            if self.mode != "control":
                self._error("viewers cannot resize the terminal")
            elif size is None:
                self._error("resize needs cols (2-1000) and rows (2-500), integers")
            elif not service.resize(self.run_id, self.holder, *size):
                self._error("the agent is not reading its input; the terminal keeps its size")
        elif kind == "release":
            if self.mode == "control":
                self.mode = "view"
                service.release(self.run_id, self.holder)
        else:
            self._error(f"unknown frame type {kind!r}: resize or release")

    def _error(self, detail: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.send({"type": "error", "detail": detail})
