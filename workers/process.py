"""Run one agent process: its own process group, prompt on stdin, output as it comes, and a stop
that always ends it (TERM to the group, a grace period, then KILL).

`AgentProcess.pump()` is a small event loop the caller drives: it hands each chunk of output to a
callback as soon as it is read and returns every `tick` seconds so the caller can flush batches,
renew its lease and check for stop requests. No Flask here: the machine client uses it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import signal
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Iterator


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Call in a child (preexec_fn): on Linux the kernel sends `sig` when the parent dies, so a
    killed worker or supervisor leaves no process behind. A no-op elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


def find_tagged(*markers: str) -> list[int]:
    """Processes whose environment holds all `markers` ("NAME=value"). Linux only (/proc);
    elsewhere nothing is found."""
    wanted = [b"\0" + m.encode() + b"\0" for m in markers]
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                env = b"\0" + fh.read()
        except OSError:
            continue
        if all(m in env for m in wanted):
            found.append(int(name))
    return found


def kill_tagged(*markers: str) -> list[int]:
    """SIGKILL every process tagged with all `markers`: the agents of a worker that died
    without stopping them."""
    killed = []
    for pid in find_tagged(*markers):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _processes() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, command name, the fields of /proc/<pid>/stat after the name) of every process
    (Linux /proc; elsewhere none)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1 : stat.rfind(")")]
        yield int(name), comm, stat.rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    return [p for p, _comm, fields in _processes() if int(fields[1]) == pid]


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command name) of every process in process group `pgid`."""
    return [(p, comm) for p, comm, fields in _processes() if int(fields[2]) == pgid]


#: the sandbox's own processes: they pass no TERM on, so they are spared it (the agent gets
#: it, and its grace); they end with the agent, or with the KILL after the grace
SANDBOX_COMMANDS = frozenset({"bwrap"})


#: how much of a terminal's output is handed on at once at most (see `AgentProcess._more`)
TERMINAL_BATCH = 64 * 1024
#: what a terminal run's programs are told they talk to
TERM = "xterm-256color"


