"""Who is told what, and how.

Notifications are made in the transaction of what they report, by listeners on the event bus
(`listeners`): one per event and user (a unique key), so a retried transaction or a repeated
event tells nobody twice. In-app they are the user's inbox. Email and chat go out from an RQ
job (`send`), never in a request: each channel is sent once (its time is kept before the job
ends), a chat post that fails makes the job retry, and past `SWITCHBOARD_NOTIFY_EMAILS_PER_HOUR`
a user's emails are folded into one digest line of the next email.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app
from rq import Retry

from app.database import after_commit, db
from app.errors import NotFound, ValidationFailed
from app.live import pubsub
from app.netguard import Refused
from app.notifications import mail
from app.notifications.models import CHANNELS, KINDS, Notification, NotificationSettings
from app.pagination import Page, paginate
from app.projects.models import ProjectMember
from app.projects.service import grants
from app.queues import get_queue
from app.subscriptions import outbound
from app.timeutil import utcnow
from app.users.models import User

#: what each kind goes to unless the user says otherwise (chat: when a chat URL is set)
DEFAULTS: dict[str, dict[str, bool]] = {
    kind: {"in_app": True, "email": True, "chat": True} for kind in KINDS
}


# -- making them ------------------------------------------------------------------------------


def notify(
    user_ids: list[int],
    kind: str,
    key: str,
    *,
    title: str,
    body: str,
    link: str | None,
    project_id: int | None,
    data: dict[str, Any],
) -> list[Notification]:
    """One notification per user for the event `key` (a user told already is skipped), in the
    caller's transaction; their email and chat are sent by a job after it commits."""
    if not user_ids:
        return []
    told = set(
        db.session.scalars(
            sa.select(Notification.user_id).where(
                Notification.key == key, Notification.user_id.in_(user_ids)
            )
        )
    )
    made = []
    for user_id in sorted(set(user_ids) - told):
        if (
            not _wants(user_id, kind, "in_app")
            and not _wants(user_id, kind, "email")
            and not (_wants(user_id, kind, "chat"))
        ):
            continue
        note = Notification(
            user_id=user_id,
            kind=kind,
            key=key[:200],
            title=title[:300],
            body=body,
            link=link,
            project_id=project_id,
            data=data,
            created_at=utcnow(),
        )
        db.session.add(note)
        made.append(note)
    if made:
        db.session.flush()
        ids = [n.id for n in made]
        after_commit(lambda: _enqueue(ids))
        for note in made:  # on the person's activity stream, live
            said = {"type": "notification", **_public(note)}
            channel = pubsub.user_channel(note.user_id)
            after_commit(lambda c=channel, m=said: pubsub.publish(c, m))
    return made


def _public(note: Notification) -> dict[str, Any]:
    return {
        "id": note.id,
        "kind": note.kind,
        "title": note.title,
        "link": note.link,
        "data": note.data,
    }


def _enqueue(ids: list[int]) -> None:
    queue = get_queue("events")
    for note_id in ids:
        queue.enqueue(
            "workers.jobs.send_notification",
            note_id,
            retry=Retry(max=3, interval=[10, 60, 300]),
            result_ttl=0,
            failure_ttl=24 * 3600,
            description=f"send notification {note_id}",
        )


def members(project_id: int, role: str) -> list[int]:
    """Active members of the project holding at least `role`."""
    rows = db.session.execute(
        sa.select(ProjectMember.user_id, ProjectMember.role)
        .join(User, User.id == ProjectMember.user_id)
        .where(ProjectMember.project_id == project_id, User.is_active.is_(True))
    ).all()
    return [user_id for user_id, have in rows if grants(have, role)]


def admins() -> list[int]:
    return list(
        db.session.scalars(sa.select(User.id).where(User.role == "admin", User.is_active.is_(True)))
    )


# -- settings ---------------------------------------------------------------------------------


def settings_of(user_id: int) -> NotificationSettings:
    found = db.session.get(NotificationSettings, user_id)
    return found if found is not None else NotificationSettings(user_id=user_id, channels={})


def effective(settings: NotificationSettings) -> dict[str, dict[str, bool]]:
    return {
        kind: {
            ch: bool((settings.channels or {}).get(kind, {}).get(ch, on)) for ch, on in d.items()
        }
        for kind, d in DEFAULTS.items()
    }


def _wants(user_id: int, kind: str, channel: str) -> bool:
    cache = db.session.info.setdefault("sb_notify_settings", {})
    if user_id not in cache:
        cache[user_id] = effective(settings_of(user_id))
    return cache[user_id][kind][channel]


def update_settings(user_id: int, data: dict[str, Any]) -> NotificationSettings:
    settings = db.session.get(NotificationSettings, user_id)
    if settings is None:
        settings = NotificationSettings(user_id=user_id, channels={})
        db.session.add(settings)
    if "channels" in data:
        channels: dict[str, dict[str, bool]] = {}
        for kind, wanted in (data["channels"] or {}).items():
            if kind not in KINDS or not isinstance(wanted, dict):
                raise ValidationFailed("Bad channels.", {"channels": [f"unknown kind {kind!r}"]})
            for channel, on in wanted.items():
                if channel not in CHANNELS or not isinstance(on, bool):
                    raise ValidationFailed(
                        "Bad channels.",
                        {
                            "channels": [
                                f"{kind}: {channel!r} must be one of "
                                f"{', '.join(CHANNELS)}, true or false"
                            ]
                        },
                    )
            channels[kind] = dict(wanted)
        settings.channels = channels
    if "chat_url" in data:
        url = data["chat_url"]
        if url:
            try:
                outbound.check_url(url, _allowed())
            except Refused as exc:
                raise ValidationFailed("Bad chat URL.", {"chat_url": [str(exc)]}) from None
        settings.chat_url = url or None
    db.session.info.pop("sb_notify_settings", None)
    db.session.commit()
    return settings


