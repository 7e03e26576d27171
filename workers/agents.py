"""Finding an agent's binary and its version on this host (the registry of agents is
`app.agents.registry`, their output's meaning `app.agents.parsers`). No Flask here: the machine
client uses this module too."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from app.agents.registry import Agent


class AgentNotInstalled(RuntimeError):
    pass


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
