"""TOTP (RFC 6238) with pyotp: one step of clock drift either way, and no replay of a code."""

from __future__ import annotations

import hmac
from datetime import datetime

import pyotp

from app.timeutil import utcnow


def new_secret() -> str:
    return pyotp.random_base32()


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=issuer)


def accepted_step(
    secret: str, code: str, last_step: int | None, now: datetime | None = None
) -> int | None:
    """The time step `code` belongs to, or None when it is wrong or already used."""
    code = (code or "").strip().replace(" ", "")
    if not code.isdigit() or len(code) != 6:
        return None
    totp = pyotp.TOTP(secret)
    current = totp.timecode(now or utcnow())
    for step in (current - 1, current, current + 1):
        if hmac.compare_digest(totp.generate_otp(step), code):
            return step if last_step is None or step > last_step else None
    return None
