"""Where a project's agents may work and what they may clone: the one place that decides.

A project's `workdir` must lie under one of `SWITCHBOARD_WORKDIR_ROOTS` (resolved: symlinks and
`..` cannot lead out), and never over the server's own files: a workdir that contains the
instance or workspace directory, or lies inside one without a root there allowing it, is
refused. A `repo_url` is `https://`, `ssh://` or `git@host:path`, names a public host (SSRF:
git would otherwise fetch from the server's own network), never starts with `-` (git would read
it as an option) and carries no credentials (those go in a project secret). Checked when a
project is saved and again when a run prepares its workspace. No Flask: workers call it too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from app.netguard import Network, Refused, check_host

#: git@host:path (scp-like syntax): a user, a host, a path that is not `//…`
SCP_LIKE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+):(?!/)(?P<path>\S+)$")
#: what `git check-ref-format --branch` refuses that matters here, plus a leading '-'
BAD_BRANCH = re.compile(r"(^[-/.])|(\.\.)|([\x00-\x20\x7f~^:?*\[\\])|(@\{)|(/$)|(\.lock$)|(//)")
CREDENTIAL_HINT = (
    "credentials do not belong in repo_url (viewers and the audit log would see them): "
    "set the project secret GIT_TOKEN instead"
)


class PlaceRefused(ValueError):
    """Not a place agents may work or clone from; the message says why."""


def _inside(path: Path, area: Path) -> bool:
    return path == area or area in path.parents


def check_workdir(raw: str, roots: Sequence[str], protected: Sequence[str]) -> str:
    """The resolved workdir, or `PlaceRefused`. `protected`: the instance and workspace
    directories, which a workdir may neither contain nor enter unless a root inside them
    allows it."""
    if "\x00" in raw:
        raise PlaceRefused("the path holds a NUL character")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise PlaceRefused("an absolute path is needed")
    path = path.resolve()
    resolved_roots = [Path(r).expanduser().resolve() for r in roots if r]
    allowing = [r for r in resolved_roots if _inside(path, r)]
    for area in (Path(p).resolve() for p in protected if p):
        if _inside(area, path):
            raise PlaceRefused(f"{path} contains the server's own files ({area})")
        if _inside(path, area):
            allowing = [r for r in allowing if _inside(r, area)]
    if not allowing:
        shown = ", ".join(str(r) for r in resolved_roots) or "(none)"
        raise PlaceRefused(
            f"{path} is not under an allowed root ({shown}); an administrator may add one "
            "to SWITCHBOARD_WORKDIR_ROOTS"
        )
    return str(path)


def check_repo_url(url: str, *, allow_local: bool, allowed: Sequence[Network]) -> None:
    """`PlaceRefused` unless git may clone `url` for a run."""
    if not url or url != url.strip() or any(ord(c) < 0x20 or c == "\x7f" for c in url):
        raise PlaceRefused("the URL is empty or holds spaces or control characters")
    if url.startswith("-"):
        raise PlaceRefused("a repository URL never starts with '-'")
    scp = SCP_LIKE.match(url)
    if scp:
        _check_host(scp["host"], 22, allowed)
        return
    parts = urlsplit(url)
    if parts.scheme in ("https", "ssh"):
        if not parts.hostname:
            raise PlaceRefused("the URL has no host")
        if parts.password or (parts.scheme == "https" and parts.username):
            raise PlaceRefused(CREDENTIAL_HINT)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 22)
        except ValueError as exc:
            raise PlaceRefused(str(exc)) from None
        _check_host(parts.hostname, port, allowed)
        return
    local = parts.scheme == "file" or (not parts.scheme and url.startswith("/"))
    if local and allow_local:
        return
    if local:
        raise PlaceRefused(
            "local paths and file:// URLs would clone the server's own files; "
            "they are allowed only with SWITCHBOARD_ALLOW_LOCAL_REPOS=true"
        )
    raise PlaceRefused("use an https://, ssh:// or git@host:path URL")


def _check_host(host: str, port: int, allowed: Sequence[Network]) -> None:
    try:
        check_host(host, port, allowed)
    except Refused as exc:
        raise PlaceRefused(str(exc)) from None


def check_branch(name: str) -> None:
    if BAD_BRANCH.search(name):
        raise PlaceRefused(f"{name!r} is not a branch name git accepts")
