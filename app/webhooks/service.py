"""The stored webhook events as people see them: listed and read within the projects they
matched, and replayed. Sources are `sources`, receiving `receiving`, matching and dispatch
`processing`, rules `rules`."""

from __future__ import annotations

import logging
import re
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
from app.webhooks.models import EventMatch, Rule, WebhookEvent

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
        in_project = sa.exists().where(
            EventMatch.event_id == WebhookEvent.id,
            EventMatch.project_id == Project.id,
            Project.key == project,
        )
        ids = projects.visible_project_ids(principal)
        if ids is not None:  # never which other projects an event reached
            in_project = in_project.where(Project.id.in_(ids))
        stmt = stmt.where(in_project)
    return paginate(stmt, WebhookEvent.id, cursor=cursor, limit=limit)


def event_for(principal: Principal, event_id: int) -> WebhookEvent:
    event = db.session.scalar(
        _visible(principal, sa.select(WebhookEvent).where(WebhookEvent.id == event_id))
    )
    if event is None:
        raise NotFound(f"No event {event_id}.")
    return event


def event_matches(ids: list[int] | None, event_id: int) -> list[EventMatch]:
    """The event's matches in the projects `ids` (the reader's; None: all, for an admin)."""
    stmt = sa.select(EventMatch).where(EventMatch.event_id == event_id).order_by(EventMatch.id)
    if ids is not None:
        stmt = stmt.where(EventMatch.project_id.in_(ids))
    return list(db.session.scalars(stmt))


#: where one rule's or one task's part of an event's error begins (`processing` writes them)
_PART = re.compile(r"(?:; |, )(?=rule \d+ \(|task #\d+ )")
_ABOUT = re.compile(r"^(?:rule (\d+) \(|task #(\d+) )")


def error_for(ids: list[int] | None, event: WebhookEvent, matches: list[EventMatch]) -> str | None:
    """The event's error as a reader of projects `ids` may see it: an admin (None) all of it,
    anyone else the parts about their projects' rules and tasks (other projects' rule names,
    task ids and template errors are theirs)."""
    if event.error is None or ids is None:
        return event.error
    rules = set(
        db.session.scalars(
            sa.select(Rule.id).where(Rule.project_id.in_(ids), Rule.source_id == event.source_id)
        )
    )
    tasks = {m.task_id for m in matches if m.task_id is not None}
    shown = []
    for part in _PART.split(event.error):
        about = _ABOUT.match(part)
        if about and (
            (about.group(1) and int(about.group(1)) in rules)
            or (about.group(2) and int(about.group(2)) in tasks)
        ):
            shown.append(part)
    return "; ".join(shown) or "failed for another project's rule or task"


def replay(event: WebhookEvent) -> WebhookEvent:
    result = processing.process_event(event.id, replay=True)  # commits its own transactions
    assert result is not None
    audit.record_now("webhook_event.replay", target_type="webhook_event", target_id=event.id)
    return result
