"""Token formats: access JWTs (PyJWT, HS256) and opaque secrets stored only as SHA-256 hashes.

Opaque tokens carry 256 bits of randomness, so a plain SHA-256 lookup is safe (no salt or slow
hash needed, unlike passwords) and keeps authentication one indexed query.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any

import jwt

from app.timeutil import utcnow

PAT_PREFIX = "sbp_"
REFRESH_PREFIX = "sbf_"
#: a run's token: `sbr_<run id>.<random>`, valid while that run is active (see `run_token`)
RUN_PREFIX = "sbr_"
ISSUER = "switchboard"


def new_opaque(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_run_token(run_id: int) -> str:
    """The run's id travels in the token, so checking it is a primary-key read."""
    return f"{RUN_PREFIX}{run_id}.{secrets.token_urlsafe(32)}"


def run_token_secret(token: str) -> str:
    """The part of a run's token that is secret (its prefix and run id are not): what output
    masking looks for, so that a typed `s` does not wait to be told apart from `sbr_`."""
    return token.rpartition(".")[2]


def run_token_id(token: str) -> int | None:
    """The run a token names (not yet that it is valid)."""
    head, dot, _ = token[len(RUN_PREFIX) :].partition(".")
    if not token.startswith(RUN_PREFIX) or not dot or not head.isdigit() or len(head) > 18:
        return None
    return int(head)


def encode_access(secret: str, user_id: int, family_id: str | None, ttl: int, **claims: Any) -> str:
    now = utcnow()
    payload = {
        "iss": ISSUER,
        "sub": str(user_id),
        "typ": "access",
        "fam": family_id,
        "jti": uuid.uuid4().hex,
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
        **claims,
    }
    return jwt.encode(payload, secret, algorithm="HS256")


def encode_stream(
    secret: str,
    user_id: int,
    path: str,
    abilities: list[str],
    ttl: int,
    pat_id: int | None = None,
    family_id: str | None = None,
) -> str:
    """A short-lived token for the streams under one path (EventSource cannot send headers);
    `pat_id` or `family_id`: the personal access token or the login that asked for it, which it
    must not outlive."""
    now = utcnow()
    payload = {
        "iss": ISSUER,
        "sub": str(user_id),
        "typ": "stream",
        "path": path,
        "abl": abilities,
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
        **({"pat": pat_id} if pat_id is not None else {}),
        **({"fam": family_id} if family_id is not None else {}),
    }
    return jwt.encode(payload, secret, algorithm="HS256")


def decode_stream(secret: str, token: str) -> dict[str, Any]:
    claims = jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        issuer=ISSUER,
        options={"require": ["exp", "sub", "typ", "path"]},
        leeway=2,
    )
    if claims.get("typ") != "stream":
        raise jwt.InvalidTokenError("not a stream token")
    return claims


ACCESS_LEEWAY = 5


def decode_access(secret: str, token: str) -> dict[str, Any]:
    """Raises jwt.InvalidTokenError (expired, bad signature, wrong type...).

    A client sends the same access token with every request until it expires, so a verified
    token's claims are kept (bounded): later requests check only its expiry, not the signature
    again. Callers must not change the claims they get."""
    claims = _verified_access(secret, token)
    if claims["exp"] + ACCESS_LEEWAY < time.time():
        raise jwt.ExpiredSignatureError("Signature has expired")
    return claims


@functools.lru_cache(maxsize=4096)
def _verified_access(secret: str, token: str) -> dict[str, Any]:
    claims = jwt.decode(
        token,
        secret,
        algorithms=["HS256"],
        issuer=ISSUER,
        options={"require": ["exp", "iat", "sub", "typ"]},
        leeway=ACCESS_LEEWAY,
    )
    if claims.get("typ") != "access":
        raise jwt.InvalidTokenError("not an access token")
    return claims
