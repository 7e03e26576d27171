"""Running an agent under bubblewrap: the system read-only, its own workspace and per-run
home/tmp read-write, the server's own files (instance directory, SQLite file, Redis socket,
the workspace area of other runs, the server user's credentials) not there at all, its own PID
namespace (it cannot see or signal the worker, nor read the worker's environment from /proc).
The network stays: agents call model APIs. No Flask: the machine client wraps its agents the
same way.

`SWITCHBOARD_SANDBOX`: `bwrap` (refuse to run agents without it), `none`, or `auto` (bwrap when
the binary works here, else none with a warning at worker start).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

#: credentials that commonly sit in the server user's home: hidden from agents
HOME_CREDENTIALS = (
    ".ssh",
    ".aws",
    ".azure",
    ".config/gcloud",
    ".config/gh",
    ".docker",
    ".kube",
    ".gnupg",
    ".netrc",
    ".git-credentials",
    ".gitconfig",
    ".pgpass",
    ".npmrc",
    ".pypirc",
    ".claude",
    ".claude.json",
    ".codex",
    ".gemini",
)


class SandboxUnavailable(RuntimeError):
    pass


@functools.cache
def bwrap_works() -> bool:
    """Whether bubblewrap can make a sandbox here (it needs user namespaces or privileges)."""
    binary = shutil.which("bwrap")
    if binary is None:
        return False
    try:
        probe = subprocess.run(
            [
                binary,
                "--ro-bind",
                "/",
                "/",
                "--dev",
                "/dev",
                "--proc",
                "/proc",
                "--unshare-pid",
                "--die-with-parent",
                "true",
            ],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


def choose(setting: str) -> str:
    """The mode a worker runs agents in: `bwrap` or `none`."""
    if setting == "none":
        return "none"
    if bwrap_works():
        return "bwrap"
    if setting == "bwrap":
        raise SandboxUnavailable(
            "SWITCHBOARD_SANDBOX=bwrap but bubblewrap does not work here (install the "
            "`bubblewrap` package, and allow unprivileged user namespaces)"
        )
    log.warning(
        "agents run without a sandbox: bubblewrap (`bwrap`) is not available. They cannot read "
        "the server's environment, but they can read its files; install bubblewrap "
        "(see docs/security.md)"
    )
    return "none"


@dataclass
class Mounts:
    """What a run's agent sees besides the read-only system."""

    workdir: Path
    writable: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)
    #: inside a writable place, but read-only (a clone's config and hooks)
    read_only: list[Path] = field(default_factory=list)
    #: an empty file of ours, mounted over hidden files (/dev/null cannot be: mounts of it are
    #: nodev, so reading it fails instead of finding nothing)
    empty: Path | None = None


def _inside(path: Path, area: Path) -> bool:
    return path == area or area in path.parents


def wrap(argv: Sequence[str], mounts: Mounts, path_dirs: Iterable[str] = ()) -> list[str]:
    """`argv` run inside a sandbox. Hidden directories become empty; hidden files, empty; then the
    writable places are mounted back (a workspace may lie inside the hidden workspace area), and
    the programs on PATH that lay in /tmp are mounted back read-only."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    args += ["--tmpfs", "/tmp", "--unshare-pid", "--unshare-ipc", "--die-with-parent"]
    if os.geteuid() == 0:
        args += ["--cap-drop", "ALL"]
    hidden = [Path("/tmp"), *mounts.hidden]
    for path in mounts.hidden:
        if any(other != path and _inside(path, other) for other in hidden):
            continue  # hidden with the directory it is in
        if path.is_dir():
            args += ["--tmpfs", str(path)]
        elif path.exists() and mounts.empty is not None:
            args += ["--ro-bind", str(mounts.empty), str(path)]
    for entry in path_dirs:
        p = Path(entry)
        under_tmp = p.is_absolute() and p.is_dir() and _inside(p, Path("/tmp"))
        if under_tmp and not any(_inside(p, h) for h in mounts.hidden):  # never the server's
            args += ["--ro-bind", str(p), str(p)]
    for path in mounts.writable:
        args += ["--bind", str(path), str(path)]
    for path in mounts.read_only:
        args += ["--ro-bind", str(path), str(path)]
    args += ["--chdir", str(mounts.workdir), "--", *argv]
    return args


def empty_file(directory: Path) -> Path:
    """An empty read-only file in `directory` (made once)."""
    path = directory / ".empty"
    if not path.exists() or path.stat().st_size:
        directory.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        path.touch(mode=0o444)
    return path


def server_home_credentials(home: str | None) -> list[Path]:
    if not home:
        return []
    return [Path(home) / name for name in HOME_CREDENTIALS]
