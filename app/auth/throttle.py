"""Counting authentication failures (per client IP and per account) with flask-limiter's storage
(this process's memory while Redis is away).

Failures, not attempts, are counted: a user who types the right password is never slowed down by
their own successful logins, while guessing is refused once the window's allowance is spent.
"""

from __future__ import annotations

import time

from flask import current_app
from limits import parse

from app.errors import TooManyRequests
from app.ratelimits import counted


def _item(setting: str):  # type: ignore[no-untyped-def]
    return parse(current_app.config[setting])


def _keys(ip: str | None, account: str | None) -> list[tuple[str, str]]:
    keys = []
    if ip:
        keys.append(("SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_IP", f"auth-fail:ip:{ip}"))
    if account:
        keys.append(("SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_USER", f"auth-fail:acct:{account}"))
    return keys


def check(ip: str | None, account: str | None = None) -> None:
    """Raise 429 when this IP or account has used up its failures."""
    if not current_app.config.get("RATELIMIT_ENABLED", True):
        return
    for setting, key in _keys(ip, account):
        item = _item(setting)
        reset = counted(
            lambda s, item=item, key=key: (
                None if s.test(item, key) else s.get_window_stats(item, key)[0]
            )
        )
        if reset is not None:
            raise TooManyRequests(
                "Too many failed authentication attempts; try again later.",
                retry_after=int(reset - time.time()),
            )


def failed(ip: str | None, account: str | None = None) -> None:
    if not current_app.config.get("RATELIMIT_ENABLED", True):
        return
    for setting, key in _keys(ip, account):
        item = _item(setting)
        counted(lambda s, item=item, key=key: s.hit(item, key))
