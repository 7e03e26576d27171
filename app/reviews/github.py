"""Opening a pull request through GitHub's REST API (`POST /repos/{owner}/{repo}/pulls`): the
one call to GitHub Switchboard makes, at the edge. No Flask: the caller passes the API's base
URL (`SWITCHBOARD_GITHUB_API_URL`) and the project's token."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

_GITHUB = re.compile(
    r"^(?:https://github\.com/|git@github\.com:|ssh://git@github\.com/)"
    r"(?P<owner>[A-Za-z0-9_.-]+)/(?P<repo>[A-Za-z0-9_.-]+?)(?:\.git)?/?$"
)


class GitHubError(RuntimeError):
    pass


def repository(repo_url: str) -> tuple[str, str] | None:
    """(owner, repo) of a GitHub remote; None for any other."""
    match = _GITHUB.match(repo_url.strip())
    return (match["owner"], match["repo"]) if match else None


def open_pull_request(
    api_url: str,
    token: str | None,
    owner: str,
    repo: str,
    *,
    head: str,
    base: str,
    title: str,
    body: str,
    draft: bool,
) -> str:
    """The new pull request's web URL."""
    if not token:
        raise GitHubError("the project has no GIT_TOKEN secret to open a pull request with")
    request = urllib.request.Request(
        f"{api_url.rstrip('/')}/repos/{owner}/{repo}/pulls",
        data=json.dumps(
            {"title": title, "head": head, "base": base, "body": body, "draft": draft}
        ).encode(),
        method="POST",
        headers={
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {token}",
            "X-GitHub-Api-Version": "2022-11-28",
            "Content-Type": "application/json",
            "User-Agent": "Switchboard",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            answer: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = (exc.read() or b"")[:300].decode("utf-8", "replace")
        raise GitHubError(f"GitHub answered {exc.code}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise GitHubError(f"GitHub could not be reached: {exc}") from None
    url = answer.get("html_url")
    if not isinstance(url, str):
        raise GitHubError("GitHub's answer has no html_url")
    return url
