"""Waiting without polling: a read that answers when the resource changes (long-poll), and ETags
with `304 Not Modified` for reads that did not change.

`GET /api/v1/runs/{id}?wait=30` (and tasks) answers at once when the resource already differs
from what the client has — its `?status=`, or the `If-None-Match` ETag of its last copy — and
otherwise as soon as a change is announced on Redis (the same messages that drive the live
streams), or with the current state when the wait is over. While it waits the request holds no
database connection: one process's single Redis listener (`live.hub`) wakes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import marshmallow as ma
from flask import request
from werkzeug.http import generate_etag

from app.database import db
from app.extensions import QuerySchema
from app.live.hub import Overflow, hub

T = TypeVar("T")
#: the longest a read may wait, in seconds (proxies commonly cut idle requests at 60 s)
MAX_WAIT_S = 55


class WaitQuerySchema(QuerySchema):
    wait = ma.fields.Float(
        load_default=0,
        validate=ma.validate.Range(0, MAX_WAIT_S),
        metadata={
            "description": "seconds to wait for a change before answering (long-poll); the "
            "answer comes at once when the resource differs from `status` or from the "
            "`If-None-Match` ETag"
        },
    )
    status = ma.fields.Str(
        load_default=None,
        metadata={"description": "with `wait`: the status the client has; any other answers"},
    )


def etag_of(data: Any) -> str:
    """The ETag of a representation (the dumped schema, as JSON with sorted keys)."""
    return generate_etag(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())


def conditional(view: Callable[..., Any]) -> Callable[..., Any]:
    """Give a JSON read its ETag, and answer `304 Not Modified` when the client's
    `If-None-Match` names it (Werkzeug's conditional response)."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        resp = view(*args, **kwargs)
        if resp.status_code == 200 and resp.is_json:
            resp.set_etag(etag_of(resp.get_json()).strip('"'))
            resp = resp.make_conditional(request)
        return resp

    return wrapper


def wait_for_change(
    load: Callable[[], T],
    dump: Callable[[T], dict[str, Any]],
    channel: Callable[[T], str],
    concerns: Callable[[dict[str, Any]], bool],
    args: dict[str, Any],
) -> T:
    """`load()` once the resource differs from what the client has (`args["status"]`, else
    the `If-None-Match` ETag, else the state first read), or when `args["wait"]` seconds have
    passed. `channel(resource)`: where its changes are announced; `concerns(message)`: whether
    a message there is about it."""
    current = load()
    seconds = args.get("wait") or 0
    if seconds <= 0:
        return current
    have_status = args.get("status")
    have_tag = request.if_none_match
    first = dump(current)

    def differs(data: dict[str, Any]) -> bool:
        if have_status is not None:
            return data.get("status") != have_status
        if have_tag:
            return not have_tag.contains_weak(etag_of(data).strip('"'))
        return data.get("status") != first.get("status")

    if differs(first):
        return current
    subscription = hub().subscribe([channel(current)])
    try:
        db.session.remove()  # a fresh read, not the session's copy of the row
        current = load()  # what changed while the subscription was being made
        deadline = time.monotonic() + seconds
        while not differs(dump(current)):
            db.session.remove()  # no database connection while waiting
            left = deadline - time.monotonic()
            if left <= 0:
                return load()
            try:
                message = subscription.get(timeout=left)
            except Overflow:  # Redis went away: answer with what is stored now
                return load()
            if message is not None and concerns(message):
                current = load()
        return current
    finally:
        subscription.close()
