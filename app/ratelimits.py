"""Rate limits: Flask-Limiter with Redis storage, per principal and route group (read,
write), and the same count for the task fast path that answers before Flask."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from flask import Flask, current_app, g, request
from flask_limiter import ApplicationLimit, Limiter
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter, RateLimiter

from app.view_marks import is_webhook_receiver

log = logging.getLogger(__name__)
T = TypeVar("T")


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


#: what counts while Redis is away: this process's memory, as flask-limiter's own fallback does
_memory = MovingWindowRateLimiter(MemoryStorage())
#: after Redis failed, counts stay in memory this long before Redis is asked again
REDIS_RETRY_S = 2.0
_redis_away_until = 0.0


def counted(call: Callable[[RateLimiter], T]) -> T:
    """`call` made on the limiter's strategy (Redis), or on this process's memory while Redis
    is away: counting that is not the view's own (failed logins, the task fast path's writes)
    must not turn a Redis outage into 500s."""
    global _redis_away_until
    if time.monotonic() >= _redis_away_until:
        try:
            return call(limiter.limiter)
        except (redis.RedisError, OSError) as exc:
            if _redis_away_until == 0.0 or time.monotonic() - _redis_away_until > 60:
                log.warning("rate limit counts are kept in memory while Redis is away (%s)", exc)
            _redis_away_until = time.monotonic() + REDIS_RETRY_S
    return call(_memory)


def hit_write_limit(principal_key: str) -> tuple[int, int, int] | None:
    """Count one write against `principal_key`'s write limit exactly as the limiter's application
    limit does (same storage keys), for a path that answers before Flask: (limit, remaining,
    reset_at), or None when the limit is used up (the Flask view then answers the 429)."""
    from limits import parse

    item = parse(_write_limit())
    args = (RATE_LIMIT_PREFIX, principal_key, "write")

    def hit(strategy: RateLimiter) -> tuple[int, int, int] | None:
        if not strategy.hit(item, *args):
            return None
        reset, remaining = strategy.get_window_stats(item, *args)
        return item.amount, remaining, int(reset + 1)

    return counted(hit)


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
