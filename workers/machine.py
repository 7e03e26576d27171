"""`switchboard machine`: a host of your own that runs agents for Switchboard.

It registers once with an enrollment token (its credential is kept in a state directory, mode
0600), then connects out over the control channel (docs/machines.md) and works: it takes the runs
the server assigns, runs each agent as the worker pool does (the same workspace, environment,
sandbox, process and parser code: there is one way to run an agent), and reports their output by
offset and their events by sequence. Output is written to disk first and sent from there, so an
agent goes on through any disconnect: after reconnecting (backoff with jitter, forever) the
machine resends everything the server did not acknowledge, and nothing is lost or stored twice.
SIGTERM drains (the runs finish, no new one is taken); a second SIGTERM stops them.

No Flask app and no database here: only the frames (`app.machines.protocol`), the agents'
registry and parsers, and `workers`' process code.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import platform
import random
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simple_websocket import Client, ConnectionClosed

from app import __version__
from app.agents.lines import Lines
from app.agents.registry import Agent, registry
from app.auth.tokens import run_token_secret
from app.machines import protocol
from app.runs.outcomes import normalise_exit_code
from app.runs.redaction import ECHO_RELEASE_S, Redactor
from app.terminals import sizes
from workers import agent_env, agents, sandbox, workspace
from workers.process import AgentProcess

log = logging.getLogger("switchboard.machine")

STATE_FILE = "machine.json"
#: output not yet acknowledged that a run may hold on disk; past it its agent is stopped
MAX_UNACKED_BYTES = 512 * 1024 * 1024
BACKOFF_MAX_S = 30.0
TICK = 0.02


class MachineError(RuntimeError):
    """Said in one line by the command."""


# -- registration ----------------------------------------------------------------------------------


def installed_agents(custom: str | None = None) -> dict[str, str | None]:
    """The agents whose command is on this host's PATH, with their versions."""
    found: dict[str, str | None] = {}
    for name, agent in registry(custom).items():
        try:
            binary = agents.resolve_binary(agent, os.environ.get("PATH"))
        except agents.AgentNotInstalled:
            continue
        found[name] = agents.version(agent, binary)
    return found


