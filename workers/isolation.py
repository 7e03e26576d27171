"""What a pool worker gives a run's agent, from the settings: the places it may work, its
environment, its project's secrets and its sandbox (`agent_env`, `workspace`, `sandbox` hold the
mechanics, free of Flask, for the machine client too)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.fernet import InvalidToken

from app.config import allowed_networks, passthrough_names, protected_dirs, workdir_roots
from app.projects.models import Project
from app.vault import service as vault
from workers import agent_env, sandbox, workspace

#: a project's decrypted secrets by project id, with the `secrets_version` they are of: a run
#: of a project whose secrets did not change costs no query (the version comes with the run)
_secrets: dict[int, tuple[int, dict[str, str]]] = {}


class SecretsUnreadable(RuntimeError):
    """The project's secrets do not decrypt with this worker's SWITCHBOARD_SECRETS_KEY."""


def project_secrets(project: Project) -> dict[str, str]:
    if not project.secrets_version:
        return {}
    known = _secrets.get(project.id)
    if known is None or known[0] != project.secrets_version:
        try:
            values = vault.values_for(project.id)
        except InvalidToken:
            raise SecretsUnreadable(
                f"project {project.key!r}'s secrets do not decrypt with this worker's "
                "SWITCHBOARD_SECRETS_KEY (is it the web server's? was a key dropped before "
                "`switchboard secrets rotate`?)"
            ) from None
        known = (project.secrets_version, values)
        _secrets[project.id] = known
    return known[1]


def policy(cfg: Mapping[str, Any]) -> workspace.Policy:
    return workspace.Policy(
        workdir_roots=workdir_roots(cfg),
        protected=protected_dirs(cfg),
        allow_local_repos=cfg["SWITCHBOARD_ALLOW_LOCAL_REPOS"],
        allowed_networks=allowed_networks(cfg["SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS"]),
    )


def agent_environment(
    cfg: Mapping[str, Any],
    ws: workspace.Workspace,
    secrets: Mapping[str, str],
    run_vars: Mapping[str, str],
) -> dict[str, str]:
    return agent_env.build(
        os.environ,
        home=ws.home,
        tmp=ws.tmp,
        run_vars=run_vars,
        secrets=secrets,
        passthrough=passthrough_names(cfg["SWITCHBOARD_AGENT_ENV_PASSTHROUGH"]),
    )


@functools.cache
def sandbox_mode(setting: str) -> str:
    """Chosen once per process (a worker says at its start which it is)."""
    return sandbox.choose(setting)


def hidden(cfg: Mapping[str, Any]) -> list[Path]:
    """The server's own files: the instance and workspace directories, the SQLite file and the
    Redis socket wherever they are, the server user's credentials."""
    paths = [Path(p) for p in protected_dirs(cfg)]
    database = cfg["SQLALCHEMY_DATABASE_URI"]
    if database.startswith("sqlite:///"):
        paths.append(Path(database.removeprefix("sqlite:///")))
    redis_url = cfg["SWITCHBOARD_REDIS_URL"]
    if redis_url.startswith("unix://"):
        paths.append(Path(redis_url.removeprefix("unix://").split("?", 1)[0]))
    paths += sandbox.server_home_credentials(os.environ.get("HOME"))
    return paths


def wrapper(cfg: Mapping[str, Any], ws: workspace.Workspace) -> workspace.Wrapper:
    """Wraps a command to run as the run's agent does: in its sandbox, or as it is."""
    if sandbox_mode(cfg["SWITCHBOARD_SANDBOX"]) != "bwrap":
        return list
    mounts = sandbox.Mounts(
        workdir=ws.path,
        writable=ws.writable,
        hidden=hidden(cfg),
        read_only=ws.read_only,
        empty=sandbox.empty_file(Path(cfg["SWITCHBOARD_WORKSPACE_ROOT"])),
    )
    path_dirs = os.environ.get("PATH", "").split(os.pathsep)
    return lambda argv: sandbox.wrap(argv, mounts, path_dirs)
