"""Where a run works: its own git worktree of a cached clone, or the project's directory.

Each repo-backed run gets branch `switchboard/<task>-<attempt>` in its own worktree, so two runs of
one project never touch each other's files. The cached clone is shared and guarded by a file
lock. No Flask here: the machine client prepares workspaces the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class WorkspaceError(RuntimeError):
    pass


@dataclass
class Workspace:
    path: Path
    branch: str | None = None
    base_commit: str | None = None
    repo: Path | None = None


def _git(*args: str, cwd: Path | None = None, timeout: float = 300) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise WorkspaceError(f"git {args[0]} failed: {exc}") from exc
    if out.returncode != 0:
        raise WorkspaceError(f"git {args[0]} failed: {out.stderr.strip()[:500]}")
    return out.stdout.strip()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]


def prepare(
    root: str,
    project_key: str,
    repo_url: str | None,
    default_branch: str,
    workdir: str | None,
    task_id: int,
    attempt: int,
) -> Workspace:
    base = Path(root)
    if not repo_url:
        if workdir:
            path = Path(workdir).expanduser()
            if not path.is_dir():
                raise WorkspaceError(f"the project's workdir {str(path)!r} does not exist")
            return Workspace(path)
        path = base / "scratch" / _safe(project_key) / f"task-{task_id}"
        path.mkdir(parents=True, exist_ok=True)
        return Workspace(path)
    key = hashlib.sha256(repo_url.encode()).hexdigest()[:12]
    cache = base / "repos" / f"{_safe(project_key)}-{key}.git"
    branch = f"switchboard/{task_id}-{attempt}"
    tree = base / "worktrees" / _safe(project_key) / f"{task_id}-{attempt}"
    with _locked(cache.with_suffix(".lock")):
        if not cache.exists():
            _git("clone", "--bare", "--quiet", repo_url, str(cache))
            _git("config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*", cwd=cache)
        _git("fetch", "--quiet", "--prune", "origin", cwd=cache)
        start = f"origin/{default_branch}"
        base_commit = _git("rev-parse", start, cwd=cache)
        if tree.exists():
            _git("worktree", "remove", "--force", str(tree), cwd=cache)
        _git("worktree", "prune", cwd=cache)
        _git("worktree", "add", "--quiet", "-B", branch, str(tree), start, cwd=cache)
    return Workspace(tree, branch=branch, base_commit=base_commit, repo=cache)


def results(ws: Workspace) -> dict[str, str | None]:
    """Branch, final commit and a diff stat against the starting point (uncommitted work
    included)."""
    if ws.branch is None:
        return {}
    try:
        head = _git("rev-parse", "HEAD", cwd=ws.path)
        _git("add", "--intent-to-add", "--all", cwd=ws.path)
        stat = _git("diff", "--stat", ws.base_commit or "HEAD", cwd=ws.path)
    except WorkspaceError as exc:
        return {"branch": ws.branch, "diff_stat": f"(unavailable: {exc})"}
    return {"branch": ws.branch, "commit_sha": head, "diff_stat": stat or None}
