"""Where a run works: its own git worktree of a cached clone, or the project's directory, and its
own home and temporary directory.

Each repo-backed run gets branch `switchboard/<task>-<attempt>` in its own worktree, so two runs of
one project never touch each other's files. The cached clone is shared and guarded by a file
lock. No Flask here: the machine client prepares workspaces the same way.

The layout under the workspace root, which the retention sweep reads back:
`repos/<project>-<hash>.git`, `worktrees/<project>/<task>-<attempt>`,
`scratch/<project>/task-<task>` and `runs/<project>/<task>-<attempt>/{home,tmp}`.

An agent may have written anything into its worktree and, through it, into the clone (it commits
there): git commands the worker runs itself never run hooks or an fsmonitor and speak only the
allowed protocols, and the clone's `config` and `hooks` are read-only inside the sandbox.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from app.netguard import Network
from app.projects.places import PlaceRefused, check_repo_url, check_workdir

#: wraps a command to run inside the run's sandbox (identity without one)
Wrapper = Callable[[list[str]], list[str]]


class WorkspaceError(RuntimeError):
    pass


@dataclass
class Policy:
    """Where agents may work and what they may clone (settings, checked again at each run)."""

    workdir_roots: Sequence[str]
    protected: Sequence[str]
    allow_local_repos: bool = False
    allowed_networks: Sequence[Network] = ()


@dataclass
class Workspace:
    path: Path
    home: Path
    tmp: Path
    branch: str | None = None
    base_commit: str | None = None
    repo: Path | None = None
    #: what the agent may write besides the system's read-only view (see workers.sandbox)
    writable: list[Path] = field(default_factory=list)
    #: inside a writable place, but read-only: the clone's config and hooks
    read_only: list[Path] = field(default_factory=list)


def _git_config(allow_local: bool) -> list[str]:
    protocols = ["https", "ssh", *(["file"] if allow_local else [])]
    return [
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "core.fsmonitor=false",
        "-c",
        "protocol.allow=never",
        *[arg for p in protocols for arg in ("-c", f"protocol.{p}.allow=always")],
    ]


def _git(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300,
    allow_local: bool = False,
    token: str | None = None,
    wrap: Wrapper | None = None,
) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    config = _git_config(allow_local)
    if token:  # a project's GIT_TOKEN, through a credential helper: never in a URL or a log
        env["SB_GIT_TOKEN"] = token
        config += [
            "-c",
            "credential.helper=",
            "-c",
            "credential.helper=!f() { echo username=x-access-token; "
            'echo "password=$SB_GIT_TOKEN"; }; f',
        ]
    argv = ["git", *config, *args]
    if wrap is not None:
        argv = wrap(argv)
    try:
        out = subprocess.run(
            argv,
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


@contextlib.contextmanager
def _disk_errors(root: Path) -> Iterator[None]:
    """A full disk fails the run with that reason, not a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise WorkspaceError(
                f"no space left for a workspace under {root} "
                f"({free_mb(root)} MB free): free some or lower the retention"
            ) from exc
        raise WorkspaceError(f"cannot prepare a workspace: {exc}") from exc


def free_mb(root: Path | str) -> int:
    path = Path(root)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free // (1024 * 1024)


def prepare(
    root: str,
    project_key: str,
    repo_url: str | None,
    default_branch: str,
    workdir: str | None,
    task_id: int,
    attempt: int,
    *,
    policy: Policy,
    git_token: str | None = None,
) -> Workspace:
    base = Path(root)
    with _disk_errors(base):
        area = base / "runs" / _safe(project_key) / f"{task_id}-{attempt}"
        home, tmp = area / "home", area / "tmp"
        for d in (home, tmp):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        own = [home, tmp]
        if not repo_url:
            if workdir:
                try:
                    path = Path(check_workdir(workdir, policy.workdir_roots, policy.protected))
                except PlaceRefused as exc:
                    raise WorkspaceError(f"the project's workdir is refused: {exc}") from None
                if not path.is_dir():
                    raise WorkspaceError(f"the project's workdir {str(path)!r} does not exist")
                return Workspace(path, home, tmp, writable=[path, *own])
            path = base / "scratch" / _safe(project_key) / f"task-{task_id}"
            path.mkdir(parents=True, exist_ok=True)
            return Workspace(path, home, tmp, writable=[path, *own])
        try:
            check_repo_url(
                repo_url, allow_local=policy.allow_local_repos, allowed=policy.allowed_networks
            )
        except PlaceRefused as exc:
            raise WorkspaceError(f"the project's repo_url is refused: {exc}") from None
        return _worktree(
            base,
            project_key,
            repo_url,
            default_branch,
            task_id,
            attempt,
            home,
            tmp,
            policy,
            git_token,
        )


def _cache(base: Path, project_key: str, repo_url: str) -> Path:
    key = hashlib.sha256(repo_url.encode()).hexdigest()[:12]
    return base / "repos" / f"{_safe(project_key)}-{key}.git"


