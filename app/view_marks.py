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


def view_flag(name: str) -> bool:
    view = current_app.view_functions.get(request.endpoint or "")
    cls = getattr(view, "view_class", None)
    method = getattr(cls, request.method.lower(), None) if cls else view
    return bool(getattr(method, name, False))


def has_secret_body() -> bool:
    return request.endpoint is not None and view_flag("_secret_body")


def is_webhook_receiver() -> bool:
    return request.endpoint is not None and view_flag("_webhook_receiver")
