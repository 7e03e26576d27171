"""Webhook sources, receiving deliveries, the stored events and the rules that turn them into
tasks.

Receiving only verifies, stores and acknowledges; matching happens on the `events` queue. One
drain job takes every `received` event in order (`drain`), and a Redis flag keeps at most one such
job waiting, so a burst of deliveries costs one round trip to Redis each, not an RQ job each.
The maintenance sweep kicks the drain again for events left behind (Redis restarted, a worker
died), and claiming an event is a conditional update, so nothing is matched twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import sqlalchemy as sa
from flask import current_app
from jinja2 import TemplateError

from app import context
from app.agents.registry import known_agents
from app.audit import service as audit
from app.auth.abilities import abilities_for_role
from app.auth.service import Principal
from app.database import db, delete_in_batches
from app.errors import BadRequest, Conflict, DomainError, NotFound, Unauthorized, ValidationFailed
from app.pagination import Page, paginate
from app.projects import service as projects
from app.projects.models import Project
from app.queues import get_queue, get_redis
from app.tasks import limits
from app.tasks import service as tasks
from app.tasks.models import TASK_TERMINAL, Task
from app.timeutil import naive_utc, utcnow
from app.users.models import User
from app.webhooks import matching, signatures
from app.webhooks.models import TASK_SOURCE, EventMatch, Rule, WebhookEvent, WebhookSource

log = logging.getLogger(__name__)

#: (signature, event, delivery) headers per source kind
HEADERS = {
    "github": ("X-Hub-Signature-256", "X-GitHub-Event", "X-GitHub-Delivery"),
    "generic": (
        "X-Switchboard-Signature-256",
        "X-Switchboard-Event",
        "X-Switchboard-Delivery",
    ),
}
#: never stored with an event
SECRET_HEADERS = ("authorization", "cookie", "proxy-authorization", "x-api-key")
DRAIN_FLAG = "sb:events:drain-queued"
#: how long a receiving process trusts that it saw the drain flag set
FLAG_MEMO_SECONDS = 0.05
#: after Redis failed to answer, receivers stop asking it for this long
REDIS_BACKOFF_SECONDS = 5.0
#: how long a process trusts what it read of a source
SOURCE_CACHE_SECONDS = 5.0
#: received events older than this many sweep intervals are kicked again by the sweep (a
#: duplicate drain is harmless: claiming an event is a conditional update)
STALE_AFTER_SWEEPS = 2


class UnsupportedBody(DomainError):
    status, code = 415, "unsupported_media_type"


# --- sources ---------------------------------------------------------------------------------


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
    _source_cache().pop(source.name, None)
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
    _source_cache().pop(name, None)


# --- receiving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    id: int
    delivery_id: str
    event: str
    state: str
    duplicate: bool = False
    ping: bool = False


@dataclass(frozen=True)
class _Source:
    id: int
    name: str
    kind: str
    secret: str


def _source_cache() -> dict[str, tuple[float, _Source]]:
    return current_app.extensions.setdefault("switchboard_webhook_sources", {})


def _receiving_source(name: str) -> _Source | None:
    """The source by name, remembered for a few seconds: a burst of deliveries reads it once.
    Secrets never change in place, and a deleted source is forgotten here at once and by other
    processes within `SOURCE_CACHE_SECONDS`."""
    cache = _source_cache()
    hit = cache.get(name)
    now = time.monotonic()
    if hit is not None and now - hit[0] < SOURCE_CACHE_SECONDS:
        return hit[1]
    row = db.session.execute(
        sa.select(
            WebhookSource.id, WebhookSource.name, WebhookSource.kind, WebhookSource.secret
        ).where(WebhookSource.name == name)
    ).first()
    if row is None:
        cache.pop(name, None)
        return None
    source = _Source(*row)
    cache[name] = (now, source)
    return source


def _parse(body: bytes, mimetype: str) -> tuple[Any, str | None]:
    """The payload, and its JSON text when the body is that text already (stored as sent)."""
    try:
        if mimetype == "application/json" or mimetype.endswith("+json"):
            payload = json.loads(body)
            try:
                return payload, body.decode("utf-8")
            except UnicodeDecodeError:  # UTF-16/32 JSON: store it re-encoded
                return payload, None
        if mimetype == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8"), strict_parsing=False)
            if "payload" not in form:
                raise BadRequest("A form-encoded delivery needs a 'payload' field.")
            text = form["payload"][0]
            return json.loads(text), text
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"The delivery's body is not valid JSON: {exc}") from None
    raise UnsupportedBody(
        "Send 'application/json' or 'application/x-www-form-urlencoded' with a 'payload' field."
    )


def _stored_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name: value[:1000]
        for name, value in headers.items()
        if name.lower() not in SECRET_HEADERS and "signature" not in name.lower()
    }


_EVENT_COLUMNS = (
    "source_id",
    "source_name",
    "delivery_id",
    "event_type",
    "action",
    "headers",
    "payload",
    "state",
    "remote_addr",
    "received_at",
    "processed_at",
)
_JSON_COLUMNS = ("headers", "payload")


def _insert_sql(dialect: str) -> str:
    """The one statement of the hottest path, written out: through SQLAlchemy's Connection it
    cost half as much again as on the pooled DBAPI connection. The payload is bound as the JSON
    text that was sent, never parsed and encoded again."""
    if dialect == "postgresql":
        marks = [f"%({c})s::json" if c in _JSON_COLUMNS else f"%({c})s" for c in _EVENT_COLUMNS]
    else:
        marks = [f":{c}" for c in _EVENT_COLUMNS]
    return (
        f"INSERT INTO {WebhookEvent.__tablename__} ({', '.join(_EVENT_COLUMNS)}) "
        f"VALUES ({', '.join(marks)}) "
        "ON CONFLICT (source_name, delivery_id) DO NOTHING RETURNING id"
    )


_INSERT_SQL = {name: _insert_sql(name) for name in ("postgresql", "sqlite")}


def _db_time(value: datetime | None, dialect: str) -> Any:
    """What UTCDateTime stores: naive UTC (SQLite: SQLAlchemy's text format)."""
    if value is None:
        return None
    naive = naive_utc(value)
    return naive if dialect == "postgresql" else naive.strftime("%Y-%m-%d %H:%M:%S.%f")


def _insert_once(values: dict[str, Any]) -> int | None:
    """Store the event in its own short transaction: its id, or None for a redelivery."""
    dialect = db.engine.dialect.name
    params = dict(values)
    params["headers"] = json.dumps(values["headers"])
    for column in ("received_at", "processed_at"):
        params[column] = _db_time(values[column], dialect)
    conn = db.engine.raw_connection()  # pooled: checkout/checkin as for any other use
    try:
        cursor = conn.cursor()
        cursor.execute(_INSERT_SQL[dialect], params)
        row = cursor.fetchone()
        cursor.close()
        conn.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            conn.rollback()
        raise
    finally:
        conn.close()
    return row[0] if row else None


def receive(
    name: str,
    body: bytes,
    headers: Mapping[str, str],
    mimetype: str,
    remote_addr: str | None,
) -> Receipt:
    """Verify and store one delivery (once per delivery id). Nothing is stored unless the
    signature holds. The hot path of every webhook: one INSERT, one commit, one Redis SET."""
    source = _receiving_source(name)
    if source is None:
        raise NotFound(f"No webhook source {name!r}.")
    sig_header, event_header, delivery_header = HEADERS[source.kind]
    if not signatures.verify(source.secret, body, headers.get(sig_header)):
        raise Unauthorized(
            f"Missing or wrong {sig_header}: sign the raw body with HMAC-SHA256 and the "
            "source's secret.",
            code="bad_signature",
        )
    event_type = (headers.get(event_header) or "").strip()[:100]
    if not event_type:
        raise BadRequest(f"The {event_header} header is required.")
    payload, text = _parse(body, mimetype)
    delivery_id = (headers.get(delivery_header) or "").strip()[:200]
    if not delivery_id:  # no id from the sender: the same body is the same delivery
        delivery_id = "sha256:" + hashlib.sha256(body).hexdigest()
    action = payload.get("action") if isinstance(payload, dict) else None
    ping = event_type == "ping"
    state = "skipped" if ping else "received"
    now = utcnow()
    new_id = _insert_once(
        {
            "source_id": source.id,
            "source_name": source.name,
            "delivery_id": delivery_id,
            "event_type": event_type,
            "action": str(action)[:100] if action else None,
            "headers": _stored_headers(headers),
            "payload": text if text is not None else json.dumps(payload),
            "state": state,
            "remote_addr": remote_addr,
            "received_at": now,
            "processed_at": now if ping else None,
        }
    )
    if new_id is None:
        row = db.session.execute(
            sa.select(WebhookEvent.id, WebhookEvent.state).where(
                WebhookEvent.source_name == source.name, WebhookEvent.delivery_id == delivery_id
            )
        ).one()
        return Receipt(row.id, delivery_id, event_type, row.state, duplicate=True, ping=ping)
    if not ping:
        try:
            kick()
        except Exception:  # stored and acknowledged; the sweep kicks the drain later
            log.exception("could not queue the event drain; the sweep will")
    return Receipt(new_id, delivery_id, event_type, state, ping=ping)


def kick(force: bool = False) -> None:
    """Make sure one drain job is waiting on the `events` queue.

    A process that saw the flag set less than `FLAG_MEMO_SECONDS` ago skips asking Redis again
    (under load that is most deliveries). It stays safe because a drain job, after clearing the
    flag, waits longer than that before its last look at the table (`drain`)."""
    memo = current_app.extensions.setdefault("switchboard_drain_flag", [0.0])
    started = time.monotonic()
    if not force and started - memo[0] < FLAG_MEMO_SECONDS:
        return
    redis = get_redis()
    try:
        if force:
            redis.delete(DRAIN_FLAG)
        flagged = redis.set(DRAIN_FLAG, "1", nx=True, ex=600)
    except Exception:
        # Redis is away: do not make every delivery wait for it; the sweep kicks the drain
        # for whatever was stored meanwhile once Redis answers again. Counted from the failure:
        # the client's own retries may have taken longer than the backoff itself.
        memo[0] = time.monotonic() + REDIS_BACKOFF_SECONDS
        raise
    if not flagged:
        memo[0] = started  # it was there at some moment after `started`
        return
    try:
        get_queue("events").enqueue(
            "workers.jobs.drain_events",
            job_timeout=3600,
            result_ttl=0,
            failure_ttl=24 * 3600,
            description="match received webhook events",
        )
    except Exception:
        redis.delete(DRAIN_FLAG)
        raise
    memo[0] = started


def kick_stale() -> int:
    """For the sweep: received events nobody is matching (their kick was lost)."""
    after = timedelta(seconds=STALE_AFTER_SWEEPS * current_app.config["SWITCHBOARD_SWEEP_INTERVAL"])
    stale = db.session.scalar(
        sa.select(sa.func.count(WebhookEvent.id)).where(
            WebhookEvent.state == "received", WebhookEvent.received_at < utcnow() - after
        )
    )
    if stale:
        kick(force=True)
    return stale or 0


#: states an event no longer leaves (retention may delete it)
EVENT_FINISHED = ("skipped", "completed", "failed")


def prune(before: datetime) -> int:
    """Delete finished events received before `before` (their matches go with them; the tasks
    they made stay)."""
    finished = sa.select(WebhookEvent.id).where(
        WebhookEvent.received_at < before, WebhookEvent.state.in_(EVENT_FINISHED)
    )
    return delete_in_batches(finished, EventMatch.event_id, WebhookEvent.id)


# --- matching --------------------------------------------------------------------------------


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
    found: dict[int, list[Rule]] = {}
    for rule in db.session.scalars(
        sa.select(Rule)
        .where(Rule.source_id.in_(source_ids - {None}), Rule.enabled.is_(True))
        .order_by(Rule.id)
    ):
        found.setdefault(rule.source_id, []).append(rule)
    return found


def process_event(event_id: int, *, replay: bool = False) -> WebhookEvent | None:
    """Match one event against its source's rules: one task per matching rule, ever."""
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
        _match(event)
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


def _author(rule: Rule) -> Principal | None:
    user = db.session.get(User, rule.author_id) if rule.author_id else None
    if user is None or not user.is_active:
        return None
    return Principal(user=user, abilities=abilities_for_role(user.role), kind="rule")


def _match(event: WebhookEvent) -> None:
    rules = _rules_by_source({event.source_id}).get(event.source_id or 0, [])
    done = set(
        db.session.scalars(sa.select(EventMatch.rule_id).where(EventMatch.event_id == event.id))
    )
    matched_any, errors = bool(done), []
    for rule in rules:
        if rule.id in done:
            continue
        verdict = matching.evaluate(rule, event.event_type, event.action, event.payload)
        if not verdict.matched:
            continue
        matched_any = True
        try:
            _dispatch(event, rule, verdict.context)
        except TemplateError as exc:
            errors.append(f"rule {rule.id} ({rule.name}): template error: {exc}")
        except DomainError as exc:
            detail = exc.detail
            if exc.extra.get("errors"):
                detail += " " + json.dumps(exc.extra["errors"])
            errors.append(f"rule {rule.id} ({rule.name}): {detail}")
    event.processed_at = utcnow()
    if errors:
        event.state, event.error = "failed", "; ".join(errors)[:4000]
    elif matched_any:
        event.state, event.error = "dispatched", None
        _follow(event)
    else:
        event.state = "skipped"


def _dispatch(event: WebhookEvent, rule: Rule, extra: dict[str, Any]) -> None:
    spec = matching.render_task(
        rule.task,
        event_type=event.event_type,
        action=event.action,
        delivery_id=event.delivery_id,
        payload=event.payload,
        extra=extra,
    )
    principal = _author(rule)
    if principal is None:
        raise ValidationFailed("the rule's author is gone or disabled; save the rule again")
    project = db.session.get(Project, rule.project_id)
    assert project is not None
    spec.update(
        project=project.key, source=TASK_SOURCE, source_ref=f"event:{event.id}/rule:{rule.id}"
    )
    acting = replace(context.current(), user_id=principal.user.id, via=f"rule:{rule.id}")
    with context.acting_as(acting):
        task = tasks.build_task(principal, spec)
    db.session.add(
        EventMatch(event_id=event.id, rule_id=rule.id, project_id=project.id, task_id=task.id)
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


def replay(event: WebhookEvent) -> WebhookEvent:
    audit.record("webhook_event.replay", target_type="webhook_event", target_id=event.id)
    result = process_event(event.id, replay=True)
    assert result is not None
    return result


# --- events ----------------------------------------------------------------------------------


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
        stmt = stmt.where(
            sa.exists().where(
                EventMatch.event_id == WebhookEvent.id,
                EventMatch.project_id == Project.id,
                Project.key == project,
            )
        )
    return paginate(stmt, WebhookEvent.id, cursor=cursor, limit=limit)


def event_for(principal: Principal, event_id: int) -> WebhookEvent:
    event = db.session.scalar(
        _visible(principal, sa.select(WebhookEvent).where(WebhookEvent.id == event_id))
    )
    if event is None:
        raise NotFound(f"No event {event_id}.")
    return event


def event_matches(event_id: int) -> list[EventMatch]:
    return list(
        db.session.scalars(
            sa.select(EventMatch).where(EventMatch.event_id == event_id).order_by(EventMatch.id)
        )
    )


# --- rules -----------------------------------------------------------------------------------


def _check_rule(data: dict[str, Any]) -> dict[str, Any]:
    """Resolve the source name and check templates, agent and target; 422 on any problem."""
    errors: dict[str, list[str]] = {}
    values = dict(data)
    if "source" in data:
        source_id = db.session.scalar(
            sa.select(WebhookSource.id).where(WebhookSource.name == data["source"])
        )
        if source_id is None:
            errors["source"] = [f"no webhook source {data['source']!r}"]
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
        if target and target not in limits.TARGETS:
            errors["task.target"] = [f"one of {', '.join(limits.TARGETS)}"]
        values["task"] = {k: v for k, v in task.items() if v is not None}
    if errors:
        raise ValidationFailed("The rule is not valid.", errors)
    return values


def create_rule(principal: Principal, project: Project, data: dict[str, Any]) -> Rule:
    values = _check_rule(data)
    rule = Rule(project_id=project.id, author_id=principal.user.id, **values)
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
    values = _check_rule(changes)
    for key, value in values.items():
        setattr(rule, key, value)
    rule.author_id = principal.user.id  # whoever saves it last answers for its tasks
    audit.record(
        "rule.update", target_type="rule", target_id=rule.id, payload={"fields": sorted(changes)}
    )
    db.session.commit()
    return rule


def delete_rule(rule: Rule) -> None:
    db.session.delete(rule)
    audit.record("rule.delete", target_type="rule", target_id=rule.id)
    db.session.commit()


def source_names() -> dict[int, str]:
    return dict(db.session.execute(sa.select(WebhookSource.id, WebhookSource.name)).all())
