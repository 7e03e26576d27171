"""Whole lines out of an agent's output chunks, for its parser (no Flask: executors use it).

Output arrives in chunks that cut lines anywhere. What follows the last newline is kept until
the next chunk; kept in a bytearray, so an agent printing megabytes without a newline costs a
copy of each chunk, not of everything so far with each chunk. A line longer than `MAX_LINE` is
not parsed at all (it is in the log all the same): no agent's event is that long, and holding
it would let an agent hold the executor's memory.
"""

from __future__ import annotations

#: the longest line handed to a parser (a stream-json line with a large tool result fits)
MAX_LINE = 8 * 1024 * 1024


class Lines:
    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self.partial = bytearray()
        #: the line being kept grew past the limit: the rest of it is dropped up to its newline
        self.overlong = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines `chunk` completes (without their newline)."""
        if b"\n" not in chunk:
            self._keep(chunk)
            return []
        head, *rest = chunk.split(b"\n")
        tail = rest.pop()
        lines = [] if self.overlong else [bytes(self.partial + head)]
        self.overlong = False
        self.partial = bytearray()
        lines += rest
        self._keep(tail)
        return lines

    def rest(self) -> bytes:
        """The unfinished last line, at the end of the output (and forgotten)."""
        rest = b"" if self.overlong else bytes(self.partial)
        self.partial, self.overlong = bytearray(), False
        return rest

    def _keep(self, data: bytes) -> None:
        if self.overlong:
            return
        self.partial += data
        if len(self.partial) > self.limit:
            self.partial, self.overlong = bytearray(), True
