"""Rules: what turns a project's webhook events (type, action, a filter such as a label or an
`/agent` comment) into tasks, from a template rendered with the event's payload."""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa

from app.agents.registry import known_agents
from app.audit import service as audit
from app.auth.service import Principal
from app.database import db
from app.errors import Forbidden, NotFound, ValidationFailed
from app.pagination import Page, paginate
from app.projects import service as projects
from app.projects.models import Project
from app.tasks import limits
from app.tasks import service as tasks
from app.webhooks import matching, sources
from app.webhooks.models import Rule, WebhookSource

log = logging.getLogger(__name__)


def _check_rule(project: Project, data: dict[str, Any]) -> dict[str, Any]:
    """Resolve the source name and check it is granted to the project, then templates, agent
    and target; 422 on any problem."""
    errors: dict[str, list[str]] = {}
    values = dict(data)
    if "source" in data:
        source_id = db.session.scalar(
            sa.select(WebhookSource.id).where(WebhookSource.name == data["source"])
        )
        # one answer for a source that does not exist and one not granted: a member learns
        # nothing of the sources other projects use
        if source_id is None or not sources.is_granted(source_id, project.id):
            errors["source"] = [
                f"no webhook source {data['source']!r} is granted to project {project.key!r} "
                "(an administrator grants sources to projects)"
            ]
        values["source_id"] = source_id
        del values["source"]
    task = data.get("task")
    if task is not None:
        for field in ("title", "prompt"):
            problem = matching.check_template(task[field])
            if problem:
                errors[f"task.{field}"] = [f"template error: {problem}"]
        agent = task.get("agent")
        if agent and agent not in known_agents():
            errors["task.agent"] = [f"unknown agent {agent!r}"]
        target = task.get("target")
        wrong = limits.target_refusal(target) if target else None
        if wrong is not None:
            errors["task.target"] = [wrong]
        values["task"] = {k: v for k, v in task.items() if v is not None}
    if errors:
        raise ValidationFailed("The rule is not valid.", errors)
    return values


def _author_abilities(principal: Principal) -> list[str]:
    """A rule makes tasks in its author's name: the author must be able to make them, and the
    rule keeps the abilities it was saved with (a token's may be fewer than its user's)."""
    if not principal.can(tasks.CREATE_ABILITY):
        raise Forbidden(
            f"A rule makes tasks in your name: saving one needs the {tasks.CREATE_ABILITY} ability."
        )
    return sorted(principal.abilities)


def create_rule(principal: Principal, project: Project, data: dict[str, Any]) -> Rule:
    abilities = _author_abilities(principal)
    values = _check_rule(project, data)
    rule = Rule(
        project_id=project.id, author_id=principal.user.id, author_abilities=abilities, **values
    )
    db.session.add(rule)
    db.session.flush()
    audit.record(
        "rule.create",
        target_type="rule",
        target_id=rule.id,
        payload={"project": project.key, "name": rule.name, "event": rule.event},
    )
    db.session.commit()
    return rule


def rule_for(principal: Principal, rule_id: int, role: str = "viewer") -> Rule:
    rule = db.session.get(Rule, rule_id)
    if rule is None:
        raise NotFound(f"No rule {rule_id}.")
    try:
        projects.authorize(principal, db.session.get(Project, rule.project_id), role)
    except NotFound:
        raise NotFound(f"No rule {rule_id}.") from None
    return rule


def list_rules(project: Project, *, cursor: int | None, limit: int) -> Page[Rule]:
    stmt = sa.select(Rule).where(Rule.project_id == project.id)
    return paginate(stmt, Rule.id, cursor=cursor, limit=limit, newest_first=False)


def update_rule(principal: Principal, rule: Rule, changes: dict[str, Any]) -> Rule:
    abilities = _author_abilities(principal)
    project = db.session.get(Project, rule.project_id)
    assert project is not None
    values = _check_rule(project, changes)
    for key, value in values.items():
        setattr(rule, key, value)
    rule.author_id = principal.user.id  # whoever saves it last answers for its tasks
    rule.author_abilities = abilities
    audit.record(
        "rule.update", target_type="rule", target_id=rule.id, payload={"fields": sorted(changes)}
    )
    db.session.commit()
    return rule


def delete_rule(rule: Rule) -> None:
    db.session.delete(rule)
    audit.record("rule.delete", target_type="rule", target_id=rule.id)
    db.session.commit()
