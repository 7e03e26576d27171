"""The agents Switchboard knows: the built-in CLIs and those declared in `SWITCHBOARD_AGENTS`.

An agent is a command template (prompt on stdin where the CLI allows it) and the parser of its
output. The API checks agent names against this registry and the workers build commands from it,
so it lives where both import it; no Flask here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.agents.parsers import PARSERS, Parsed, parse_text

#: what a project's agents are told of Switchboard unless the project says otherwise
#: (`Project.agent_instructions`; empty: nothing). Claude Code gets it as an addition to its
#: system prompt (`--append-system-prompt`); other agents have no such option.
DEFAULT_INSTRUCTIONS = (
    "You run under Switchboard. When you need a decision or information from a person, ask "
    "with the Bash tool and wait for the answer: "
    '`switchboard ask "<question>"` (prints yes or no), '
    '`switchboard ask "<question>" --choice <a> --choice <b>` (prints the choice), or '
    '`switchboard ask "<question>" --text` (prints what they wrote). Exit status 2 means '
    "nobody answered in time, 3 that the question was cancelled: then do not go on with "
    "what you asked about. Ask rather than guess on anything destructive or ambiguous."
)


@dataclass(frozen=True)
class Agent:
    name: str
    #: argv; "{prompt}", "{workdir}" and config keys ("{model}") are substituted
    command: tuple[str, ...]
    #: the prompt goes to stdin (else it must appear in the command)
    prompt_on_stdin: bool = True
    version_command: tuple[str, ...] | None = None
    parser: str = "text"
    #: runs in a pseudo-terminal unless its task says otherwise (an interactive CLI)
    tty: bool = False

    def in_terminal(self, asked: bool | None) -> bool:
        """Whether a task's run of this agent gets a pseudo-terminal: the task's `tty` when it
        says, else the agent's own default. The one rule the executors and the API share."""
        return self.tty if asked is None else bool(asked)

    def argv(
        self, prompt: str, workdir: str, config: dict[str, Any], instructions: str = ""
    ) -> list[str]:
        """The command for a run; `instructions`: what the project tells its agents (Claude
        Code: appended to its system prompt)."""
        values = {**{k: str(v) for k, v in config.items()}, "prompt": prompt, "workdir": workdir}
        argv: list[str] = []
        for part in self.command:
            try:
                argv.append(part.format(**values))
            except KeyError:
                continue  # an optional "{model}" with no model configured: drop the argument
        if self.name in ("claude", "claude-interactive"):
            argv += _claude_options(config)
            if instructions:
                argv += ["--append-system-prompt", instructions]
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
    # in a terminal by default: people attach to watch or steer them (docs/usage.md, Terminals)
    "claude-interactive": Agent(
        "claude-interactive",
        ("claude", "{prompt}"),
        prompt_on_stdin=False,
        version_command=("claude", "--version"),
        tty=True,
    ),
    "bash": Agent("bash", ("bash", "-i"), version_command=("bash", "--version"), tty=True),
}


def custom_agents(spec: str | dict[str, Any] | None) -> dict[str, Agent]:
    """Agents from configuration: {"name": {"command": [...], "stdin": bool,
    "version": [...], "parser": "claude|codex|text", "tty": bool}}."""
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
            tty=bool(conf.get("tty", False)),
        )
    return agents


def registry(custom: str | dict[str, Any] | None = None) -> dict[str, Agent]:
    return {**BUILTIN, **custom_agents(custom)}


def known_agents() -> dict[str, Agent]:
    """The agents of the current app's configuration."""
    from flask import current_app

    return registry(current_app.config.get("SWITCHBOARD_AGENTS"))