def hardware() -> dict[str, Any]:
    memory_mb = 0
    with contextlib.suppress(OSError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory_mb = pages // (1024 * 1024)
    return {
        "os": platform.system().lower(),
        "arch": platform.machine(),
        "cpus": os.cpu_count() or 0,
        "memory_mb": memory_mb,
    }


def register(
    server: str,
    token: str,
    state_dir: Path,
    *,
    name: str | None = None,
    labels: list[str] | None = None,
    slots: int = 1,
    custom_agents: str | None = None,
) -> dict[str, Any]:
    """Trade an enrollment token for this machine's credential, kept in `state_dir`."""
    body = {
        "enrollment_token": token,
        "name": name or platform.node().split(".")[0],
        "labels": labels or [],
        "slots": slots,
        "agents": installed_agents(custom_agents),
        "hardware": hardware(),
        "client_version": __version__,
    }
    request = urllib.request.Request(
        server.rstrip("/") + "/api/v1/machines/register",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            registered = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = json.loads(exc.read() or b"{}").get("detail") or exc.reason
        raise MachineError(f"registration refused ({exc.code}): {detail}") from None
    except OSError as exc:
        raise MachineError(f"cannot reach {server}: {exc}") from None
    state = {"server": server.rstrip("/"), "slots": slots, **registered}
    save_state(state_dir, state)
    return state


def save_state(state_dir: Path, state: dict[str, Any]) -> None:
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, path)


def load_state(state_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        raise MachineError(
            f"not registered: no {state_dir / STATE_FILE} (run `switchboard machine register`)"
        ) from None


# -- one run ---------------------------------------------------------------------------------------


@dataclass
class Held:
    """A run this machine holds: its output on disk until the server has it."""

    run_id: int
    log_path: Path
    size: int = 0
    #: what the server said it stored, and what was sent on this connection
    acked: int = 0
    sent: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    acked_seq: int = 0
    sent_seq: int = 0
    facts: dict[str, Any] = field(default_factory=dict)
    #: the end, once the agent is done (sent when everything before it is)
    finished: dict[str, Any] | None = None
    finished_sent: bool = False
    stop_grace: float | None = None
    abandon: bool = False
    thread: threading.Thread | None = None
    #: its agent, once started (in a terminal when `tty`: people's keys reach it)
    proc: AgentProcess | None = None
    tty: bool = False


class Machine:
    def __init__(
        self,
        state_dir: Path,
        *,
        sandbox_setting: str = "auto",
        passthrough: list[str] | None = None,
        allow_local_repos: bool = False,
        custom_agents: str | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.state = load_state(state_dir)
        self.slots = int(self.state.get("slots") or 1)
        self.agents: dict[str, Agent] = registry(custom_agents)
        self.custom_agents = custom_agents
        self.root = state_dir / "workspaces"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (state_dir / "runs").mkdir(mode=0o700, exist_ok=True)
        self.policy = workspace.Policy(
            workdir_roots=[], protected=[str(state_dir)], allow_local_repos=allow_local_repos
        )
        self.mode = sandbox.choose(sandbox_setting)
        self.passthrough = passthrough or []
        self.lock = threading.RLock()  # guards `runs`, the socket and the flags
        self.wake = threading.Condition(self.lock)
        self.runs: dict[int, Held] = {}
        self.ws: Any = None
        self.heartbeat_s = 5.0
        self.draining = False  # the server's say (an admin)
        self.leaving = False  # ours (SIGTERM): finish, then exit
        self.stopping = False  # a second SIGTERM: stop the agents
        self.ended = threading.Event()

    # -- the connection --------------------------------------------------------------------------

    def run_forever(self) -> None:
        """Connect, work, and reconnect (capped exponential backoff with jitter) until it has
        left (SIGTERM, then every run reported)."""
        threading.Thread(target=self._sender, name="machine-sender", daemon=True).start()
        delay = 0.5
        while not self._done():
            try:
                self._session()
                delay = 0.5
            except MachineError:
                raise
            except (OSError, ConnectionClosed, ConnectionError) as exc:
                log.warning("connection lost (%s); reconnecting in %.1f s", exc, delay)
            if self._done():
                break
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, BACKOFF_MAX_S)
        self.ended.set()

    def _done(self) -> bool:
        with self.lock:
            return self.leaving and not self.runs

    def _session(self) -> None:
        ws = Client.connect(self.state["ws_url"], max_message_size=protocol.MAX_FRAME_BYTES * 8)
        with self.lock:
            held = sorted(self.runs)
            resume = [{"run_id": r, "tty": self.runs[r].tty} for r in held]
        ws.send(
            protocol.dump(
                {
                    "type": "auth",
                    "machine_id": self.state["machine_id"],
                    "credential": self.state["credential"],
                    "client_version": __version__,
                    "resume": resume,
                }
            )
        )
        first = ws.receive(timeout=15)
        if first is None:
            ws.close()
            raise ConnectionError("no welcome")
        frame = json.loads(first)
        if frame.get("type") == "error":
            with contextlib.suppress(ConnectionClosed):
                ws.close()
            raise MachineError(f"the server refused this machine: {frame.get('detail')}")
        self._welcome(frame)
        with self.lock:
            self.ws = ws
            self.wake.notify_all()
        log.info("connected to %s as %s", self.state["server"], frame.get("name"))
        try:
            while True:
                raw = ws.receive(timeout=1.0)
                if raw is None:
                    if not ws.connected:
                        raise ConnectionClosed(ws.close_reason, ws.close_message)
                    if self._done():
                        return
                    continue
                self._on_frame(json.loads(raw))
        finally:
            with self.lock:
                self.ws = None
            if ws.close_reason == protocol.CLOSE_REPLACED:
                raise MachineError("another connection of this machine took over")

    def _welcome(self, frame: dict[str, Any]) -> None:
        self.heartbeat_s = float(frame.get("heartbeat_s") or 5)
        with self.lock:
            self.draining = bool(frame.get("draining"))
            for answer in frame.get("runs", []):
                held = self.runs.get(answer["run_id"])
                if held is None:
                    continue
                if answer.get("abandon") or answer.get("finished"):
                    # ended there (or given to another executor): nothing more to send
                    held.abandon = True
                    if held.finished is None:
                        held.stop_grace = 0.0  # its agent is still at work: stop it
                    else:
                        self._forget(held)
                    continue
                # resend what the server does not have
                held.acked = held.sent = min(int(answer.get("offset", 0)), held.size)
                held.acked_seq = held.sent_seq = int(answer.get("seq", 0))
                held.finished_sent = False
            for held in self.runs.values():  # what was sent on the last connection is resent
                held.sent = max(held.sent, held.acked)

    def _send(self, frame: dict[str, Any]) -> bool:
        with self.lock:
            ws = self.ws
            if ws is None:
                return False
            try:
                ws.send(protocol.dump(frame))
                return True
            except (ConnectionClosed, OSError):
                return False

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "assign":
            self._assigned(frame["run"])
        elif kind == "ack":
            self._acked(frame)
        elif kind == "stop":
            with self.lock:
                held = self.runs.get(frame["run_id"])
                if held is not None and held.stop_grace is None:
                    held.stop_grace = float(frame.get("grace_s") or 10)
        elif kind in ("pty_input", "pty_resize", "pty_note"):
            self._at_terminal(frame)
        elif kind == "drain":
            with self.lock:
                self.draining = True
        elif kind == "undrain":
            with self.lock:
                self.draining = False
        elif kind == "disconnect":
            raise MachineError(f"disconnected by the server: {frame.get('reason')}")
        elif kind == "error":
            log.warning("the server refused a frame: %s", frame.get("detail"))

    def _at_terminal(self, frame: dict[str, Any]) -> None:
        """What people did at a run's terminal (relayed by the server): applied as the pool
        applies it, and kept in the run's events."""
        with self.lock:
            held = self.runs.get(frame.get("run_id"))  # type: ignore[arg-type]
        proc = held.proc if held is not None else None
        if held is None or proc is None or not held.tty:
            return
        kind = frame["type"]
        event: dict[str, Any] | None = None
        if kind == "pty_input":
            with contextlib.suppress(ValueError, TypeError):
                proc.type_in(base64.b64decode(frame.get("data") or "", validate=True))
        elif kind == "pty_resize":
            size = sizes.valid(frame.get("cols"), frame.get("rows"))
            if size is not None and proc.resize(*size):
                data = {"cols": size[0], "rows": size[1], "by": frame.get("by")}
                event = {"type": "terminal_resize", "data": data}
        elif isinstance(frame.get("event"), dict):
            event = {
                "type": str(frame["event"].get("type"))[:64],
                "data": dict(frame["event"].get("data") or {}),
            }
        if event is not None:
            with self.lock:
                held.events.append(event)
                self.wake.notify_all()

    def _acked(self, frame: dict[str, Any]) -> None:
        with self.lock:
            held = self.runs.get(frame.get("run_id"))
            if held is None:
                return
            if "offset" in frame:
                held.acked = max(held.acked, int(frame["offset"]))
                held.sent = max(held.sent, held.acked)
            if "seq" in frame:
                held.acked_seq = max(held.acked_seq, int(frame["seq"]))
                held.sent_seq = max(held.sent_seq, held.acked_seq)
            if frame.get("finished") and held.finished is not None:
                self._forget(held)
            elif held.finished_sent and not frame.get("finished"):
                held.finished_sent = False  # the end waits for what it refers to: again later
            self.wake.notify_all()

    def _forget(self, held: Held) -> None:
        self.runs.pop(held.run_id, None)
        if held.finished is not None:  # its agent is done writing
            held.log_path.unlink(missing_ok=True)
        self.wake.notify_all()

    # -- sending -------------------------------------------------------------------------------

    def _sender(self) -> None:
        """Sends output, events and ends as they come, and heartbeats."""
        next_beat = 0.0
        while True:
            with self.lock:
                self.wake.wait(timeout=0.05)
                runs = list(self.runs.values())
                connected = self.ws is not None
            if not connected:
                continue
            now = time.monotonic()
            if now >= next_beat:
                self._heartbeat()
                next_beat = now + self.heartbeat_s
            for held in runs:
                self._flush(held)

    def _heartbeat(self) -> None:
        with self.lock:
            busy = len(self.runs)
            free = 0 if (self.draining or self.leaving) else max(0, self.slots - busy)
        beat: dict[str, Any] = {"type": "heartbeat", "free_slots": free}
        with contextlib.suppress(OSError):
            beat["load"] = os.getloadavg()[0]
        with contextlib.suppress(OSError):
            beat["disk_free_mb"] = shutil.disk_usage(self.root).free // (1024 * 1024)
        self._send(beat)

    def _flush(self, held: Held) -> None:
        with self.lock:
            self._flush_locked(held)

    def _flush_locked(self, held: Held) -> None:
        while held.sent < held.size:
            with open(held.log_path, "rb") as fh:
                fh.seek(held.sent)
                data = fh.read(min(protocol.LOG_CHUNK, held.size - held.sent))
            if not data:
                break
            frame: dict[str, Any] = {"type": "log", "run_id": held.run_id, "offset": held.sent}
            try:
                frame["text"] = data.decode("utf-8")
            except UnicodeDecodeError:
                frame["data"] = base64.b64encode(data).decode()
            if not self._send(frame):
                return
            held.sent += len(data)
        while held.sent_seq < len(held.events):
            event = held.events[held.sent_seq]
            frame = {"type": "event", "run_id": held.run_id, "seq": held.sent_seq + 1}
            if not self._send({**frame, "event": event}):
                return
            held.sent_seq += 1
        everything_stored = held.acked >= held.size and held.acked_seq >= len(held.events)
        if held.finished is not None and not held.finished_sent and everything_stored:
            held.finished_sent = self._send(held.finished)

    # -- running an agent -------------------------------------------------------------------------

    def _assigned(self, spec: dict[str, Any]) -> None:
        run_id = spec["run_id"]
        with self.lock:
            if run_id in self.runs:
                self._send({"type": "accept", "run_id": run_id})  # offered again: still ours
                return
            refusal = None
            if self.draining or self.leaving:
                refusal = "draining"
            elif len(self.runs) >= self.slots:
                refusal = "no free slot"
            elif spec["agent"] not in self.agents:
                refusal = f"agent {spec['agent']} is not known here"
            if refusal is not None:
                self._send({"type": "reject", "run_id": run_id, "reason": refusal})
                return
            held = Held(run_id, self.state_dir / "runs" / f"{run_id}.log")
            held.log_path.write_bytes(b"")
            self.runs[run_id] = held
            held.thread = threading.Thread(
                target=self._execute, args=(held, spec), name=f"run-{run_id}", daemon=True
            )
        self._send({"type": "accept", "run_id": run_id})
        held.thread.start()

    def _execute(self, held: Held, spec: dict[str, Any]) -> None:
        try:
            held.finished = self._run_agent(held, spec)
        except Exception as exc:  # our bug, or the host: the run fails saying so
            log.exception("run %s failed on this machine", held.run_id)
            held.finished = {"status": "failed", "exit_code": None, "summary": str(exc)[:900]}
        with self.lock:
            held.finished.update(
                type="finished",
                run_id=held.run_id,
                log_size=held.size,
                event_count=len(held.events),
                facts=held.facts,
            )
            if held.abandon:
                self._forget(held)
            self.wake.notify_all()

    def _run_agent(self, held: Held, spec: dict[str, Any]) -> dict[str, Any]:
        agent = self.agents[spec["agent"]]
        try:
            binary = agents.resolve_binary(agent, os.environ.get("PATH"))
            ws = workspace.prepare(
                str(self.root),
                spec["project"],
                spec.get("repo_url"),
                spec.get("base_branch") or "main",
                None,
                spec["task_id"],
                spec["attempt"],
                policy=self.policy,
                git_token=spec["env"].get("GIT_TOKEN"),
            )
        except (agents.AgentNotInstalled, workspace.WorkspaceError) as exc:
            return {"status": "failed", "exit_code": None, "summary": str(exc)[:900]}
        given = spec["env"]
        secrets = {k: v for k, v in given.items() if not k.startswith("SWITCHBOARD_")}
        env = agent_env.build(
            os.environ,
            home=ws.home,
            tmp=ws.tmp,
            run_vars={
                **{k: v for k, v in given.items() if k.startswith("SWITCHBOARD_")},
                "SWITCHBOARD_EXECUTOR": f"machine:{self.state.get('name')}",
            },
            secrets=secrets,
            passthrough=self.passthrough,
        )
        wrap = self._wrapper(ws)
        version = agents.version(agent, binary, env)
        argv = agent.argv(
            spec["prompt"], str(ws.path), spec.get("config") or {}, spec.get("instructions") or ""
        )
        argv[0] = binary
        stdin = spec["prompt"].encode() if agent.prompt_on_stdin else None
        # the project's secrets and the run's token never leave the machine in its output
        token = given.get("SWITCHBOARD_RUN_TOKEN", "")
        redactor = Redactor.of([*secrets.values(), run_token_secret(token) if token else ""])
        output = _Output(self, held, agent, redactor)
        terminal = sizes.DEFAULT if spec.get("tty") else None
        proc = AgentProcess(
            wrap(argv), cwd=str(ws.path), env=env, stdin_data=stdin, terminal=terminal
        )
        held.proc, held.tty = proc, terminal is not None
        self._send(
            {
                "type": "started",
                "run_id": held.run_id,
                "pid": proc.pid,
                "agent_version": version,
                "tty": held.tty,
            }
        )
        held.facts.setdefault("agent_version", version)
        deadline = proc.started + spec["timeout_s"] if spec.get("timeout_s") else None
        outcome = None
        while proc.poll() is None:
            proc.pump(output.take, TICK)
            if held.tty:
                output.release_echo()
            if held.stop_grace is not None:
                proc.stop(held.stop_grace, output.take)
                outcome = "cancelled"
                break
            if self.stopping:
                proc.stop(3.0, output.take)
                outcome = "cancelled"
                break
            if deadline is not None and time.monotonic() >= deadline:
                proc.stop(10.0, output.take)
                outcome = "timed_out"
                break
            if held.size - held.acked > MAX_UNACKED_BYTES:
                proc.stop(3.0, output.take)
                outcome = "buffer_full"
                break
        code = normalise_exit_code(proc.finish(output.take))
        output.settle()
        extra = {k: v for k, v in workspace.results(ws, wrap).items() if v}
        if outcome == "cancelled":
            return {"status": "cancelled", "exit_code": code, "summary": "stopped", **extra}
        if outcome == "timed_out":
            summary = f"timed out after {spec['timeout_s']}s"
            return {"status": "timed_out", "exit_code": code, "summary": summary, **extra}
        if outcome == "buffer_full":
            summary = "stopped: its output could not reach the server (buffer full)"
            return {"status": "failed", "exit_code": code, "summary": summary, **extra}
        status = "succeeded" if code == 0 else "failed"
        return {"status": status, "exit_code": code, "summary": None, **extra}

    def _wrapper(self, ws: workspace.Workspace) -> workspace.Wrapper:
        if self.mode != "bwrap":
            return list
        mounts = sandbox.Mounts(
            workdir=ws.path,
            writable=ws.writable,
            # the machine's credential and other runs' output: never the agent's to read
            hidden=[self.state_dir, *sandbox.server_home_credentials(os.environ.get("HOME"))],
            read_only=ws.read_only,
            empty=sandbox.empty_file(self.root),
        )
        path_dirs = os.environ.get("PATH", "").split(os.pathsep)
        return lambda argv: sandbox.wrap(argv, mounts, path_dirs)

    # -- leaving ---------------------------------------------------------------------------------

    def on_sigterm(self, _signum: int, _frame: Any) -> None:
        with self.lock:
            if self.leaving:
                self.stopping = True  # the second: stop the agents
            self.leaving = True
            self.wake.notify_all()


class _Output:
    """An agent's output as the machine keeps it: masked, appended to the run's file, parsed
    into events and facts by the agent's parser."""

    def __init__(self, machine: Machine, held: Held, agent: Agent, redactor: Redactor | None):
        self.machine, self.held, self.agent, self.redactor = machine, held, agent, redactor
        self.lines = Lines()
        self.last = 0.0
        self.file = open(held.log_path, "ab")  # noqa: SIM115 - closed in settle()

    def take(self, chunk: bytes) -> None:
        self.last = time.monotonic()
        if self.redactor is not None:
            chunk = self.redactor.feed(chunk)
        self._keep(chunk)

    def release_echo(self) -> None:
        """A terminal gone quiet shows a byte held back for masking (`Redactor.release`)."""
        if self.redactor is not None and time.monotonic() - self.last >= ECHO_RELEASE_S:
            self._keep(self.redactor.release())

    def _keep(self, chunk: bytes) -> None:
        if not chunk:
            return
        self.file.write(chunk)
        self.file.flush()
        lines = self.lines.feed(chunk)
        with self.machine.lock:
            self.held.size += len(chunk)
            for line in lines:
                self._parse(line)
            self.machine.wake.notify_all()

    def _parse(self, line: bytes) -> None:
        parsed = self.agent.parse(line.decode("utf-8", "replace"))
        self.held.events += [{"type": kind, "data": data} for kind, data in parsed.events]
        self.held.facts.update(parsed.facts)

    def settle(self) -> None:
        if self.redactor is not None:
            self._keep(self.redactor.flush())
        with self.machine.lock:
            rest = self.lines.rest()
            if rest:
                self._parse(rest)
        self.file.close()


def run(state_dir: Path, **options: Any) -> None:
    """`switchboard machine run`."""
    machine = Machine(state_dir, **options)
    signal.signal(signal.SIGTERM, machine.on_sigterm)
    signal.signal(signal.SIGINT, machine.on_sigterm)
    log.info(
        "machine %s: %d slots, sandbox %s, agents %s",
        machine.state.get("name"),
        machine.slots,
        machine.mode,
        ", ".join(sorted(installed_agents(machine.custom_agents))) or "none",
    )
    machine.run_forever()
