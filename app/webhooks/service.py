"""The stored webhook events as people see them: listed and read within the projects they
matched, and replayed. Sources are `sources`, receiving `receiving`, matching and dispatch
`processing`, rules `rules`."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from app.audit import service as audit
from app.auth.service import Principal
from app.database import db
from app.errors import NotFound
from app.pagination import Page, paginate
from app.projects import service as projects
from app.projects.models import Project
from app.webhooks import processing
from app.webhooks.models import EventMatch, WebhookEvent

log = logging.getLogger(__name__)


def _visible(principal: Principal, stmt: sa.Select[Any]) -> sa.Select[Any]:
    ids = projects.visible_project_ids(principal)
    if ids is None:
        return stmt
    return stmt.where(
        sa.exists().where(EventMatch.event_id == WebhookEvent.id, EventMatch.project_id.in_(ids))
    )


def list_events(
    principal: Principal,
    *,
    state: str | None = None,
    source: str | None = None,
    project: str | None = None,
    type: str | None = None,
    cursor: int | None = None,
    limit: int = 50,
) -> Page[WebhookEvent]:
    stmt = _visible(principal, sa.select(WebhookEvent))
    if state:
        stmt = stmt.where(WebhookEvent.state == state)
    if source:
        stmt = stmt.where(WebhookEvent.source_name == source)
    if type:
        stmt = stmt.where(WebhookEvent.event_type == type)
    if project:
        stmt = stmt.where(
            sa.exists().where(
                EventMatch.event_id == WebhookEvent.id,
                EventMatch.project_id == Project.id,
                Project.key == project,
            )
        )
    return paginate(stmt, WebhookEvent.id, cursor=cursor, limit=limit)


def event_for(principal: Principal, event_id: int) -> WebhookEvent:
    event = db.session.scalar(
        _visible(principal, sa.select(WebhookEvent).where(WebhookEvent.id == event_id))
    )
    if event is None:
        raise NotFound(f"No event {event_id}.")
    return event


def event_matches(event_id: int) -> list[EventMatch]:
    return list(
        db.session.scalars(
            sa.select(EventMatch).where(EventMatch.event_id == event_id).order_by(EventMatch.id)
        )
    )


def replay(event: WebhookEvent) -> WebhookEvent:
    result = processing.process_event(event.id, replay=True)  # commits its own transactions
    assert result is not None
    audit.record_now("webhook_event.replay", target_type="webhook_event", target_id=event.id)
    return result
