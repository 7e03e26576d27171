"""The activity feed: services record what happened; the row commits with the change and is
published on Redis after the commit for live streams. Whoever else cares (outbound
subscriptions) hears of it on the event bus (`events.activity_recorded`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from app import events
from app.activity.models import Activity
from app.database import after_commit, db
from app.live import pubsub
from app.timeutil import rfc3339, utcnow


def as_dict(entry: Activity) -> dict[str, Any]:
    return message(entry.id, entry.project_id, entry.kind, entry.data, entry.created_at)


def message(
    id: int, project_id: int | None, kind: str, data: dict[str, Any], created_at: datetime
) -> dict[str, Any]:
    """An activity entry as streams and the API show it."""
    return {
        "id": id,
        "project_id": project_id,
        "kind": kind,
        "data": data,
        "created_at": rfc3339(created_at),
    }


def record(project_id: int | None, kind: str, data: dict[str, Any]) -> Activity:
    entry = Activity(project_id=project_id, kind=kind, data=data, created_at=utcnow())
    db.session.add(entry)
    events.activity_recorded.send(project_id=project_id, kind=kind, data=data)
    channel = pubsub.activity_channel()
    after_commit(lambda: pubsub.publish(channel, as_dict(entry)))  # the id exists by then
    return entry


def since(after_id: int, project_ids: list[int] | None, limit: int = 500) -> list[Activity]:
    stmt = sa.select(Activity).where(Activity.id > after_id)
    if project_ids is not None:
        stmt = stmt.where(Activity.project_id.in_(project_ids))
    return list(db.session.scalars(stmt.order_by(Activity.id).limit(limit)))


def latest_id() -> int:
    return db.session.scalar(sa.select(sa.func.max(Activity.id))) or 0
