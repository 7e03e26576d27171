"""Project secrets: set and removed by maintainers, listed by name only, handed to a run's agent
as environment variables (and masked in what it prints: `workers.redaction`).

Every change bumps the project's `secrets_version`, which comes with the run a worker takes, so
workers remember a project's decrypted secrets until they change and a run of a project without
secrets costs no query at all.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app.audit import service as audit
from app.auth.service import Principal
from app.database import db
from app.errors import NotFound, ValidationFailed
from app.projects.models import Project
from app.timeutil import utcnow
from app.users.models import User
from app.vault.crypto import cipher
from app.vault.models import ProjectSecret

NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
VALUE_MAX = 64 * 1024
#: names an agent's environment sets itself, or that would change how its shell runs
RESERVED = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "TERM",
        "USER",
        "LOGNAME",
        "SHELL",
        "PWD",
        "IFS",
        "ENV",
        "BASH_ENV",
        "PS4",
        "PROMPT_COMMAND",
    }
)
RESERVED_PREFIXES = ("SWITCHBOARD_", "LD_", "DYLD_", "BASH_FUNC_")


def name_refusal(name: str) -> str | None:
    if not NAME_RE.match(name):
        return "1-128 characters: A-Z, 0-9 and '_', not starting with a digit"
    if name in RESERVED or name.startswith(RESERVED_PREFIXES):
        return f"{name} is set by Switchboard itself or changes how the agent's shell runs"
    return None


def _keys() -> str:
    return current_app.config["SWITCHBOARD_SECRETS_KEY"]


def encrypt(value: str) -> str:
    return cipher(_keys()).encrypt(value.encode()).decode()


def decrypt(ciphertext: str) -> str:
    return cipher(_keys()).decrypt(ciphertext.encode()).decode()


def list_secrets(project: Project) -> list[dict[str, Any]]:
    rows = db.session.execute(
        sa.select(ProjectSecret, User.username)
        .outerjoin(User, User.id == ProjectSecret.updated_by)
        .where(ProjectSecret.project_id == project.id)
        .order_by(ProjectSecret.name)
    ).all()
    return [
        {
            "name": s.name,
            "created_at": s.created_at,
            "updated_at": s.updated_at,
            "updated_by": {"id": s.updated_by, "username": username} if s.updated_by else None,
        }
        for s, username in rows
    ]


def _bump(project: Project) -> None:
    db.session.execute(
        sa.update(Project)
        .where(Project.id == project.id)
        .values(secrets_version=Project.secrets_version + 1)
        .execution_options(synchronize_session=False)
    )


def set_secret(principal: Principal, project: Project, name: str, value: str) -> bool:
    """Store the value (encrypted); True when the name is new."""
    refusal = name_refusal(name)
    if refusal:
        raise ValidationFailed("Invalid secret name.", {"name": [refusal]})
    if not value or len(value.encode()) > VALUE_MAX or "\x00" in value:
        raise ValidationFailed(
            "Invalid secret value.",
            {"value": [f"1 to {VALUE_MAX} bytes of text, without NUL characters"]},
        )
    row = db.session.get(ProjectSecret, (project.id, name))
    created = row is None
    now = utcnow()
    if row is None:
        row = ProjectSecret(project_id=project.id, name=name, created_at=now)
        db.session.add(row)
    row.ciphertext = encrypt(value)
    row.updated_at = now
    row.updated_by = principal.user.id
    _bump(project)
    audit.record(
        "project.secret_set",
        target_type="project",
        target_id=project.key,
        payload={"name": name, "created": created},  # never the value
    )
    db.session.commit()
    return created


def delete_secret(project: Project, name: str) -> None:
    row = db.session.get(ProjectSecret, (project.id, name))
    if row is None:
        raise NotFound(f"No secret {name!r} in project {project.key!r}.")
    db.session.delete(row)
    _bump(project)
    audit.record(
        "project.secret_remove",
        target_type="project",
        target_id=project.key,
        payload={"name": name},
    )
    db.session.commit()


def values_for(project_id: int) -> dict[str, str]:
    """The project's secrets, decrypted: for the environment of a run's agent only."""
    rows = db.session.execute(
        sa.select(ProjectSecret.name, ProjectSecret.ciphertext).where(
            ProjectSecret.project_id == project_id
        )
    ).all()
    return {name: decrypt(ciphertext) for name, ciphertext in rows}


def rotate(batch: int = 500) -> int:
    """Re-encrypt every secret with the newest key (after adding it in front of
    SWITCHBOARD_SECRETS_KEY); the older keys can be dropped afterwards. Returns how many."""
    done = 0
    last: tuple[int, str] = (0, "")
    multi = cipher(_keys())
    while True:
        rows = list(
            db.session.scalars(
                sa.select(ProjectSecret)
                .where(sa.tuple_(ProjectSecret.project_id, ProjectSecret.name) > last)
                .order_by(ProjectSecret.project_id, ProjectSecret.name)
                .limit(batch)
            )
        )
        if not rows:
            return done
        for row in rows:
            row.ciphertext = multi.rotate(row.ciphertext.encode()).decode()
        last = (rows[-1].project_id, rows[-1].name)
        done += len(rows)
        db.session.commit()
