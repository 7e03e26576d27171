"""What each agent's output means: lines of Claude Code's and Codex's JSON streams turned into
typed run events and run facts (session id, model, cost, tokens). Pure functions, no Flask: the
worker pool and the machine client parse the same way."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Event = tuple[str, dict[str, Any]]

#: events keep at most this much of a text field (the full text is in the log)
TEXT_LIMIT = 4000


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
