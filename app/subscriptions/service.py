"""Outbound subscriptions: a URL that receives signed JSON events (task created, statuses
changed, runs started and finished), with the events it wants and its secret. Their deliveries
are `deliveries`."""

from __future__ import annotations

import secrets
from typing import Any

import sqlalchemy as sa
from flask import current_app

from app.audit import service as audit
from app.auth.service import Principal
from app.config import allowed_networks
from app.database import db
from app.errors import NotFound, ValidationFailed
from app.pagination import Page, paginate
from app.projects.models import Project
from app.subscriptions import outbound
from app.subscriptions.models import EVENTS, Subscription


def _allowed() -> list[Any]:
    return allowed_networks(current_app.config["SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS"])


# --- subscriptions ---------------------------------------------------------------------------


def _check(data: dict[str, Any]) -> dict[str, Any]:
    errors: dict[str, list[str]] = {}
    values = dict(data)
    if "url" in data:
        try:
            outbound.check_url(data["url"], _allowed())
        except outbound.Refused as exc:
            errors["url"] = [str(exc)]
    if "events" in data:
        unknown = sorted(set(data["events"]) - {*EVENTS, "*"})
        if unknown or not data["events"]:
            errors["events"] = [f"one or more of {', '.join(EVENTS)} (or '*')"]
        values["events"] = sorted(set(data["events"]))
    if "project" in data:
        key = values.pop("project")
        values["project_id"] = None
        if key is not None:
            values["project_id"] = db.session.scalar(
                sa.select(Project.id).where(Project.key == key)
            )
            if values["project_id"] is None:
                errors["project"] = [f"no project {key!r}"]
    if errors:
        raise ValidationFailed("The subscription is not valid.", errors)
    return values


def create(principal: Principal, data: dict[str, Any]) -> tuple[Subscription, str]:
    """The subscription and its secret (generated when none is given), shown this once."""
    values = _check(data)
    values["secret"] = values.get("secret") or secrets.token_urlsafe(32)
    subscription = Subscription(created_by=principal.user.id, **values)
    db.session.add(subscription)
    db.session.flush()
    audit.record(
        "subscription.create",
        target_type="subscription",
        target_id=subscription.id,
        payload={"url": outbound.for_audit(subscription.url), "events": subscription.events},
    )
    db.session.commit()
    return subscription, values["secret"]


def get(subscription_id: int) -> Subscription:
    subscription = db.session.get(Subscription, subscription_id)
    if subscription is None:
        raise NotFound(f"No subscription {subscription_id}.")
    return subscription


def list_subscriptions(cursor: int | None, limit: int) -> Page[Subscription]:
    return paginate(sa.select(Subscription), Subscription.id, cursor=cursor, limit=limit)


def update(subscription: Subscription, changes: dict[str, Any]) -> Subscription:
    for key, value in _check(changes).items():
        setattr(subscription, key, value)
    audit.record(
        "subscription.update",
        target_type="subscription",
        target_id=subscription.id,
        payload={"fields": sorted(changes)},
    )
    db.session.commit()
    return subscription


def delete(subscription: Subscription) -> None:
    db.session.delete(subscription)
    audit.record("subscription.delete", target_type="subscription", target_id=subscription.id)
    db.session.commit()
