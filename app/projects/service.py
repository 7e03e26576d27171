"""Projects and their members; the one place that decides who may do what in a project.

Roles: viewer reads; developer also creates tasks and controls runs; maintainer also manages the
project and its members. Admins may do everything. Someone who is not a member does not learn that
a project exists (404).
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app import events
from app.agents.registry import known_agents
from app.audit import service as audit
from app.auth import cache as auth_cache
from app.auth.service import Principal, find_user
from app.config import allowed_networks, protected_dirs, workdir_roots
from app.database import db, lock_rows
from app.errors import Conflict, Forbidden, NotFound, ValidationFailed
from app.pagination import Page, paginate
from app.projects import places
from app.projects.models import PROJECT_ROLES, Project, ProjectMember
from app.runs.models import RUN_ACTIVE, Run
from app.tasks.models import TASK_STATUSES, Task
from app.timeutil import utcnow
from app.users.models import User

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
ROLE_RANK = {role: i for i, role in enumerate(PROJECT_ROLES)}


def is_admin(principal: Principal) -> bool:
    return admin_by(principal.user.role, principal.abilities)


# The decision, on values: what `role_in` and `authorize` apply to a principal, and what the
# task fast path (`tasks.pg_fastpath`) applies to the row it read.


def admin_by(user_role: str, abilities: frozenset[str]) -> bool:
    """An admin acting with the `admin` ability (a token without it acts as a member)."""
    return user_role == "admin" and "admin" in abilities


def role_from(admin: bool, member_role: str | None) -> str | None:
    """The role in a project: an admin is a maintainer of every project."""
    return "maintainer" if admin else member_role


def grants(have: str | None, role: str) -> bool:
    """Whether the role held (None: not a member) is at least `role`."""
    return have is not None and ROLE_RANK[have] >= ROLE_RANK[role]


def takes_tasks(archived_at: Any) -> bool:
    """An archived project takes no new tasks."""
    return archived_at is None


def role_in(principal: Principal, project: Project) -> str | None:
    if is_admin(principal):
        return role_from(True, None)
    if principal.kind == "run":  # a run's token: its own project, as a developer
        return "developer" if project.id == principal.project_id else None
    # one lookup per principal and project within a session (a request, a job), and remembered
    # by the process for a few seconds (a membership change is announced: `set_member`)
    roles = db.session.info.setdefault("sb_roles", {})
    key = (principal.user.id, project.id)
    if key not in roles:
        memory = auth_cache.remembered()
        known = memory.get(("role", *key))
        if known is None:
            known = (
                db.session.scalar(
                    sa.select(ProjectMember.role).where(
                        ProjectMember.project_id == project.id,
                        ProjectMember.user_id == principal.user.id,
                    )
                ),
            )
            memory.put(("role", *key), principal.user.id, known)
        roles[key] = known[0]
    return roles[key]


def authorize(principal: Principal, project: Project, role: str) -> str:
    """The principal's role in the project, if it is at least `role`; else 404 or 403."""
    have = role_in(principal, project)
    if have is None:
        raise NotFound(f"No project {project.key!r}.")
    if not grants(have, role):
        raise Forbidden(f"This needs the {role} role in project {project.key!r}; you are {have}.")
    return have


def visible_project_ids(principal: Principal) -> list[int] | None:
    """Project ids the principal may read; None means all (admin)."""
    if is_admin(principal):
        return None
    return list(
        db.session.scalars(
            sa.select(ProjectMember.project_id).where(ProjectMember.user_id == principal.user.id)
        )
    )


def get_project(key: str) -> Project:
    project = db.session.scalar(sa.select(Project).where(Project.key == key))
    if project is None:
        raise NotFound(f"No project {key!r}.")
    return project


def project_keys(ids: set[int]) -> dict[int, str]:
    """Project keys by id, for responses that name projects (one query)."""
    if not ids:
        return {}
    return dict(
        db.session.execute(sa.select(Project.id, Project.key).where(Project.id.in_(ids))).all()
    )


def project_for(principal: Principal, key: str, role: str = "viewer") -> Project:
    project = get_project(key)
    authorize(principal, project, role)
    return project


