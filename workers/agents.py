"""Agent adapters: how to invoke each agent CLI and what its output means.

An adapter builds the command (prompt on stdin where the CLI allows it) and turns each line the
agent prints into typed run events and run facts (session id, model, cost, tokens). Custom agents
are declared in configuration as command templates. No Flask here: the machine client uses this
module too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

Event = tuple[str, dict[str, Any]]

#: events keep at most this much of a text field (the full text is in the log)
TEXT_LIMIT = 4000


class AgentNotInstalled(RuntimeError):
    pass


@dataclass
class Parsed:
    events: list[Event] = field(default_factory=list)
    #: run columns to update (session_id, model, cost_usd, input_tokens, output_tokens)
    facts: dict[str, Any] = field(default_factory=dict)


def _clip(text: Any) -> Any:
    if isinstance(text, str) and len(text) > TEXT_LIMIT:
        return text[:TEXT_LIMIT] + f"… [{len(text) - TEXT_LIMIT} more characters]"
    return text


def _json_line(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def parse_claude(line: str) -> Parsed:
    """Claude Code's `--output-format stream-json --verbose` lines."""
    out = Parsed()
    msg = _json_line(line)
    if msg is None:
        return out
    kind = msg.get("type")
    if kind == "system" and msg.get("subtype") == "init":
        out.facts.update(session_id=msg.get("session_id"), model=msg.get("model"))
        out.events.append(
            (
                "init",
                {
                    "session_id": msg.get("session_id"),
                    "model": msg.get("model"),
                    "cwd": msg.get("cwd"),
                    "tools": msg.get("tools", [])[:100],
                },
            )
        )
    elif kind == "assistant":
        for block in (msg.get("message") or {}).get("content") or []:
            if block.get("type") == "text":
                out.events.append(("assistant_text", {"text": _clip(block.get("text", ""))}))
            elif block.get("type") == "tool_use":
                data = {
                    "id": block.get("id"),
                    "name": block.get("name"),
                    "input": block.get("input"),
                }
                out.events.append(("tool_use", data))
                out.events.extend(_tool_facts(block.get("name"), block.get("input") or {}))
            elif block.get("type") == "thinking":
                out.events.append(("thinking", {"text": _clip(block.get("thinking", ""))}))
    elif kind == "user":
        for block in (msg.get("message") or {}).get("content") or []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                content = block.get("content")
                if isinstance(content, list):
                    content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
                out.events.append(
                    (
                        "tool_result",
                        {
                            "tool_use_id": block.get("tool_use_id"),
                            "is_error": bool(block.get("is_error")),
                            "content": _clip(content),
                        },
                    )
                )
    elif kind == "result":
        usage = msg.get("usage") or {}
        cost = msg.get("total_cost_usd", msg.get("cost_usd"))
        out.facts.update(
            cost_usd=cost,
            input_tokens=usage.get("input_tokens"),
            output_tokens=usage.get("output_tokens"),
        )
        if msg.get("session_id"):
            out.facts["session_id"] = msg["session_id"]
        out.events.append(
            (
                "result",
                {
                    "subtype": msg.get("subtype"),
                    "is_error": bool(msg.get("is_error")),
                    "cost_usd": cost,
                    "usage": usage,
                    "num_turns": msg.get("num_turns"),
                    "duration_ms": msg.get("duration_ms"),
                    "result": _clip(msg.get("result")),
                },
            )
        )
    out.facts = {k: v for k, v in out.facts.items() if v is not None}
    return out


def _tool_facts(name: str | None, tool_input: dict[str, Any]) -> list[Event]:
    """Tool calls that change files or run commands become their own events."""
    if name in ("Edit", "Write", "MultiEdit", "NotebookEdit") and tool_input.get("file_path"):
        return [("file_changed", {"path": tool_input["file_path"], "tool": name})]
    if name == "Bash" and tool_input.get("command"):
        return [("command", {"command": _clip(tool_input["command"])})]
    return []


def parse_codex(line: str) -> Parsed:
    """`codex exec --json` JSONL events."""
    out = Parsed()
    msg = _json_line(line)
    if msg is None:
        return out
    kind = msg.get("type", "")
    if kind == "thread.started":
        out.facts["session_id"] = msg.get("thread_id")
        out.events.append(("init", {"session_id": msg.get("thread_id")}))
    elif kind == "item.completed":
        item = msg.get("item") or {}
        itype = item.get("type") or item.get("item_type")
        if itype in ("agent_message", "assistant_message"):
            out.events.append(("assistant_text", {"text": _clip(item.get("text", ""))}))
        elif itype == "command_execution":
            out.events.append(
                (
                    "command",
                    {"command": _clip(item.get("command")), "exit_code": item.get("exit_code")},
                )
            )
        elif itype == "file_change":
            for change in item.get("changes") or []:
                out.events.append(
                    ("file_changed", {"path": change.get("path"), "kind": change.get("kind")})
                )
        else:
            out.events.append(("item", {"type": itype}))
    elif kind == "turn.completed":
        usage = msg.get("usage") or {}
        out.facts.update(
            input_tokens=usage.get("input_tokens"), output_tokens=usage.get("output_tokens")
        )
        out.events.append(("result", {"usage": usage}))
    elif kind in ("turn.failed", "error"):
        out.events.append(("error", {"message": _clip(str(msg.get("error") or msg))}))
    out.facts = {k: v for k, v in out.facts.items() if v is not None}
    return out


