"""The activity feed stream: replay from the `activities` table, then live from Redis."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from app.activity import service
from app.database import db
from app.live.hub import hub
from app.live.pubsub import activity_channel, user_channel
from app.live.sse import Event, ping_interval


def follow(
    after_id: int, project_ids: list[int] | None, user_id: int | None = None
) -> Iterator[Event | None]:
    """Activity the caller may see (`project_ids`; None: all), from `after_id` on; and, live,
    the notifications of `user_id` (`notification` events, without an id: they are not
    activity, and the inbox keeps them)."""
    allowed = None if project_ids is None else set(project_ids)
    sent: deque[int] = deque(maxlen=5000)
    last = after_id
    mine = user_channel(user_id) if user_id is not None else None
    sub = hub().subscribe([activity_channel(), *([mine] if mine else [])])
    try:
        while True:
            # replay (first, and whenever the live feed skipped an id)
            while True:
                rows = service.since(last, project_ids)
                for row in rows:
                    if row.id not in sent:
                        sent.append(row.id)
                        yield Event(row.kind, service.as_dict(row), str(row.id))
                    last = max(last, row.id)
                db.session.remove()
                if len(rows) < 500:
                    break
            ping = ping_interval()
            while True:
                msg = sub.get(timeout=ping)
                if msg is None:
                    yield None
                    continue
                if msg.get("channel") == mine:
                    yield Event("notification", {k: v for k, v in msg.items() if k != "channel"})
                    continue
                if allowed is not None and msg.get("project_id") not in allowed:
                    last = max(last, msg["id"]) if msg["id"] == last + 1 else last
                    continue
                if msg["id"] in sent:
                    continue
                if msg["id"] > last + 1:
                    break  # something between is missing (not visible to us, or late): replay
                sent.append(msg["id"])
                last = max(last, msg["id"])
                # the message is shared by every subscriber in this process: copy, never change
                data = {k: v for k, v in msg.items() if k != "channel"}
                yield Event(msg["kind"], data, str(msg["id"]))
    finally:
        sub.close()
