"""Marks a view carries, read by the request hooks and the rate limiter for the request at hand
(Flask only: the modules that read them import nothing else of the app)."""

from __future__ import annotations

from flask import current_app, request


def webhook_receiver(func):  # type: ignore[no-untyped-def]
    """Mark a view that takes deliveries from other systems: it reads its raw body itself (JSON
    or form-encoded), accepts `SWITCHBOARD_WEBHOOK_MAX_BODY_BYTES`, is not rate limited per
    principal (a sender has no principal; bad signatures count as auth failures instead), and its
    stored event is its audit trail."""
    func._webhook_receiver = True
    return func


def secret_body(func):  # type: ignore[no-untyped-def]
    """Mark a view whose request body is a secret: the request audit records that it was
    called, never what it was sent (a refused request included)."""
    func._secret_body = True
    return func


def view_flag(name: str) -> bool | None:
    """The mark `name` of the view answering this request (its method's or its class's); None
    when no view answers it (404/405)."""
    view = current_app.view_functions.get(request.endpoint or "")
    if view is None:
        return None
    view_class = getattr(view, "view_class", None)
    if view_class is None:
        return bool(getattr(view, name, False))
    method = getattr(view_class, request.method.lower(), None)
    if method is None and request.method == "HEAD":
        method = getattr(view_class, "get", None)
    if method is None:
        return None
    return bool(getattr(method, name, False) or getattr(view_class, name, False))


def has_secret_body() -> bool:
    return bool(view_flag("_secret_body"))


def is_webhook_receiver() -> bool:
    return bool(view_flag("_webhook_receiver"))