def create_project(principal: Principal, data: dict[str, Any]) -> Project:
    key = data["key"].strip().lower()
    if not KEY_RE.match(key):
        raise ValidationFailed(
            "Invalid project key.",
            {"key": ["1-64 characters: lowercase letters, digits and '-', not first"]},
        )
    if db.session.scalar(sa.select(Project.id).where(Project.key == key)) is not None:
        raise Conflict(f"A project with key {key!r} exists.", errors={"key": ["taken"]})
    _check_agent(data.get("default_agent"))
    data = _check_places(data)
    project = Project(**{**data, "key": key}, created_by=principal.user.id)
    db.session.add(project)
    db.session.flush()
    db.session.add(
        ProjectMember(project_id=project.id, user_id=principal.user.id, role="maintainer")
    )
    audit.record(
        "project.create",
        target_type="project",
        target_id=project.key,
        payload={k: v for k, v in data.items() if k != "description"},
    )
    db.session.commit()
    return project


def _check_places(data: dict[str, Any]) -> dict[str, Any]:
    """The workdir resolved, the repo URL and branch checked (`places`), or 422."""
    cfg = current_app.config
    errors: dict[str, list[str]] = {}
    data = dict(data)
    try:
        if data.get("workdir"):
            data["workdir"] = places.check_workdir(
                data["workdir"], workdir_roots(cfg), protected_dirs(cfg)
            )
    except places.PlaceRefused as exc:
        errors["workdir"] = [str(exc)]
    try:
        if data.get("repo_url"):
            places.check_repo_url(
                data["repo_url"],
                allow_local=cfg["SWITCHBOARD_ALLOW_LOCAL_REPOS"],
                allowed=allowed_networks(cfg["SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS"]),
            )
    except places.PlaceRefused as exc:
        errors["repo_url"] = [str(exc)]
    try:
        if data.get("default_branch"):
            places.check_branch(data["default_branch"])
    except places.PlaceRefused as exc:
        errors["default_branch"] = [str(exc)]
    if errors:
        raise ValidationFailed("Agents may not work there.", errors)
    return data


def _check_agent(agent: str | None) -> None:
    if agent is None:
        return
    if agent not in known_agents():
        raise ValidationFailed(
            "Unknown agent.",
            {
                "default_agent": [
                    f"unknown agent {agent!r}; known: {', '.join(sorted(known_agents()))}"
                ]
            },
        )


def list_projects(
    principal: Principal, *, archived: bool = False, cursor: int | None, limit: int
) -> Page[Project]:
    stmt = sa.select(Project)
    ids = visible_project_ids(principal)
    if ids is not None:
        stmt = stmt.where(Project.id.in_(ids))
    stmt = stmt.where(
        Project.archived_at.is_not(None) if archived else Project.archived_at.is_(None)
    )
    return paginate(stmt, Project.id, cursor=cursor, limit=limit, newest_first=False)


def update_project(project: Project, changes: dict[str, Any]) -> Project:
    _check_agent(changes.get("default_agent"))
    changes = _check_places(changes)
    for key, value in changes.items():
        setattr(project, key, value)
    audit.record(
        "project.update",
        target_type="project",
        target_id=project.key,
        payload={"fields": sorted(changes)},
    )
    if "max_concurrent_runs" in changes:
        events.project_capacity_changed.send(project_id=project.id)
    db.session.commit()
    return project


def active_runs(project_id: int) -> int:
    return (
        db.session.scalar(
            sa.select(sa.func.count(Run.id)).where(
                Run.project_id == project_id, Run.status.in_(RUN_ACTIVE)
            )
        )
        or 0
    )


def archive_project(project: Project) -> None:
    if active_runs(project.id):
        raise Conflict(f"Project {project.key!r} has active runs; stop them first.")
    if project.archived_at is None:
        project.archived_at = utcnow()
        audit.record("project.archive", target_type="project", target_id=project.key)
        db.session.commit()


def list_members(project: Project) -> list[tuple[ProjectMember, User]]:
    return list(
        db.session.execute(
            sa.select(ProjectMember, User)
            .join(User, User.id == ProjectMember.user_id)
            .where(ProjectMember.project_id == project.id)
            .order_by(User.username)
        ).all()
    )


