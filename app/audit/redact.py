"""Secrets never reach the audit trail: values under sensitive keys are replaced, recursively."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "[redacted]"
SENSITIVE_KEY = re.compile(
    r"pass(word)?|secret|token|(^|_)code$|^code|otp|authori[sz]ation|api[_-]?key|cookie|"
    r"private|credential|signature",
    re.IGNORECASE,
)
#: values that look like our own credentials are hidden whatever key they sit under
SENSITIVE_VALUE = re.compile(r"^(sbp_|sbr_|sbf_)|^eyJ[\w-]+\.[\w-]+\.")


#: the user and password of a URL (`https://user:token@host/…`)
URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def redact(value: Any, _depth: int = 0) -> Any:
    if _depth > 20:
        return REDACTED
    if isinstance(value, dict):
        return {
            k: (REDACTED if SENSITIVE_KEY.search(str(k)) else redact(v, _depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, _depth + 1) for v in value]
    if isinstance(value, str):
        if SENSITIVE_VALUE.search(value):
            return REDACTED
        return URL_USERINFO.sub(rf"\1{REDACTED}@", value)
    return value
