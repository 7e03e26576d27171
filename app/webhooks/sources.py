"""Webhook sources: the senders Switchboard accepts deliveries from, each with its kind (GitHub or
generic) and its signing secret (shown once, stored to verify signatures)."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import sqlalchemy as sa

from app.audit import service as audit
from app.auth.service import Principal
from app.database import db
from app.errors import Conflict, NotFound
from app.webhooks import receiving
from app.webhooks.models import Rule, WebhookSource

log = logging.getLogger(__name__)


def list_sources() -> list[WebhookSource]:
    return list(db.session.scalars(sa.select(WebhookSource).order_by(WebhookSource.name)))


def get_source(name: str) -> WebhookSource:
    source = db.session.scalar(sa.select(WebhookSource).where(WebhookSource.name == name))
    if source is None:
        raise NotFound(f"No webhook source {name!r}.")
    return source


def create_source(principal: Principal, data: dict[str, Any]) -> tuple[WebhookSource, str]:
    """The new source and its secret (generated when none is given), shown this once."""
    if db.session.scalar(sa.select(WebhookSource.id).where(WebhookSource.name == data["name"])):
        raise Conflict(f"A webhook source named {data['name']!r} exists.")
    secret = data.get("secret") or secrets.token_urlsafe(32)
    source = WebhookSource(
        name=data["name"], kind=data["kind"], secret=secret, created_by=principal.user.id
    )
    db.session.add(source)
    db.session.flush()
    receiving.forget_source(source.name)
    audit.record(
        "webhook_source.create",
        target_type="webhook_source",
        target_id=source.name,
        payload={"kind": source.kind},
    )
    db.session.commit()
    return source, secret


def delete_source(name: str) -> None:
    source = get_source(name)
    used = db.session.scalar(sa.select(sa.func.count(Rule.id)).where(Rule.source_id == source.id))
    if used:
        raise Conflict(f"{used} rule(s) use source {name!r}; delete or change them first.")
    db.session.delete(source)
    audit.record("webhook_source.delete", target_type="webhook_source", target_id=name)
    db.session.commit()
    receiving.forget_source(name)


def source_names() -> dict[int, str]:
    return dict(db.session.execute(sa.select(WebhookSource.id, WebhookSource.name)).all())