def get_member(project: Project, user_id: int) -> tuple[ProjectMember, User]:
    member = db.session.get(ProjectMember, (project.id, user_id))
    user = db.session.get(User, user_id)
    if member is None or user is None:
        raise NotFound(f"User {user_id} is not a member of {project.key!r}.")
    return member, user


def _maintainers(project_id: int) -> int:
    """Counted with the maintainers' rows locked (PostgreSQL; SQLite: the write lock), so that
    two maintainers stepping down at once cannot both see the other remain."""
    lock_rows(
        ProjectMember.role,
        ProjectMember.project_id == project_id,
        ProjectMember.role == "maintainer",
    )
    return (
        db.session.scalar(
            sa.select(sa.func.count())
            .select_from(ProjectMember)
            .where(ProjectMember.project_id == project_id, ProjectMember.role == "maintainer")
        )
        or 0
    )


def member_named(principal: Principal, project: Project, data: dict[str, Any]) -> int:
    """The user a maintainer adds, named by username or email, never by a guessed id (ids in a
    row would list every account's name); an id names someone already a member (a role
    change), or anyone for an administrator."""
    user_id = data.get("user_id")
    if user_id is not None:
        if is_admin(principal) or db.session.get(ProjectMember, (project.id, user_id)):
            return int(user_id)
        raise ValidationFailed(
            "Add a new member by username or email.",
            {"user_id": ["for a current member only: name new members by username or email"]},
        )
    field = "email" if data.get("email") else "username"
    user = find_user(data[field])
    if user is None or not user.is_active:
        raise ValidationFailed("Unknown user.", {field: ["no active user by that name"]})
    return user.id


def set_member(project: Project, user_id: int, role: str) -> ProjectMember:
    user = db.session.get(User, user_id)
    if user is None or not user.is_active:
        raise ValidationFailed("Unknown user.", {"user_id": [f"no active user {user_id}"]})
    member = db.session.get(ProjectMember, (project.id, user_id))
    if (
        member is not None
        and member.role == "maintainer"
        and role != "maintainer"
        and _maintainers(project.id) == 1
    ):
        raise Conflict("This is the project's last maintainer.")
    if member is None:
        member = ProjectMember(project_id=project.id, user_id=user_id, role=role)
        db.session.add(member)
    else:
        member.role = role
    db.session.info.pop("sb_roles", None)
    audit.record(
        "project.member_set",
        target_type="project",
        target_id=project.key,
        payload={"user_id": user_id, "role": role},
    )
    auth_cache.changed(user_id)
    db.session.commit()
    return member


def remove_member(project: Project, user_id: int) -> None:
    member = db.session.get(ProjectMember, (project.id, user_id))
    if member is None:
        raise NotFound(f"User {user_id} is not a member of {project.key!r}.")
    if member.role == "maintainer" and _maintainers(project.id) == 1:
        raise Conflict("This is the project's last maintainer.")
    db.session.delete(member)
    db.session.info.pop("sb_roles", None)
    audit.record(
        "project.member_remove",
        target_type="project",
        target_id=project.key,
        payload={"user_id": user_id},
    )
    auth_cache.changed(user_id)
    db.session.commit()


def stats(project: Project) -> dict[str, Any]:
    tasks = dict.fromkeys(TASK_STATUSES, 0)
    for status, n in db.session.execute(
        sa.select(Task.status, sa.func.count(Task.id))
        .where(Task.project_id == project.id)
        .group_by(Task.status)
    ):
        tasks[status] = n
    runs: dict[str, int] = {}
    log_bytes = 0
    for status, n, size in db.session.execute(
        sa.select(Run.status, sa.func.count(Run.id), sa.func.coalesce(sa.func.sum(Run.log_size), 0))
        .where(Run.project_id == project.id)
        .group_by(Run.status)
    ):
        runs[status] = n
        log_bytes += int(size)
    return {
        "tasks": tasks,
        "tasks_total": sum(tasks.values()),
        "runs": runs,
        "runs_total": sum(runs.values()),
        "log_bytes": log_bytes,
    }