@contextlib.contextmanager
def _clone(
    base: Path, project_key: str, repo_url: str, policy: Policy, token: str | None
) -> Iterator[Callable[..., str]]:
    """The project's cached bare clone, fetched, locked for the block: `git(*args)` in it."""
    cache = _cache(base, project_key, repo_url)

    def git(*args: str, cwd: Path | None = cache, timeout: float = 300) -> str:
        return _git(
            *args, cwd=cwd, timeout=timeout, allow_local=policy.allow_local_repos, token=token
        )

    with _locked(cache.with_suffix(".lock")):
        if not cache.exists():
            git("clone", "--bare", "--quiet", "--", repo_url, str(cache), cwd=None)
            git("config", "remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*")
        git("fetch", "--quiet", "--prune", "origin")
        yield git


def _worktree(
    base: Path,
    project_key: str,
    repo_url: str,
    default_branch: str,
    task_id: int,
    attempt: int,
    home: Path,
    tmp: Path,
    policy: Policy,
    git_token: str | None,
) -> Workspace:
    cache = _cache(base, project_key, repo_url)
    branch = f"switchboard/{task_id}-{attempt}"
    tree = base / "worktrees" / _safe(project_key) / f"{task_id}-{attempt}"
    with _clone(base, project_key, repo_url, policy, git_token) as git:
        start = f"refs/remotes/origin/{default_branch}"
        base_commit = git("rev-parse", "--verify", "--end-of-options", start)
        if tree.exists():
            git("worktree", "remove", "--force", str(tree))
        git("worktree", "prune")
        git("worktree", "add", "--quiet", "-B", branch, str(tree), base_commit)
    read_only = [p for p in (cache / "config", cache / "hooks") if p.exists()]
    return Workspace(
        tree,
        home,
        tmp,
        branch=branch,
        base_commit=base_commit,
        repo=cache,
        writable=[tree, cache, home, tmp],
        read_only=read_only,
    )


def push(
    root: str,
    project_key: str,
    repo_url: str,
    branch: str,
    head: str,
    bundle: bytes,
    *,
    policy: Policy,
    git_token: str | None,
) -> None:
    """Push a run's branch, at `head`, to the project's remote, from the bundle captured when
    the run ended (its worktree may be gone, or on another host). WorkspaceError says why not."""
    try:
        check_repo_url(
            repo_url, allow_local=policy.allow_local_repos, allowed=policy.allowed_networks
        )
    except PlaceRefused as exc:
        raise WorkspaceError(f"the project's repo_url is refused: {exc}") from None
    base = Path(root)
    with _disk_errors(base), _clone(base, project_key, repo_url, policy, git_token) as git:
        spool = base / "repos" / f"push-{os.getpid()}-{_safe(branch)}.bundle"
        spool.write_bytes(bundle)
        try:
            git("fetch", "--quiet", str(spool), f"+refs/heads/{branch}:refs/switchboard/{branch}")
            if git("rev-parse", f"refs/switchboard/{branch}") != head:
                raise WorkspaceError("the captured change does not end at the run's commit")
            git("push", "--quiet", "origin", f"{head}:refs/heads/{branch}", timeout=600)
        finally:
            spool.unlink(missing_ok=True)


def results(ws: Workspace, wrap: Wrapper | None = None) -> dict[str, str | None]:
    """Branch, final commit and a diff stat against the starting point (uncommitted work
    included). Run inside the agent's sandbox (`wrap`): the worktree is the agent's work."""
    if ws.branch is None:
        return {}
    try:
        head = _git("rev-parse", "HEAD", cwd=ws.path, wrap=wrap)
        _git("add", "--intent-to-add", "--all", cwd=ws.path, wrap=wrap)
        stat = _git("diff", "--stat", ws.base_commit or "HEAD", "--", cwd=ws.path, wrap=wrap)
    except WorkspaceError as exc:
        return {"branch": ws.branch, "diff_stat": f"(unavailable: {exc})"}
    return {"branch": ws.branch, "commit_sha": head, "diff_stat": stat or None}


# -- a run's change, for review -------------------------------------------------------------------

#: the stored diff is cut here (flagged `truncated`); the bundle past this is not stored
DIFF_MAX = 1024 * 1024
BUNDLE_MAX = 50 * 1024 * 1024
COMMITTER = ("Switchboard", "switchboard@localhost")
_NAME_STATUS = {"A": "added", "M": "modified", "D": "deleted", "R": "renamed", "C": "added"}


@dataclass
class Change:
    """What a run changed: see `app.runs.models.RunChange`."""

    branch: str
    base_commit: str
    head_commit: str
    diff: str
    truncated: bool
    files: list[dict[str, object]]
    bundle: bytes | None