def _allowed() -> list[Any]:
    from app.config import allowed_networks

    return allowed_networks(current_app.config["SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS"])


# -- the inbox --------------------------------------------------------------------------------


def inbox(user_id: int, *, unread: bool, cursor: int | None, limit: int) -> Page[Notification]:
    stmt = sa.select(Notification).where(Notification.user_id == user_id)
    if unread:
        stmt = stmt.where(Notification.read_at.is_(None))
    return paginate(stmt, Notification.id, cursor=cursor, limit=limit)


def unread_count(user_id: int) -> int:
    return int(
        db.session.scalar(
            sa.select(sa.func.count())
            .select_from(Notification)
            .where(Notification.user_id == user_id, Notification.read_at.is_(None))
        )
        or 0
    )


def mark_read(user_id: int, note_id: int) -> Notification:
    note = db.session.get(Notification, note_id)
    if note is None or note.user_id != user_id:
        raise NotFound(f"No notification {note_id}.")
    if note.read_at is None:
        note.read_at = utcnow()
        db.session.commit()
    return note


def mark_all_read(user_id: int) -> int:
    done = db.session.execute(
        sa.update(Notification)
        .where(Notification.user_id == user_id, Notification.read_at.is_(None))
        .values(read_at=utcnow())
    ).rowcount
    db.session.commit()
    return int(done or 0)


# -- sending (the job) ------------------------------------------------------------------------


class ChatFailed(RuntimeError):
    """The chat post failed: the job is retried (the email is not sent again)."""


def send(note_id: int) -> str:
    """Email and chat for one notification, each once."""
    note = db.session.get(Notification, note_id)
    if note is None:
        return "gone"
    user = db.session.get(User, note.user_id)
    if user is None or not user.is_active:
        return "inactive"
    cfg = current_app.config
    results = []
    if note.emailed_at is None and not note.folded:
        results.append(_email(note, user, cfg))
    if note.chatted_at is None:
        results.append(_chat(note, cfg))
    return ",".join(r for r in results if r) or "nothing"


def _email(note: Notification, user: User, cfg: Any) -> str | None:
    if not (_wants(user.id, note.kind, "email") and user.email and cfg["SWITCHBOARD_SMTP_URL"]):
        return None
    hour_ago = utcnow() - timedelta(hours=1)
    sent = db.session.scalar(
        sa.select(sa.func.count())
        .select_from(Notification)
        .where(
            Notification.user_id == user.id,
            Notification.emailed_at >= hour_ago,
            Notification.folded.is_(False),
        )
    )
    if (sent or 0) >= cfg["SWITCHBOARD_NOTIFY_EMAILS_PER_HOUR"]:
        note.folded = True  # said in the digest line of the next email
        db.session.commit()
        return "folded"
    waiting = list(
        db.session.scalars(
            sa.select(Notification).where(
                Notification.user_id == user.id,
                Notification.folded.is_(True),
                Notification.emailed_at.is_(None),
            )
        )
    )
    body = f"{note.body}\n\n{_url(note, cfg)}"
    if waiting:
        body += (
            f"\n\nAnd {len(waiting)} more since your last emails (too many for one hour): "
            f"{cfg['SWITCHBOARD_PUBLIC_URL']}/api/v1/notifications?unread=true"
        )
    try:
        mail.send(
            cfg["SWITCHBOARD_SMTP_URL"],
            cfg["SWITCHBOARD_SMTP_FROM"],
            user.email,
            f"[Switchboard] {note.title}",
            body,
        )
    except Exception as exc:  # the server said no, or is away: the job retries
        note.send_error = f"email: {exc}"[:1000]
        db.session.commit()
        raise
    now = utcnow()
    note.emailed_at = now
    for folded in waiting:
        folded.emailed_at = now
    db.session.commit()
    return "emailed"


def _chat(note: Notification, cfg: Any) -> str | None:
    settings = settings_of(note.user_id)
    if not settings.chat_url or not _wants(note.user_id, note.kind, "chat"):
        return None
    text = f"*{note.title}*\n{note.body}\n{_url(note, cfg)}"
    import json

    result = outbound.post(
        settings.chat_url,
        json.dumps({"text": text}).encode(),
        {"Content-Type": "application/json", "User-Agent": "Switchboard"},
        timeout=cfg["SWITCHBOARD_WEBHOOK_TIMEOUT_S"],
        allowed=_allowed(),
    )
    if result.error is not None:
        note.send_error = f"chat: {result.error}"[:1000]
        db.session.commit()
        raise ChatFailed(result.error)
    note.chatted_at = utcnow()
    db.session.commit()
    return "chatted"


def _url(note: Notification, cfg: Any) -> str:
    return f"{cfg['SWITCHBOARD_PUBLIC_URL'].rstrip('/')}{note.link or '/api/v1/notifications'}"
