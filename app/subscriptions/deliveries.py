"""Deliveries of subscription events.

Services record activity (task created, statuses changed); `fanout()` (listening on the event
bus) turns each entry into deliveries for the subscriptions that want it, in the same
transaction, and queues them after the commit. `deliver()` (an `events` queue job) sends one with
a timeout; a failure waits for the next step of `SWITCHBOARD_WEBHOOK_RETRY_SCHEDULE`, and when the
schedule is spent the delivery is a dead letter until someone redelivers it. The maintenance
sweep queues what is due, and frees deliveries held by a worker that died mid-send.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app import __version__
from app.audit import service as audit
from app.config import allowed_networks, retry_schedule
from app.database import after_commit, db, delete_in_batches
from app.errors import Conflict, NotFound
from app.pagination import Page, paginate
from app.projects import service as projects
from app.queues import get_queue
from app.runs.models import RUN_TERMINAL
from app.subscriptions import outbound
from app.subscriptions.models import Delivery, DeliveryAttempt, Subscription
from app.tasks.models import TASK_TERMINAL
from app.timeutil import rfc3339, utcnow
from app.webhooks.signatures import sign

#: a queued delivery job that has not run after this long is queued again by the sweep
REQUEUE_AFTER = timedelta(seconds=60)
_CACHE = "sb_subscriptions"


def _allowed() -> list[Any]:
    return allowed_networks(current_app.config["SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS"])


# --- fan-out ---------------------------------------------------------------------------------


def outbound_events(kind: str, data: dict[str, Any]) -> list[str]:
    """Which subscription events an activity entry is."""
    status = data.get("status")
    if kind == "task.created":
        return ["task.created"]
    if kind == "task.status":
        return ["task.status", *(["task.finished"] if status in TASK_TERMINAL else [])]
    if kind == "run.status":
        if status == "running":
            return ["run.started"]
        if status in RUN_TERMINAL:
            return ["run.finished"]
    if kind.startswith(("machine.", "question.")):
        return [kind]
    return []


def _active() -> list[tuple[int, list[str], int | None]]:
    """Active subscriptions, read once per transaction."""
    cached = db.session.info.get(_CACHE)
    if cached is None:
        # no autoflush: the rows being recorded have nothing to do with subscriptions, and
        # flushing them here would split the transaction's INSERTs into more statements
        with db.session.no_autoflush:
            cached = db.session.info[_CACHE] = list(
                db.session.execute(
                    sa.select(Subscription.id, Subscription.events, Subscription.project_id).where(
                        Subscription.active.is_(True)
                    )
                ).all()
            )
    return cached


@sa.event.listens_for(sa.orm.Session, "after_commit")
@sa.event.listens_for(sa.orm.Session, "after_rollback")
def _forget_active(session: sa.orm.Session) -> None:
    session.info.pop(_CACHE, None)


def fanout(project_id: int | None, kind: str, data: dict[str, Any]) -> int:
    """Queue deliveries of this activity for every subscription that wants it."""
    names = outbound_events(kind, data)
    if not names:
        return 0
    wanted = [
        (sub_id, name)
        for sub_id, events, sub_project in _active()
        if sub_project in (None, project_id)
        for name in names
        if name in events or "*" in events
    ]
    if not wanted:
        return 0
    key = projects.project_keys({project_id}).get(project_id) if project_id else None
    now = utcnow()
    deliveries = []
    for sub_id, name in wanted:
        guid = str(uuid.uuid4())
        body = {
            "event": name,
            "delivery": guid,
            "created_at": rfc3339(now),
            "project": key,
            "data": data,
        }
        delivery = Delivery(
            subscription_id=sub_id,
            guid=guid,
            event=name,
            body=body,
            state="pending",
            next_attempt_at=now,
            enqueued_at=now,
            created_at=now,
        )
        db.session.add(delivery)
        deliveries.append(delivery)
    after_commit(lambda: [enqueue(d.id) for d in deliveries])
    return len(deliveries)


def enqueue(delivery_id: int) -> None:
    timeout = current_app.config["SWITCHBOARD_WEBHOOK_TIMEOUT_S"]
    get_queue("events").enqueue(
        "workers.jobs.deliver",
        delivery_id,
        job_timeout=timeout + 30,
        result_ttl=0,
        failure_ttl=24 * 3600,
        description=f"delivery {delivery_id}",
    )


# --- delivering ------------------------------------------------------------------------------


def deliver(delivery_id: int) -> str:
    """One attempt at one delivery, if it is due and nobody else is sending it."""
    timeout = current_app.config["SWITCHBOARD_WEBHOOK_TIMEOUT_S"]
    now = utcnow()
    claim = db.session.execute(
        sa.update(Delivery)
        .where(
            Delivery.id == delivery_id,
            Delivery.state == "pending",
            Delivery.next_attempt_at <= now,
        )
        .values(state="delivering", locked_until=now + timedelta(seconds=timeout + 30))
    )
    if claim.rowcount != 1:  # type: ignore[attr-defined]
        db.session.rollback()
        return "not due"
    db.session.commit()
    delivery = db.session.get(Delivery, delivery_id, populate_existing=True)
    assert delivery is not None
    subscription = db.session.get(Subscription, delivery.subscription_id)
    if subscription is None or not subscription.active:
        delivery.state, delivery.last_error = "dead", "the subscription is inactive"
        db.session.commit()
        return delivery.state
    body = json.dumps(delivery.body, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"Switchboard-Hookshot/{__version__}",
        "X-Switchboard-Event": delivery.event,
        "X-Switchboard-Delivery": delivery.guid,
        "X-Switchboard-Signature-256": sign(subscription.secret, body),
    }
    url = subscription.url
    db.session.commit()  # hold no database connection while the target takes its time
    result = outbound.post(url, body, headers, timeout=timeout, allowed=_allowed())
    _record(delivery, result)
    db.session.commit()
    return delivery.state


def _record(delivery: Delivery, result: outbound.Result) -> None:
    now = utcnow()
    number = 1 + (
        db.session.scalar(
            sa.select(sa.func.max(DeliveryAttempt.number)).where(
                DeliveryAttempt.delivery_id == delivery.id
            )
        )
        or 0
    )
    db.session.add(
        DeliveryAttempt(
            delivery_id=delivery.id,
            number=number,
            status_code=result.status,
            error=result.error[:2000] if result.error else None,
            duration_ms=result.duration_ms,
            at=now,
        )
    )
    delivery.attempts += 1
    delivery.last_status, delivery.last_error = result.status, result.error
    delivery.locked_until = None
    if result.ok:
        delivery.state, delivery.delivered_at = "delivered", now
        return
    schedule = retry_schedule(current_app.config["SWITCHBOARD_WEBHOOK_RETRY_SCHEDULE"])
    if delivery.attempts > len(schedule):
        delivery.state = "dead"
        return
    delay = schedule[delivery.attempts - 1]
    delivery.state = "pending"
    delivery.next_attempt_at = now + timedelta(seconds=delay)
    if delay <= 0:  # due now: no need to wait for the sweep
        delivery.enqueued_at = now
        after_commit(lambda: enqueue(delivery.id))
    else:
        delivery.enqueued_at = None


def sweep() -> dict[str, int]:
    """Free deliveries held by a dead sender; queue every due delivery whose job is not queued."""
    now = utcnow()
    freed = db.session.execute(
        sa.update(Delivery)
        .where(Delivery.state == "delivering", Delivery.locked_until < now)
        .values(state="pending", locked_until=None, enqueued_at=None)
    ).rowcount  # type: ignore[attr-defined]
    due = list(
        db.session.scalars(
            sa.select(Delivery.id)
            .where(
                Delivery.state == "pending",
                Delivery.next_attempt_at <= now,
                sa.or_(Delivery.enqueued_at.is_(None), Delivery.enqueued_at < now - REQUEUE_AFTER),
            )
            .order_by(Delivery.next_attempt_at)
            .limit(500)
        )
    )
    if due:
        db.session.execute(sa.update(Delivery).where(Delivery.id.in_(due)).values(enqueued_at=now))
        after_commit(lambda: [enqueue(i) for i in due])
    return {"deliveries_freed": freed, "deliveries_queued": len(due)}


def prune(before: datetime) -> int:
    """Delete delivered and dead deliveries created before `before`, with their attempts."""
    finished = sa.select(Delivery.id).where(
        Delivery.created_at < before, Delivery.state.in_(("delivered", "dead"))
    )
    return delete_in_batches(finished, DeliveryAttempt.delivery_id, Delivery.id)


def redeliver(delivery: Delivery) -> Delivery:
    """A dead letter (or a delivered one) goes out again, with a fresh retry schedule."""
    if delivery.state in ("pending", "delivering"):
        raise Conflict(f"Delivery {delivery.id} is {delivery.state} already.")
    now = utcnow()
    delivery.state, delivery.attempts = "pending", 0
    delivery.next_attempt_at = delivery.enqueued_at = now
    audit.record("delivery.redeliver", target_type="delivery", target_id=delivery.id)
    db.session.commit()
    enqueue(delivery.id)
    return delivery


def get_delivery(delivery_id: int) -> Delivery:
    delivery = db.session.get(Delivery, delivery_id)
    if delivery is None:
        raise NotFound(f"No delivery {delivery_id}.")
    return delivery


def list_deliveries(subscription: Subscription, cursor: int | None, limit: int) -> Page[Delivery]:
    stmt = sa.select(Delivery).where(Delivery.subscription_id == subscription.id)
    return paginate(stmt, Delivery.id, cursor=cursor, limit=limit)


def attempts_of(delivery_ids: list[int]) -> dict[int, list[DeliveryAttempt]]:
    found: dict[int, list[DeliveryAttempt]] = {i: [] for i in delivery_ids}
    if delivery_ids:
        for attempt in db.session.scalars(
            sa.select(DeliveryAttempt)
            .where(DeliveryAttempt.delivery_id.in_(delivery_ids))
            .order_by(DeliveryAttempt.number)
        ):
            found[attempt.delivery_id].append(attempt)
    return found
