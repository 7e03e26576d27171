"""Project secrets at rest: Fernet (AES-128-CBC with HMAC-SHA256) under the keys of
`SWITCHBOARD_SECRETS_KEY`, newest first. MultiFernet decrypts with any of them and encrypts with
the first, so a new key is added in front, `switchboard secrets rotate` re-encrypts every value
with it, and the old key can then be dropped."""

from __future__ import annotations

import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from app.config import secrets_keys

__all__ = ["InvalidToken", "cipher"]


@functools.lru_cache(maxsize=4)
def cipher(raw_keys: str) -> MultiFernet:
    return MultiFernet([Fernet(k.encode()) for k in secrets_keys(raw_keys)])
