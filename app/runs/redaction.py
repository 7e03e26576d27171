"""Masking a project's secret values in what its agent prints, before anything is stored or
streamed: the log, the events parsed from it, the error summary. No Flask: the machine client
masks the same way.

Output arrives in chunks, and a value may be split across two of them (an agent that prints a
token one character at a time): whatever the end of a chunk could be the beginning of a value
is held back until the next chunk shows whether it is.

A terminal cannot wait for the next chunk: a typed character whose echo could begin a value
would show only with the next key. There, a held single byte is let go after a quiet moment
(`release`), and the rest of each value it begins is then masked wherever it is cut (held
until it is whole, never let go by time): at most one character of a value is ever shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = b"***"
#: a terminal's quiet moment: a held byte is shown after this long without output (`release`)
ECHO_RELEASE_S = 0.01


class Redactor:
    def __init__(self, values: Iterable[str]) -> None:
        needles = sorted({v.encode() for v in values if v}, key=len, reverse=True)
        self._needles = needles
        self._pattern = re.compile(b"|".join(re.escape(n) for n in needles)) if needles else None
        self._starts = frozenset(n[0] for n in needles)
        self._longest = len(needles[0]) if needles else 0
        self._hold = b""
        #: after a released byte: the rest of each value it began, masked if it follows
        self._rests: list[bytes] = []

    @classmethod
    def of(cls, values: Iterable[str]) -> Redactor | None:
        """None when there is nothing to mask (no cost at all per chunk)."""
        redactor = cls(values)
        return redactor if redactor._needles else None

    def feed(self, chunk: bytes) -> bytes:
        """What of the output so far can be passed on, masked."""
        assert self._pattern is not None
        data = self._hold + chunk
        if self._rests:
            masked = self._continue(data)
            if masked is None:
                self._hold = data
                return b""
            data = masked
        data = self._pattern.sub(MASK, data)
        keep = self._open_tail(data)
        self._hold = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        """The end of the output: what was held back was not a value after all."""
        out, self._hold, self._rests = self._hold, b"", []
        return out

    def release(self) -> bytes:
        """A terminal's quiet moment: a single held byte is let go (a typed character's echo);
        the values it may begin are masked from their second character on (`_continue`)."""
        if len(self._hold) != 1 or self._rests:
            return b""
        out, self._hold = self._hold, b""
        self._rests = [n[1:] for n in self._needles if n[:1] == out and len(n) > 1]
        return out

    def _continue(self, data: bytes) -> bytes | None:
        """`data` after a released byte: with the rest of a value it began masked; None while
        it could still become one (held, whatever the time)."""
        for rest in self._rests:
            if data.startswith(rest):
                self._rests = []
                return MASK + data[len(rest) :]
        if any(rest.startswith(data) for rest in self._rests):
            return None
        self._rests = []
        return data

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
