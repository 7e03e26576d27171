"""HMAC-SHA256 signatures as GitHub computes them (`sha256=<hex of HMAC(secret, raw body)>`), used
for inbound verification and for signing our outbound deliveries alike."""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def sign(secret: str, body: bytes) -> str:
    return PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """Constant-time comparison; a missing or malformed header is simply not valid."""
    if not header or not header.startswith(PREFIX):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())
