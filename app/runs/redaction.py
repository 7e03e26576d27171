"""Masking a project's secret values in what its agent prints, before anything is stored or
streamed: the log, the events parsed from it, the error summary. No Flask: the machine client
masks the same way.

Output arrives in chunks, and a value may be split across two of them (an agent that prints a
token one character at a time): whatever the end of a chunk could be the beginning of a value
is held back until the next chunk shows whether it is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = b"***"


class Redactor:
    def __init__(self, values: Iterable[str]) -> None:
        needles = sorted({v.encode() for v in values if v}, key=len, reverse=True)
        self._needles = needles
        self._pattern = re.compile(b"|".join(re.escape(n) for n in needles)) if needles else None
        self._starts = frozenset(n[0] for n in needles)
        self._longest = len(needles[0]) if needles else 0
        self._hold = b""

    @classmethod
    def of(cls, values: Iterable[str]) -> Redactor | None:
        """None when there is nothing to mask (no cost at all per chunk)."""
        redactor = cls(values)
        return redactor if redactor._needles else None

    def feed(self, chunk: bytes) -> bytes:
        """What of the output so far can be passed on, masked."""
        assert self._pattern is not None
        data = self._pattern.sub(MASK, self._hold + chunk)
        keep = self._open_tail(data)
        self._hold = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        """The end of the output: what was held back was not a value after all."""
        out, self._hold = self._hold, b""
        return out

    def _open_tail(self, data: bytes) -> int:
        """The length of the longest end of `data` that begins some value."""
        start = max(0, len(data) - self._longest + 1)
        for i in range(start, len(data)):
            if data[i] in self._starts:
                tail = data[i:]
                if any(n.startswith(tail) for n in self._needles):
                    return len(data) - i
        return 0

    def mask_text(self, text: str) -> str:
        assert self._pattern is not None
        return self._pattern.sub(MASK, text.encode()).decode("utf-8", "replace")

    def mask_json(self, value: Any) -> Any:
        """Every string in a JSON value masked (events an agent reports over the API)."""
        if isinstance(value, str):
            return self.mask_text(value)
        if isinstance(value, list):
            return [self.mask_json(v) for v in value]
        if isinstance(value, dict):
            return {self.mask_text(k): self.mask_json(v) for k, v in value.items()}
        return value
