"""An agent's environment is built, never inherited: what it needs to run, its run's identity and
token, its project's secrets and the names an operator passes through. Nothing else of the
server's environment (SECRET_KEY, DATABASE_URL, REDIS_URL, the admin password…) reaches it.
Its PATH begins with the commands Switchboard gives agents (`install_tools`). No Flask: the
machine client builds its agents' environments the same way."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path

from app.questions import client

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def install_tools(home: Path) -> Path:
    """The commands Switchboard gives its agents (`switchboard ask`), written into the run's
    home: the agent finds them wherever it runs (in the sandbox, on a machine) without seeing
    the server's installation. Their directory, for the front of PATH."""
    bin_dir = home / ".switchboard" / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "switchboard"
    script.write_text(_tool_text())
    script.chmod(0o755)
    return bin_dir


@functools.cache
def _tool_text() -> str:
    """`switchboard ask` as a script (read once per process: a run's start is a hot path)."""
    return "#!/usr/bin/env python3\n" + Path(client.__file__).read_text()


def build(
    server_env: Mapping[str, str],
    *,
    home: Path,
    tmp: Path,
    run_vars: Mapping[str, str],
    secrets: Mapping[str, str],
    passthrough: Iterable[str] = (),
) -> dict[str, str]:
    tools = install_tools(home)
    env = {
        "PATH": f"{tools}:{server_env.get('PATH') or DEFAULT_PATH}",
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "LANG": server_env.get("LANG") or "C.UTF-8",
        "TERM": server_env.get("TERM") or "dumb",
        "GIT_TERMINAL_PROMPT": "0",
    }
    for name in passthrough:
        if name in server_env:
            env[name] = server_env[name]
    env.update(secrets)
    env.update(run_vars)  # last: a secret cannot pose as the run's identity
    return env
