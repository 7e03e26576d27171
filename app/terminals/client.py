"""`switchboard attach`: this terminal attached to a run's, over the server's WebSocket.

The local terminal goes to raw mode (every key is sent as typed, Ctrl-C included) and comes back
as it was on the way out, whatever ends the session; its size is sent on attach and on every
SIGWINCH; Ctrl-] detaches (as telnet and `docker attach` do) and leaves the run running. No Flask
here: it talks to any server with a personal access token.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
import urllib.error
import urllib.request
from typing import Any, BinaryIO

from simple_websocket import Client, ConnectionClosed
from simple_websocket import ConnectionError as Refused

DETACH = b"\x1d"  # Ctrl-]
HANDSHAKE_REFUSED = {
    401: "the terminal token was refused",
    403: "you may not attach to this run so",
    404: "no such run",
    409: "someone else holds the keyboard (--takeover takes it over)",
}


class AttachError(RuntimeError):
    pass


def _token(server: str, credential: str, run_id: int, mode: str) -> str:
    request = urllib.request.Request(
        f"{server}/api/v1/runs/{run_id}/terminal-token",
        data=json.dumps({"mode": mode}).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return str(json.loads(resp.read())["token"])
    except urllib.error.HTTPError as exc:
        problem = json.loads(exc.read() or b"{}")
        raise AttachError(f"{exc.code}: {problem.get('detail') or exc.reason}") from None
    except OSError as exc:
        raise AttachError(f"cannot reach {server}: {exc}") from None


def connect(server: str, credential: str, run_id: int, control: bool, takeover: bool) -> Any:
    token = _token(server, credential, run_id, "control" if control else "view")
    scheme, rest = server.split("://", 1)
    url = f"{'wss' if scheme == 'https' else 'ws'}://{rest}/api/v1/runs/{run_id}/terminal"
    url += f"?token={token}" + ("&takeover=1" if takeover else "")
    try:
        return Client.connect(url)
    except Refused as exc:  # the handshake was answered with an error status
        code = exc.status_code
        reason = HANDSHAKE_REFUSED.get(code or 0, "the server refused the socket")
        raise AttachError(f"{code or '?'}: {reason}") from None
    except OSError as exc:
        raise AttachError(f"cannot reach {server}: {exc}") from None


class Attachment:
    """One attached session between a local terminal (`stdin_fd`, `out`) and a socket."""

    def __init__(self, ws: Any, stdin_fd: int, out: BinaryIO, control: bool) -> None:
        self.ws, self.stdin_fd, self.out = ws, stdin_fd, out
        self.control = control
        self.ended = threading.Event()
        self.outcome = "detached"
        self.exit_code = 0
        self.wake_r, self.wake_w = os.pipe()

    def say(self, text: str) -> None:
        """A line of ours between the run's output (raw mode: CR LF)."""
        self.out.write(f"\r\n[switchboard] {text}\r\n".encode())
        self.out.flush()

    def send_size(self) -> None:
        if not self.control:
            return
        try:  # the terminal's own size (COLUMNS and LINES may say otherwise)
            size = os.get_terminal_size(self.stdin_fd)
        except OSError:
            size = shutil.get_terminal_size()
        with contextlib.suppress(ConnectionClosed):
            self.ws.send(json.dumps({"type": "resize", "cols": size.columns, "rows": size.lines}))

    def _receive(self) -> None:
        try:
            while not self.ended.is_set():
                data = self.ws.receive(timeout=1)
                if data is None:
                    if not self.ws.connected:
                        break
                    continue
                if isinstance(data, bytes):
                    self.out.write(data)
                    self.out.flush()
                else:
                    self._frame(json.loads(data))
        except ConnectionClosed:
            pass
        finally:
            if not self.ended.is_set() and self.outcome == "detached":
                self.outcome = "closed by the server"
            self.ended.set()
            os.write(self.wake_w, b"x")

    def _frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "hello":
            holder = (frame.get("controller") or {}).get("username")
            self.say(
                f"attached to run {frame.get('run_id')} ({frame.get('mode')}"
                + (f"; {holder} has the keyboard" if holder and frame.get("mode") == "view" else "")
                + "); Ctrl-] detaches"
            )
            self.send_size()
        elif kind == "control":
            if frame.get("mode") == "view" and self.control:
                self.control = False
                self.say(str(frame.get("detail") or "you are watching now"))
        elif kind == "exit":
            self.outcome = f"the run ended: {frame.get('status')} (exit {frame.get('exit_code')})"
            self.exit_code = 0 if frame.get("status") == "succeeded" else 1
            self.ended.set()
        elif kind in ("error", "closed"):
            self.say(str(frame.get("detail") or kind))

    def run(self) -> int:
        """Until detached or the run ends; the exit status for the command."""
        receiver = threading.Thread(target=self._receive, name="attach-receive", daemon=True)
        receiver.start()
        try:
            while not self.ended.is_set():
                ready, _, _ = select.select([self.stdin_fd, self.wake_r], [], [])
                if self.stdin_fd not in ready:
                    continue
                data = os.read(self.stdin_fd, 4096)
                if not data:
                    break
                keys, detach, _ = data.partition(DETACH)
                if keys and self.control:
                    self.ws.send(keys)
                if detach:
                    break
        except ConnectionClosed:
            pass
        finally:
            self.ended.set()
            with contextlib.suppress(Exception):
                self.ws.close()
            self.say(self.outcome)
        return self.exit_code


def attach(server: str, credential: str, run_id: int, control: bool, takeover: bool) -> int:
    """The command's body: raw mode for as long as it is attached."""
    ws = connect(server.rstrip("/"), credential, run_id, control, takeover)
    fd = sys.stdin.fileno()
    session = Attachment(ws, fd, sys.stdout.buffer, control)
    saved = termios.tcgetattr(fd) if os.isatty(fd) else None
    previous = signal.signal(signal.SIGWINCH, lambda *_: session.send_size())
    try:
        if saved is not None:
            tty.setraw(fd)
        return session.run()
    finally:
        if saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        signal.signal(signal.SIGWINCH, previous)
