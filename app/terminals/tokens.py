"""Terminal tokens: a browser cannot send headers on a WebSocket, so it asks for one of these
with its own credential first and puts it in the socket's URL.

A token is a random value kept in Redis under its digest for `TTL_S` seconds, with who asked,
for which run and mode; attaching takes it out (GETDEL), so it works once.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from app.auth import tokens
from app.auth.service import Principal
from app.live import pubsub
from app.queues import get_redis
from app.timeutil import utcnow

TTL_S = 60
PREFIX = "sbt_"


@dataclass(frozen=True)
class Grant:
    """What a token allows: one attach to `run_id` in `mode`, as its user with these abilities
    (never more than the credential that asked for it)."""

    user_id: int
    run_id: int
    mode: str
    abilities: tuple[str, ...]
    token_id: int | None = None
    family_id: str | None = None


def _key(token: str) -> str:
    return f"{pubsub.namespace()}:terminal-token:{tokens.digest(token)}"


def issue(principal: Principal, run_id: int, mode: str) -> tuple[str, datetime]:
    token = PREFIX + secrets.token_urlsafe(32)
    grant = Grant(
        user_id=principal.user.id,
        run_id=run_id,
        mode=mode,
        abilities=tuple(sorted(principal.abilities)),
        token_id=principal.token_id,
        family_id=principal.family_id,
    )
    get_redis().set(_key(token), json.dumps(asdict(grant)), ex=TTL_S)
    return token, utcnow() + timedelta(seconds=TTL_S)


def redeem(token: str) -> Grant | None:
    """The token's grant, once: None when it is unknown, expired or used already."""
    if not token.startswith(PREFIX) or len(token) > 100:
        return None
    raw = get_redis().getdel(_key(token))
    if raw is None:
        return None
    data = json.loads(raw)
    return Grant(**{**data, "abilities": tuple(data["abilities"])})