def parse_text(_line: str) -> Parsed:
    return Parsed()


PARSERS = {"claude": parse_claude, "codex": parse_codex, "text": parse_text}


@dataclass(frozen=True)
class Agent:
    name: str
    #: argv; "{prompt}", "{workdir}" and config keys ("{model}") are substituted
    command: tuple[str, ...]
    #: the prompt goes to stdin (else it must appear in the command)
    prompt_on_stdin: bool = True
    version_command: tuple[str, ...] | None = None
    parser: str = "text"

    def argv(self, prompt: str, workdir: str, config: dict[str, Any]) -> list[str]:
        values = {**{k: str(v) for k, v in config.items()}, "prompt": prompt, "workdir": workdir}
        argv: list[str] = []
        for part in self.command:
            try:
                argv.append(part.format(**values))
            except KeyError:
                continue  # an optional "{model}" with no model configured: drop the argument
        if self.name == "claude":
            argv += _claude_options(config)
        elif self.name == "codex":
            argv[2:2] = ["--sandbox", str(config.get("sandbox", "workspace-write"))]
        return argv

    def parse(self, line: str) -> Parsed:
        return PARSERS.get(self.parser, parse_text)(line)


def _claude_options(config: dict[str, Any]) -> list[str]:
    opts: list[str] = []
    if config.get("model"):
        opts += ["--model", str(config["model"])]
    if config.get("permission_mode"):
        opts += ["--permission-mode", str(config["permission_mode"])]
    if config.get("max_turns"):
        opts += ["--max-turns", str(config["max_turns"])]
    return opts


BUILTIN: dict[str, Agent] = {
    "claude": Agent(
        "claude",
        ("claude", "-p", "--output-format", "stream-json", "--verbose"),
        version_command=("claude", "--version"),
        parser="claude",
    ),
    "codex": Agent(
        "codex",
        ("codex", "exec", "--json", "-"),
        version_command=("codex", "--version"),
        parser="codex",
    ),
    "gemini": Agent("gemini", ("gemini", "--yolo"), version_command=("gemini", "--version")),
    "aider": Agent(
        "aider",
        ("aider", "--yes-always", "--no-pretty", "--no-stream", "--message", "{prompt}"),
        prompt_on_stdin=False,
        version_command=("aider", "--version"),
    ),
    "shell": Agent(
        "shell",
        ("bash", "-c", "{prompt}"),
        prompt_on_stdin=False,
        version_command=("bash", "--version"),
    ),
}


def custom_agents(spec: str | dict[str, Any] | None) -> dict[str, Agent]:
    """Agents from configuration: {"name": {"command": [...], "stdin": bool,
    "version": [...], "parser": "claude|codex|text"}}."""
    if not spec:
        return {}
    data = json.loads(spec) if isinstance(spec, str) else spec
    agents = {}
    for name, conf in data.items():
        command = conf["command"]
        if isinstance(command, str):
            command = command.split()
        agents[name] = Agent(
            name=name,
            command=tuple(command),
            prompt_on_stdin=bool(conf.get("stdin", "{prompt}" not in " ".join(command))),
            version_command=tuple(conf["version"]) if conf.get("version") else None,
            parser=conf.get("parser", "text"),
        )
    return agents


def registry(custom: str | dict[str, Any] | None = None) -> dict[str, Agent]:
    return {**BUILTIN, **custom_agents(custom)}


_versions: dict[tuple[str, float], str | None] = {}


#: (command, PATH) → (binary, when found): searching PATH stats every directory on it, for
#: every run; a binary found is trusted for a while if it is still there and executable
_binaries: dict[tuple[str, str | None], tuple[str, float]] = {}
BINARY_TRUSTED_S = 10.0


def resolve_binary(agent: Agent, path: str | None = None) -> str:
    key = (agent.command[0], path)
    found = _binaries.get(key)
    now = time.monotonic()
    if found is not None and now - found[1] < BINARY_TRUSTED_S and os.access(found[0], os.X_OK):
        return found[0]
    binary = shutil.which(agent.command[0], path=path)
    if binary is None:
        _binaries.pop(key, None)
        raise AgentNotInstalled(
            f"agent '{agent.name}' is not installed on this worker "
            f"({agent.command[0]!r} not found on PATH)"
        )
    _binaries[key] = (binary, now)
    return binary


def version(agent: Agent, binary: str, env: dict[str, str] | None = None) -> str | None:
    """The agent's version (first line of `--version`), cached per binary and mtime."""
    if not agent.version_command:
        return None
    try:
        key = (binary, os.stat(binary).st_mtime)
    except OSError:
        return None
    if key not in _versions:
        try:
            cmd = [binary, *agent.version_command[1:]]
            out = subprocess.run(
                cmd, capture_output=True, text=True, timeout=10, env=env, stdin=subprocess.DEVNULL
            )
            text = (out.stdout or out.stderr).strip().splitlines()
            _versions[key] = text[0][:200] if text else None
        except (OSError, subprocess.TimeoutExpired):
            _versions[key] = None
    return _versions[key]
