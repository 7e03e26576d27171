"""Rate limits: Flask-Limiter with Redis storage, per principal and route group (read,
write), and the same count for the task fast path that answers before Flask."""

from __future__ import annotations

from flask import Flask, current_app, g, request
from flask_limiter import ApplicationLimit, Limiter

from app.view_marks import is_webhook_receiver


def _principal_key() -> str:
    """Per principal once the request hooks authenticated one, else per client address."""
    principal = g.get("principal")
    if principal is not None:
        return principal_key(principal.user.id)
    return f"ip:{request.remote_addr}"


def principal_key(user_id: int) -> str:
    """The limits' key of a user (the task fast path counts its writes under it too)."""
    return f"user:{user_id}"


def _read_limit() -> str:
    return current_app.config["SWITCHBOARD_RATE_LIMIT_READ"]


def _write_limit() -> str:
    return current_app.config["SWITCHBOARD_RATE_LIMIT_WRITE"]


def _exempt_from_limits() -> bool:
    return is_webhook_receiver()


RATE_LIMIT_PREFIX = "sb-rl"
limiter = Limiter(
    _principal_key,
    application_limits=[
        ApplicationLimit(
            _read_limit, scope="read", methods=["GET", "HEAD"], exempt_when=_exempt_from_limits
        ),
        ApplicationLimit(
            _write_limit,
            scope="write",
            methods=["POST", "PUT", "PATCH", "DELETE"],
            exempt_when=_exempt_from_limits,
        ),
    ],
    # RateLimit-* headers are written by app.request_hooks (IETF names, reset in seconds)
    headers_enabled=False,
    strategy="moving-window",
    in_memory_fallback_enabled=True,
    swallow_errors=True,
    key_prefix=RATE_LIMIT_PREFIX,
)


def hit_write_limit(principal_key: str) -> tuple[int, int, int] | None:
    """Count one write against `principal_key`'s write limit exactly as the limiter's application
    limit does (same storage keys), for a path that answers before Flask: (limit, remaining,
    reset_at), or None when the limit is used up (the Flask view then answers the 429)."""
    from limits import parse

    item = parse(_write_limit())
    args = (RATE_LIMIT_PREFIX, principal_key, "write")
    if not limiter.limiter.hit(item, *args):
        return None
    reset, remaining = limiter.limiter.get_window_stats(item, *args)
    return item.amount, remaining, int(reset + 1)


def limiter_storage_uri(redis_url: str) -> str:
    """The `limits` library spells a Unix socket `redis+unix://`."""
    if redis_url.startswith("unix://"):
        return "redis+unix://" + redis_url[len("unix://") :]
    return redis_url


def init_app(app: Flask) -> None:
    app.config.setdefault(
        "RATELIMIT_STORAGE_URI", limiter_storage_uri(app.config["SWITCHBOARD_REDIS_URL"])
    )
    app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {"socket_connect_timeout": 2})
    limiter.init_app(app)
