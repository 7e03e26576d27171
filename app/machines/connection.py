"""One machine's control channel: a WebSocket held by one web thread.

The first frame authenticates (`auth`); the server answers `welcome` with what it stored of the
runs the machine says it holds, so the machine resends the rest. Then each frame the machine
sends is checked (`protocol`) and handled (`reports`) in its own app context and database
session, and answered. What the server has to say to the machine (`assign`, `stop`, `drain`, a
takeover by a newer connection of the same machine) is published on the machine's Redis channel
by whichever process decides it, and written to the socket by this process's hub thread: the
deciding process is rarely the one holding the socket.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from typing import Any

from flask import Flask
from simple_websocket import ConnectionClosed

from app.database import db
from app.errors import DomainError
from app.live import pubsub
from app.live.hub import Subscription, hub, stopping
from app.machines import heartbeats, models, protocol, reports, scheduling, service
from app.machines.models import Machine
from app.machines.terminals import Relays

log = logging.getLogger(__name__)

#: the first frame must come this soon
AUTH_TIMEOUT_S = 10.0


class Connection:
    def __init__(self, ws: Any, app: Flask) -> None:
        self.ws, self.app = ws, app
        self.id = uuid.uuid4().hex
        self.lock = threading.Lock()
        self.machine_id: int | None = None
        self.holder: reports.Holder | None = None
        #: the free slots its last heartbeat said (more now: what waits may be assigned)
        self.free_slots: int | None = None
        self.subscription: Subscription | None = None
        #: the inboxes of its runs in a terminal, forwarded as `pty_*` frames
        self.terminals = Relays(self._send_quietly)

    # -- writing -------------------------------------------------------------------------------

    def send(self, frame: dict[str, Any]) -> None:
        with self.lock:
            self.ws.send(protocol.dump(frame))

    def _send_quietly(self, frame: dict[str, Any]) -> None:
        """From an inbox's thread: a frame for a run, unless the socket is gone."""
        with contextlib.suppress(ConnectionClosed):
            self.send(frame)

    def close(self, code: int, reason: str) -> None:
        """End the connection (from any thread); the serving thread wakes and returns."""
        with self.lock, contextlib.suppress(Exception):
            if self.ws.connected:
                self.ws.close(code, reason[:120])
        self.ws.event.set()

    def error(self, detail: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            self.send({"type": "error", "detail": detail[:500]})

    # -- what other processes say to the machine -----------------------------------------------

    def _deliver(self, message: dict[str, Any]) -> None:
        """In the hub's thread: a frame to send, or the end of this connection."""
        if "sealed_env" in message:  # an assignment: its environment opened here
            with self.app.app_context():
                frame = scheduling.open_assignment(message)
            with contextlib.suppress(ConnectionClosed):
                self.send(frame)
        elif "frame" in message:
            with contextlib.suppress(ConnectionClosed):
                self.send(dict(message["frame"]))
        elif message.get("takeover") not in (None, self.id):
            self.error("another connection of this machine took over")
            self.close(protocol.CLOSE_REPLACED, "replaced")
        elif "close" in message:
            with contextlib.suppress(ConnectionClosed):
                self.send({"type": "disconnect", "reason": message["close"]})
            self.close(protocol.CLOSE_POLICY, str(message["close"]))

    def _cut(self) -> None:
        """Redis went away or the process is stopping: the machine reconnects (elsewhere) and
        resends; nothing is lost."""
        self.close(protocol.CLOSE_RESTART, "server restarting")

    # -- serving ---------------------------------------------------------------------------------

    def serve(self) -> None:
        try:
            if not self._authenticate():
                return
            self._loop()
        except ConnectionClosed:
            pass
        finally:
            self.terminals.close()
            if self.subscription is not None:
                with self.app.app_context():
                    self.subscription.close()
            if self.machine_id is not None:
                with self.app.app_context():
                    try:
                        service.disconnected(self.machine_id, self.id)
                    except Exception:  # the database away: its heartbeats stop all the same
                        log.warning(
                            "machine %s: could not record its disconnection", self.machine_id
                        )
                    finally:
                        db.session.remove()

    def _authenticate(self) -> bool:
        raw = self.ws.receive(timeout=AUTH_TIMEOUT_S)
        if raw is None:
            self.close(protocol.CLOSE_POLICY, "no auth frame")
            return False
        try:
            frame = protocol.parse(raw)
            if frame["type"] != "auth":
                raise protocol.FrameError("the first frame is `auth`")
        except protocol.FrameError as exc:
            self.error(str(exc))
            self.close(protocol.CLOSE_POLICY, "malformed frame")
            return False
        with self.app.app_context():
            try:
                machine = service.authenticate(frame["machine_id"], frame["credential"])
            except DomainError as exc:
                db.session.remove()
                self.error(exc.detail)
                self.close(protocol.CLOSE_POLICY, "unauthorized")
                return False
            try:
                self.machine_id = machine.id
                self.holder = reports.Holder.of(machine)
                service.connected(machine, self.id, frame.get("client_version"))
                welcome = {
                    "type": "welcome",
                    "machine_id": machine.id,
                    "name": machine.name,
                    "heartbeat_s": models.HEARTBEAT_S,
                    "lease_s": self.app.config["SWITCHBOARD_LEASE_SECONDS"],
                    "draining": machine.draining,
                    "runs": reports.resume(machine, [r["run_id"] for r in frame["resume"]]),
                }
                db.session.commit()
                for resumed in frame["resume"]:
                    if resumed["tty"]:
                        self.terminals.watch(resumed["run_id"])
                # told of whatever is decided for this machine from now on; a connection of
                # it elsewhere (an older one, half-open) is told to go
                self.subscription = hub().subscribe(
                    [pubsub.machine_channel(machine.id)], forward=(self._deliver, self._cut)
                )
                pubsub.to_machine(machine.id, {"takeover": self.id})
            finally:
                db.session.remove()
        self.send(welcome)
        if stopping():
            self._cut()
            return True
        with self.app.app_context():
            try:
                machine = db.session.get(Machine, self.machine_id)
                if machine is not None:
                    scheduling.reoffer(machine)  # offers it may have missed while away
                scheduling.offer()  # what waits for it
            finally:
                db.session.remove()
        return True

    def _loop(self) -> None:
        silence = models.HEARTBEAT_S * models.ONLINE_INTERVALS
        while True:
            raw = self.ws.receive(timeout=silence)
            if raw is None:
                if self.ws.connected:  # silent past three heartbeats: it is gone, or stuck
                    self.close(protocol.CLOSE_POLICY, "no heartbeat")
                return
            try:
                frame = protocol.parse(raw)
                if frame["type"] == "auth":
                    raise protocol.FrameError("already authenticated")
            except protocol.FrameError as exc:
                self.error(str(exc))
                self.close(protocol.CLOSE_POLICY, "malformed frame")
                return
            if frame["type"] == "heartbeat":
                self._heartbeat(frame)
                continue
            for answer in self._handle(frame):
                self.send(answer)
            self._follow_terminal(frame)

    def _follow_terminal(self, frame: dict[str, Any]) -> None:
        """A run's agent started in a terminal: people's keys go to it; its end: no more."""
        if frame["type"] == "started" and frame["tty"]:
            with self.app.app_context():
                self.terminals.watch(frame["run_id"])
        elif frame["type"] == "finished":
            self.terminals.forget(frame["run_id"])

    def _heartbeat(self, frame: dict[str, Any]) -> None:
        """Written with the other heartbeats this process receives (`heartbeats`); answered
        from there."""
        assert self.holder is not None
        free = frame.get("free_slots") or 0
        freed = bool(free) and (self.free_slots is None or free > self.free_slots)
        self.free_slots = free
        figures = {k: v for k, v in frame.items() if k not in ("type", "agents") and v is not None}
        heartbeats.collector(self.app).add(
            heartbeats.Beat(
                self.holder.machine_id,
                self.holder.executor,
                figures,
                frame.get("agents"),
                freed,
                answer=self._answer_beat,
            )
        )

    def _answer_beat(self, frames: list[dict[str, Any]] | None) -> None:
        if frames is None:
            self.close(protocol.CLOSE_POLICY, "decommissioned")
            return
        with contextlib.suppress(ConnectionClosed):
            for frame in frames:
                self.send(frame)

    def _handle(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        assert self.holder is not None
        with self.app.app_context():
            try:
                return reports.HANDLERS[frame["type"]](self.holder, frame)
            except protocol.FrameError as exc:  # about a run not its own: refused, kept open
                db.session.rollback()
                return [{"type": "error", "detail": str(exc)[:500], "frame": frame["type"]}]
            except DomainError as exc:
                db.session.rollback()
                return [{"type": "error", "detail": exc.detail[:500], "frame": frame["type"]}]
            except Exception:
                # the database away, a bug: the machine reconnects and resends what is not
                # acknowledged, so closing loses nothing
                log.exception("machine %s: a %s frame failed", self.machine_id, frame["type"])
                self.close(1011, "internal error")
                return []
            finally:
                db.session.remove()