def capture(ws: Workspace, wrap: Wrapper | None, message: str, author: str) -> Change | None:
    """Commit what the agent left uncommitted (author: the agent, committer: Switchboard) and
    capture the change against the run's base, at this moment. None without a repository or
    when nothing changed. Run inside the agent's sandbox (`wrap`), as `results` is."""
    if ws.branch is None or ws.base_commit is None:
        return None

    def git(*args: str) -> str:
        return _git(*args, cwd=ws.path, wrap=wrap)

    git("add", "--all")
    if git("status", "--porcelain", "--untracked-files=no"):
        git(
            "-c", f"user.name={COMMITTER[0]}", "-c", f"user.email={COMMITTER[1]}",
            "commit", "--quiet", "--no-verify", "--author", f"{author} <agent@switchboard>",
            "-m", message[:2000] or "Switchboard run",
        )  # fmt: skip
    head = git("rev-parse", "HEAD")
    if head == ws.base_commit:
        return None
    span = f"{ws.base_commit}..{head}"
    diff = git("diff", "--no-color", "--no-ext-diff", span)
    truncated = len(diff) > DIFF_MAX
    files = _files(
        git("diff", "--numstat", "-z", "-M", span), git("diff", "--name-status", "-M", span)
    )
    bundle_path = ws.tmp / "change.bundle"
    bundle: bytes | None = None
    try:
        git("bundle", "create", str(bundle_path), ws.branch, f"^{ws.base_commit}")
        if bundle_path.stat().st_size <= BUNDLE_MAX:
            bundle = bundle_path.read_bytes()
    except (WorkspaceError, OSError):
        bundle = None
    finally:
        bundle_path.unlink(missing_ok=True)
    return Change(
        ws.branch,
        ws.base_commit,
        head,
        (diff[:DIFF_MAX] if truncated else diff) + ("\n" if diff else ""),
        truncated,
        files,
        bundle,
    )


def _files(numstat: str, name_status: str) -> list[dict[str, object]]:
    """Per file: path, status, additions, deletions, binary (`git diff --numstat -z`, whose
    renames are `adds\tdels\t\0old\0new\0`, and `--name-status` for the kind)."""
    kinds: dict[str, str] = {}
    for line in name_status.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            kinds[parts[-1]] = _NAME_STATUS.get(parts[0][:1], "modified")
    files: list[dict[str, object]] = []
    fields = numstat.split("\0")
    i = 0
    while i < len(fields) and fields[i]:
        adds, dels, path = [*fields[i].split("\t", 2), "", ""][:3]
        if not path:  # a rename: the old and the new path follow
            path = fields[i + 2] if i + 2 < len(fields) else ""
            i += 3
        else:
            i += 1
        binary = adds == "-"
        files.append(
            {
                "path": path,
                "status": kinds.get(path, "modified"),
                "additions": 0 if binary else int(adds or 0),
                "deletions": 0 if binary else int(dels or 0),
                "binary": binary,
            }
        )
    return files


# -- retention -----------------------------------------------------------------------------------

#: (project directory name, task id, attempt or None for a task's scratch directory)
RunPlace = tuple[str, int, int | None]
_RUN_DIR = re.compile(r"^(\d+)-(\d+)$")
_SCRATCH_DIR = re.compile(r"^task-(\d+)$")


def places(root: str) -> Iterator[tuple[RunPlace, Path]]:
    """Every run's worktree, home area and task scratch directory under `root`."""
    base = Path(root)
    for kind in ("worktrees", "runs", "scratch"):
        for project_dir in _dirs(base / kind):
            for d in _dirs(project_dir):
                if kind == "scratch":
                    m = _SCRATCH_DIR.match(d.name)
                    if m:
                        yield (project_dir.name, int(m[1]), None), d
                else:
                    m = _RUN_DIR.match(d.name)
                    if m:
                        yield (project_dir.name, int(m[1]), int(m[2])), d


def _dirs(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def remove(root: str, place: Path) -> None:
    """Remove a run's directory; a worktree through git (its branch stays in the clone)."""
    base = Path(root)
    if base / "worktrees" in place.parents:
        git_file = place / ".git"
        with contextlib.suppress(OSError, ValueError):
            gitdir = Path(git_file.read_text().split("gitdir:", 1)[1].strip())
            cache = gitdir.parent.parent  # <cache>/worktrees/<name>
            if base / "repos" in cache.parents:  # never a place the agent pointed elsewhere
                shutil.rmtree(place, ignore_errors=True)
                with contextlib.suppress(WorkspaceError):
                    _git("worktree", "prune", cwd=cache)
                return
    shutil.rmtree(place, ignore_errors=True)


def remove_project(root: str, project_key: str) -> int:
    """Everything of a project under `root` (its clone too): for a deleted project."""
    base, name = Path(root), _safe(project_key)
    removed = 0
    for kind in ("worktrees", "runs", "scratch"):
        if (base / kind / name).is_dir():
            shutil.rmtree(base / kind / name, ignore_errors=True)
            removed += 1
    for cache in (base / "repos").glob(f"{name}-*.git"):
        if re.fullmatch(re.escape(name) + r"-[0-9a-f]{12}\.git", cache.name):
            shutil.rmtree(cache, ignore_errors=True)
            cache.with_suffix(".lock").unlink(missing_ok=True)
            removed += 1
    return removed
