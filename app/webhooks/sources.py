"""Webhook sources: the senders Switchboard accepts deliveries from, each with its kind (GitHub or
generic) and its signing secret (shown once, stored to verify signatures), and the projects an
administrator granted it to (only those may attach rules to it, and so see its deliveries)."""

from __future__ import annotations

import logging
import secrets
from typing import Any

import sqlalchemy as sa

from app.audit import service as audit
from app.auth.service import Principal
from app.database import db
from app.errors import Conflict, NotFound
from app.projects.models import Project
from app.webhooks import receiving
from app.webhooks.models import Rule, SourceGrant, WebhookSource

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


def grants(source: WebhookSource) -> list[tuple[SourceGrant, str]]:
    """The source's grants with their projects' keys, by key."""
    return [
        (grant, key)
        for grant, key in db.session.execute(
            sa.select(SourceGrant, Project.key)
            .join(Project, Project.id == SourceGrant.project_id)
            .where(SourceGrant.source_id == source.id)
            .order_by(Project.key)
        ).all()
    ]


def is_granted(source_id: int, project_id: int) -> bool:
    return (
        db.session.scalar(
            sa.select(SourceGrant.source_id).where(
                SourceGrant.source_id == source_id, SourceGrant.project_id == project_id
            )
        )
        is not None
    )


def grant(
    principal: Principal, source: WebhookSource, project: Project
) -> tuple[SourceGrant, bool]:
    """Grant the source to the project; whether the grant is new (granting twice is harmless)."""
    found = db.session.get(SourceGrant, (source.id, project.id))
    if found is not None:
        return found, False
    found = SourceGrant(source_id=source.id, project_id=project.id, granted_by=principal.user.id)
    db.session.add(found)
    audit.record(
        "webhook_source.grant",
        target_type="webhook_source",
        target_id=source.name,
        payload={"project": project.key},
    )
    db.session.commit()
    return found, True


def revoke(source: WebhookSource, project: Project) -> None:
    """The project's rules on the source stop matching (they are kept, and say why)."""
    found = db.session.get(SourceGrant, (source.id, project.id))
    if found is None:
        raise NotFound(f"Source {source.name!r} is not granted to project {project.key!r}.")
    db.session.delete(found)
    audit.record(
        "webhook_source.revoke",
        target_type="webhook_source",
        target_id=source.name,
        payload={"project": project.key},
    )
    db.session.commit()


def granted_sources(project: Project) -> list[WebhookSource]:
    return list(
        db.session.scalars(
            sa.select(WebhookSource)
            .join(SourceGrant, SourceGrant.source_id == WebhookSource.id)
            .where(SourceGrant.project_id == project.id)
            .order_by(WebhookSource.name)
        )
    )