def set_terminal_size(fd: int, cols: int, rows: int) -> None:
    """The size of the terminal on `fd`; the kernel tells its foreground programs (SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _claim_terminal() -> None:  # pragma: no cover - runs in the child, between fork and exec
    """The child's new session takes its stdin, the terminal, as its controlling terminal: job
    control, Ctrl-C and SIGWINCH reach the agent's foreground programs."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class AgentProcess:
    def __init__(
        self,
        argv: list[str],
        *,
        cwd: str,
        env: dict[str, str],
        stdin_data: bytes | None,
        terminal: tuple[int, int] | None = None,
    ) -> None:
        """`terminal`: (columns, rows) to run the agent in a pseudo-terminal of that size
        (its input, output and errors; a prompt given is typed into it, then Enter), else pipes."""
        #: the pseudo-terminal's master side (None: pipes); written by `type_in`
        self.terminal_fd: int | None = None
        self._typing = threading.Lock()
        if terminal is None:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # its own process group: TERM/KILL reach every child. No preexec_fn: it would
                # make every spawn a full fork (~10 ms for a worker's size instead of ~0.2 ms);
                # agents orphaned by a killed worker are found by their environment
                # (kill_tagged) instead.
                start_new_session=True,
            )
            assert self.proc.stdout is not None
            self._out = self.proc.stdout.fileno()
        else:
            master, slave = os.openpty()
            try:
                set_terminal_size(slave, *terminal)
                self.proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env={**env, "TERM": TERM},  # this terminal's kind, not the server's
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    # a session of its own, whose controlling terminal is this one: the full
                    # fork preexec_fn costs is paid by terminal runs only
                    start_new_session=True,
                    preexec_fn=_claim_terminal,
                )
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
            self.terminal_fd = self._out = master
        self.pid = self.proc.pid
        self.started = time.monotonic()
        self._eof = False
        self._selector = selectors.DefaultSelector()
        os.set_blocking(self._out, False)
        self._selector.register(self._out, selectors.EVENT_READ)
        if stdin_data is not None:
            feed = self._type_prompt if terminal is not None else self._feed
            threading.Thread(target=feed, args=(stdin_data,), daemon=True).start()

    def type_in(self, data: bytes) -> bool:
        """Keystrokes to the terminal (from any thread); False when there is none any more."""
        with self._typing:
            fd = self.terminal_fd
            if fd is None:
                return False
            view = memoryview(data)
            deadline = time.monotonic() + 5
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:  # the agent reads slower than people type: wait
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.005)
                except OSError:
                    return False
            return True

    def resize(self, cols: int, rows: int) -> bool:
        with self._typing:
            if self.terminal_fd is None:
                return False
            with contextlib.suppress(OSError):
                set_terminal_size(self.terminal_fd, cols, rows)
                return True
            return False

    def _type_prompt(self, data: bytes) -> None:
        self.type_in(data.rstrip(b"\r\n") + b"\r")

    def _feed(self, data: bytes) -> None:
        """Write the prompt and close stdin, in a thread: a prompt larger than the pipe buffer
        must not block reading the agent's output."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(data)
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.close()

    @property
    def output_closed(self) -> bool:
        return self._eof

    def pump(self, on_output: Callable[[bytes], None], tick: float) -> None:
        """Read what is available for up to `tick` seconds, handing each chunk to `on_output`."""
        if self._eof:  # output closed: the exit follows at once, so wait for it, not a tick
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=tick)
            return
        deadline = time.monotonic() + tick
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if not self._selector.select(remaining):
                return
            try:
                chunk = os.read(self._out, 65536)
            except BlockingIOError:
                continue
            except OSError:  # a terminal whose every program has closed it (EIO)
                chunk = b""
            if not chunk:
                self._eof = True
                self._selector.unregister(self._out)
                return
            if self.terminal_fd is not None:
                chunk = self._more(chunk)
            on_output(chunk)

    def _more(self, chunk: bytes) -> bytes:
        """What else a terminal has ready, with `chunk`: a terminal gives at most ~4 KiB a read
        (a pipe, 64), and an agent printing fast would be handed on (published, streamed) in
        thousands of small pieces a second. Nothing waits: only what is there now is read."""
        parts = [chunk]
        size = len(chunk)
        while size < TERMINAL_BATCH:
            try:
                more = os.read(self._out, 65536)
            except OSError:  # nothing more now (EAGAIN), or closed (EIO): the loop sees it
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return b"".join(parts)

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def terminate(self) -> None:
        """TERM to every process of the agent's group but the sandbox's own."""
        members = group_members(self.pid)
        if not any(comm in SANDBOX_COMMANDS for _pid, comm in members):
            self.signal_group(signal.SIGTERM)
            return
        for pid, comm in members:
            if comm not in SANDBOX_COMMANDS:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGTERM)

    def stop(self, grace: float, on_output: Callable[[bytes], None] | None = None) -> int:
        """TERM the group, wait up to `grace` seconds (still reading output), then KILL.
        Returns the exit status. Afterwards no process of the group is left."""
        self.terminate()
        deadline = time.monotonic() + grace
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.pump(on_output or (lambda _c: None), 0.05)
        if self.proc.poll() is None:
            self.signal_group(signal.SIGKILL)
        return self.finish(on_output)

    def finish(self, on_output: Callable[[bytes], None] | None = None) -> int:
        """Wait for the process, drain its output and kill anything it left in its group."""
        code = self.proc.wait()
        # children that outlived the agent (background jobs) still hold the group: end them
        self.signal_group(signal.SIGKILL)
        end = time.monotonic() + 2
        while not self._eof and time.monotonic() < end:
            self.pump(on_output or (lambda _c: None), 0.05)
        self.close()
        return code

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._selector.close()
        with self._typing:
            if self.terminal_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.terminal_fd)
                self.terminal_fd = None
        for stream in (self.proc.stdout, self.proc.stdin):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()
