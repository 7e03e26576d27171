"""Processing stored events: the drain job claims `received` events in order (a conditional
update, so nothing is matched twice), matches each against its projects' rules, and makes the
tasks the rules ask for; an event completes when all its tasks did."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import sqlalchemy as sa
from jinja2 import TemplateError

from app import context
from app.auth.abilities import abilities_for_role
from app.auth.service import Principal
from app.database import db
from app.errors import DomainError, NotFound, ValidationFailed
from app.projects.models import Project
from app.queues import get_redis
from app.tasks import service as tasks
from app.tasks.models import TASK_TERMINAL, Task
from app.timeutil import utcnow
from app.users.models import User
from app.webhooks import matching
from app.webhooks.models import TASK_SOURCE, EventMatch, Rule, SourceGrant, WebhookEvent
from app.webhooks.receiving import DRAIN_FLAG, FLAG_MEMO_SECONDS

log = logging.getLogger(__name__)


def drain(batch: int = 200, linger: float = 1.0, pause: float = 0.05) -> int:
    """Match every received event, oldest first; what the `events` queue's job does.

    Events that no rule could take (most of a busy organisation's traffic) are marked `skipped`
    a batch at a time; only events that some rule takes are processed one by one. The job
    stays `linger` seconds after the last event, so a steady stream of deliveries is matched
    in batches by one job instead of queueing a job each: while it runs, the Redis flag stays
    set and receivers queue nothing. It clears the flag only after finding nothing, then looks
    once more, so an event stored just before the flag went is never left behind."""
    done = 0
    idle_since: float | None = None
    while True:
        found = _drain_batch(batch)
        done += found
        if found:
            idle_since = None
            if found < batch:
                time.sleep(pause)  # let a few more arrive: bigger batches, fewer queries
            continue
        now = time.monotonic()
        idle_since = idle_since or now
        if now - idle_since < linger:
            time.sleep(pause * 2)
            continue
        get_redis().delete(DRAIN_FLAG)  # from here on, a new delivery queues another drain
        time.sleep(FLAG_MEMO_SECONDS * 2)  # receivers that skipped the flag have committed
        found = _drain_batch(batch)
        done += found
        if not found:
            return done
        if not get_redis().set(DRAIN_FLAG, "1", nx=True, ex=600):
            return done  # a receiver queued another drain, which takes the rest
        idle_since = None


def _drain_batch(batch: int) -> int:
    rows = db.session.execute(
        sa.select(
            WebhookEvent.id,
            WebhookEvent.source_id,
            WebhookEvent.event_type,
            WebhookEvent.action,
            WebhookEvent.payload,
        )
        .where(WebhookEvent.state == "received")
        .order_by(WebhookEvent.id)
        .limit(batch)
    ).all()
    if not rows:
        db.session.rollback()
        return 0
    rules = _rules_by_source({row.source_id for row in rows})
    unmatched = [
        row.id
        for row in rows
        if not any(
            matching.evaluate(rule, row.event_type, row.action, row.payload).matched
            for rule in rules.get(row.source_id, [])
        )
    ]
    if unmatched:
        db.session.execute(
            sa.update(WebhookEvent)
            .where(WebhookEvent.id.in_(unmatched), WebhookEvent.state == "received")
            .values(state="skipped", processed_at=utcnow())
        )
    db.session.commit()
    skipped = set(unmatched)
    for row in rows:
        if row.id not in skipped:
            process_event(row.id)
    return len(rows)


def _rules_by_source(source_ids: set[int | None]) -> dict[int, list[Rule]]:
    """The enabled rules of these sources whose projects the source is granted to (a rule
    whose grant was revoked stays, and matches nothing)."""
    found: dict[int, list[Rule]] = {}
    for rule in db.session.scalars(
        sa.select(Rule)
        .join(
            SourceGrant,
            sa.and_(
                SourceGrant.source_id == Rule.source_id, SourceGrant.project_id == Rule.project_id
            ),
        )
        .where(Rule.source_id.in_(source_ids - {None}), Rule.enabled.is_(True))
        .order_by(Rule.id)
    ):
        found.setdefault(rule.source_id, []).append(rule)
    return found


@dataclass
class _Plan:
    """A rule that takes the event, and the task its template rendered (or why it did not)."""

    rule_id: int
    name: str
    project_id: int
    author_id: int | None
    author_abilities: list[str] | None
    spec: dict[str, Any] | None = None
    error: str | None = None

    @classmethod
    def of(cls, rule: Rule, **outcome: Any) -> _Plan:
        return cls(
            rule.id, rule.name, rule.project_id, rule.author_id, rule.author_abilities, **outcome
        )


def _plan(event: WebhookEvent) -> tuple[list[_Plan], bool]:
    """The rules that take the event, their templates rendered: reads only, so no write lock is
    held while templates render (on SQLite one would stop every other writer). Also whether an
    earlier attempt matched some rule already."""
    rules = _rules_by_source({event.source_id}).get(event.source_id or 0, [])
    done = set(
        db.session.scalars(sa.select(EventMatch.rule_id).where(EventMatch.event_id == event.id))
    )
    plans = []
    for rule in rules:
        if rule.id in done:
            continue
        verdict = matching.evaluate(rule, event.event_type, event.action, event.payload)
        if not verdict.matched:
            continue
        try:
            spec = matching.render_task(
                rule.task,
                event_type=event.event_type,
                action=event.action,
                delivery_id=event.delivery_id,
                payload=event.payload,
                extra=verdict.context,
            )
        except TemplateError as exc:
            plans.append(_Plan.of(rule, error=f"template error: {exc}"))
            continue
        plans.append(_Plan.of(rule, spec=spec))
    return plans, bool(done)


def process_event(event_id: int, *, replay: bool = False) -> WebhookEvent | None:
    """Match one event against its source's rules: one task per matching rule, ever."""
    event = db.session.get(WebhookEvent, event_id, populate_existing=True)
    if event is None:
        raise NotFound(f"No event {event_id}.")
    if not replay and event.state != "received":
        db.session.rollback()
        return None
    try:
        plans, matched_before = _plan(event)
    finally:
        db.session.rollback()  # the read ends before anything is written
    if not replay:
        claim = db.session.execute(
            sa.update(WebhookEvent)
            .where(WebhookEvent.id == event_id, WebhookEvent.state == "received")
            .values(state="matched")
        )
        if claim.rowcount != 1:  # type: ignore[attr-defined]
            db.session.rollback()
            return None
    event = db.session.get(WebhookEvent, event_id, populate_existing=True)
    if event is None:
        raise NotFound(f"No event {event_id}.")
    try:
        _match(event, plans, matched_before)
        db.session.commit()
    except Exception as exc:
        log.exception("event %s: matching failed", event_id)
        db.session.rollback()
        db.session.execute(
            sa.update(WebhookEvent)
            .where(WebhookEvent.id == event_id)
            .values(state="failed", error=f"internal error: {exc}"[:2000], processed_at=utcnow())
        )
        db.session.commit()
    return db.session.get(WebhookEvent, event_id, populate_existing=True)


def _author(author_id: int | None, saved_with: list[str] | None) -> Principal | None:
    """The rule's author as its tasks' creator: the abilities the rule was saved with, never
    more than the author's role gives now (rules from before abilities were kept: the role's)."""
    user = db.session.get(User, author_id) if author_id else None
    if user is None or not user.is_active:
        return None
    abilities = abilities_for_role(user.role)
    if saved_with is not None:
        abilities &= frozenset(saved_with)
    return Principal(user=user, abilities=abilities, kind="rule")


def _match(event: WebhookEvent, plans: list[_Plan], matched_before: bool) -> None:
    done = set(
        db.session.scalars(sa.select(EventMatch.rule_id).where(EventMatch.event_id == event.id))
    )
    matched_any, errors = matched_before or bool(done), []
    for plan in plans:
        if plan.rule_id in done:
            continue  # a replay running at the same time made it
        matched_any = True
        if plan.error is not None:
            errors.append(f"rule {plan.rule_id} ({plan.name}): {plan.error}")
            continue
        try:
            _dispatch(event, plan)
        except DomainError as exc:
            detail = exc.detail
            if exc.extra.get("errors"):
                detail += " " + json.dumps(exc.extra["errors"])
            errors.append(f"rule {plan.rule_id} ({plan.name}): {detail}")
    event.processed_at = utcnow()
    if errors:
        event.state, event.error = "failed", "; ".join(errors)[:4000]
    elif matched_any:
        event.state, event.error = "dispatched", None
        _follow(event)
    else:
        event.state = "skipped"


def _dispatch(event: WebhookEvent, plan: _Plan) -> None:
    assert plan.spec is not None
    spec = plan.spec
    principal = _author(plan.author_id, plan.author_abilities)
    if principal is None:
        raise ValidationFailed("the rule's author is gone or disabled; save the rule again")
    if not principal.can(tasks.CREATE_ABILITY):
        raise ValidationFailed(
            f"the rule was saved without the {tasks.CREATE_ABILITY} ability; a maintainer who "
            "may start runs must save it again"
        )
    project = db.session.get(Project, plan.project_id)
    assert project is not None
    spec.update(
        project=project.key, source=TASK_SOURCE, source_ref=f"event:{event.id}/rule:{plan.rule_id}"
    )
    acting = replace(context.current(), user_id=principal.user.id, via=f"rule:{plan.rule_id}")
    with context.acting_as(acting):
        task = tasks.build_task(principal, spec)
    db.session.add(
        EventMatch(event_id=event.id, rule_id=plan.rule_id, project_id=project.id, task_id=task.id)
    )


def _follow(event: WebhookEvent) -> None:
    """A dispatched event completes when all its tasks completed, fails when one did not."""
    if event.state != "dispatched":
        return
    rows = db.session.execute(
        sa.select(Task.id, Task.status)
        .join(EventMatch, EventMatch.task_id == Task.id)
        .where(EventMatch.event_id == event.id)
    ).all()
    if not rows or any(status not in TASK_TERMINAL for _id, status in rows):
        return
    bad = [f"task #{task_id} {status}" for task_id, status in rows if status != "completed"]
    event.state = "failed" if bad else "completed"
    event.error = ", ".join(bad) or None


def task_finished(task: Task) -> None:
    """A task ended (`events.task_ended`): if a webhook's event made it, the event may now be
    complete."""
    if task.source != TASK_SOURCE:
        return
    event_id = db.session.scalar(
        sa.select(EventMatch.event_id).where(EventMatch.task_id == task.id)
    )
    if event_id is None:
        return
    event = db.session.get(WebhookEvent, event_id)
    if event is not None:
        _follow(event)
