"""The audit trail every module writes to.

`record()` adds the entry to the current session so it commits (or rolls back) with the change it
describes; `record_now()` commits on its own, for events that change nothing else (a failed login).
Who, from where and under which request id come from `app.context`, never from Flask.
"""

from __future__ import annotations

from contextvars import ContextVar
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from app import context
from app.audit.models import AuditLog
from app.audit.redact import redact
from app.database import db
from app.pagination import Page, paginate
from app.users.models import User

#: actions recorded during the current request, so the catch-all request audit can stay quiet
_written_in_scope: ContextVar[list[str] | None] = ContextVar("audit_scope", default=None)


def begin_scope() -> None:
    _written_in_scope.set([])


def recorded_in_scope() -> bool:
    return bool(_written_in_scope.get())


def record(
    action: str,
    *,
    target_type: str | None = None,
    target_id: object | None = None,
    payload: dict[str, Any] | None = None,
    actor_id: int | None = None,
    actor_name: str | None = None,
) -> AuditLog:
    ctx = context.current()
    actor_id = actor_id if actor_id is not None else ctx.user_id
    if actor_id is not None and actor_name is None:
        user = db.session.get(User, actor_id)
        actor_name = user.username if user else None
    entry = AuditLog(
        action=action,
        actor_id=actor_id,
        actor_name=actor_name,
        via=ctx.via,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        request_id=ctx.request_id,
        ip=ctx.ip,
        payload=redact(payload) if payload else None,
    )
    db.session.add(entry)
    written = _written_in_scope.get()
    if written is not None:
        written.append(action)
    return entry


def record_now(action: str, **kwargs: Any) -> AuditLog:
    entry = record(action, **kwargs)
    db.session.commit()
    return entry


def list_entries(
    *,
    actor_id: int | None = None,
    action: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> Page[AuditLog]:
    stmt = sa.select(AuditLog)
    if actor_id is not None:
        stmt = stmt.where(AuditLog.actor_id == actor_id)
    if action:
        # "auth." lists a whole family of actions
        prefix = action.endswith(".")
        stmt = stmt.where(
            AuditLog.action.startswith(action) if prefix else AuditLog.action == action
        )
    if target_type:
        stmt = stmt.where(AuditLog.target_type == target_type)
    if target_id:
        stmt = stmt.where(AuditLog.target_id == target_id)
    if since:
        stmt = stmt.where(AuditLog.created_at >= since)
    if until:
        stmt = stmt.where(AuditLog.created_at < until)
    return paginate(stmt, AuditLog.id, cursor=cursor, limit=limit)
