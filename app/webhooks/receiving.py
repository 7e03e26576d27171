"""Receiving a delivery: verify its signature, store it once per delivery id, acknowledge.

Receiving only verifies, stores and acknowledges; matching happens on the `events` queue
(`processing`). One drain job takes every `received` event in order, and a Redis flag keeps at
most one such job waiting, so a burst of deliveries costs one round trip to Redis each, not an
RQ job each. The maintenance sweep kicks the drain again for events left behind (Redis
restarted, a worker died)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

import sqlalchemy as sa
from flask import current_app

from app import input_bounds
from app.database import db, delete_in_batches
from app.errors import BadRequest, DomainError, NotFound, Unauthorized
from app.queues import get_queue, get_redis
from app.timeutil import naive_utc, utcnow
from app.webhooks import signatures
from app.webhooks.models import EventMatch, WebhookEvent, WebhookSource

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


def forget_source(name: str) -> None:
    """A source was created or deleted: this process reads it again."""
    _source_cache().pop(name, None)


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
            payload = input_bounds.loads(body)
            try:
                return payload, body.decode("utf-8")
            except UnicodeDecodeError:  # UTF-16/32 JSON: store it re-encoded
                return payload, None
        if mimetype == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8"), strict_parsing=False)
            if "payload" not in form:
                raise BadRequest("A form-encoded delivery needs a 'payload' field.")
            text = form["payload"][0]
            return input_bounds.loads(text), text
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
