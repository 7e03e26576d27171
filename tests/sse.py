"""Reading Server-Sent Events from a Flask test-client response or a socket."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Frame:
    event: str
    data: Any
    id: str | None
    comment: bool = False


def parse(block: bytes) -> Frame | None:
    event, data, ident, comment = "message", [], None, False
    for line in block.decode().split("\n"):
        if line.startswith(":"):
            comment = True
        elif line.startswith("id: "):
            ident = line[4:]
        elif line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line.startswith("retry: "):
            pass
    if not data:
        return Frame("comment", None, None, True) if comment else None
    return Frame(event, json.loads("\n".join(data)), ident)


class Reader:
    """Frames from a streaming test-client response (buffered=False)."""

    def __init__(self, resp: Any) -> None:
        self.resp = resp
        self.chunks = iter(resp.response)
        self.buf = b""

    def __iter__(self):
        while True:
            while b"\n\n" not in self.buf:
                try:
                    self.buf += next(self.chunks)
                except StopIteration:
                    return
            block, self.buf = self.buf.split(b"\n\n", 1)
            frame = parse(block)
            if frame is not None:
                yield frame

    def take(self, predicate, timeout: float = 20.0) -> list[Frame]:
        """Frames until one satisfies predicate (inclusive)."""
        out, deadline = [], time.monotonic() + timeout
        for frame in self:
            out.append(frame)
            if predicate(frame):
                return out
            assert time.monotonic() < deadline, "stream did not deliver in time"
        return out

    def close(self) -> None:
        self.resp.close()
