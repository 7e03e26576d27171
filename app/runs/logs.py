"""A run's log: append-only byte chunks keyed by their starting offset.

The one rule for every writer (worker pool, REST append, machine WebSocket): appending bytes that
are already stored is a no-op, overlapping bytes are trimmed to what is new, and a gap is refused.
So any executor can resend after a reconnect, and readers page or resume by byte offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from app.database import db
from app.errors import Conflict
from app.runs.models import Run, RunLogChunk

#: largest page `read()` returns
MAX_READ = 1024 * 1024


class LogGap(Conflict):
    code = "log_gap"


@dataclass(frozen=True)
class Appended:
    offset: int
    data: bytes
    #: log size after the append
    size: int


def append(run: Run, offset: int, data: bytes) -> Appended | None:
    """Store `data` at `offset` in the current transaction. None when nothing was new."""
    size = run.log_size
    if offset > size:
        raise LogGap(
            f"Log offset {offset} leaves a gap: {size} bytes are stored.", expected_offset=size
        )
    end = offset + len(data)
    if end <= size:
        return None
    new = data[size - offset :]
    # Optimistic: only the writer that saw `size` may extend the log.
    moved = db.session.execute(
        sa.update(Run)
        .where(Run.id == run.id, Run.log_size == size)
        .values(log_size=size + len(new))
        .execution_options(synchronize_session=False)
    ).rowcount
    if moved != 1:
        db.session.refresh(run)
        return append(run, offset, data)
    db.session.add(RunLogChunk(run_id=run.id, offset=size, size=len(new), data=new))
    run.log_size = size + len(new)
    return Appended(size, new, size + len(new))


def _char_len(lead: int) -> int:
    """Bytes of the UTF-8 character starting with `lead` (1 for an invalid lead byte)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 1


def utf8_boundary(data: bytes) -> int:
    """Length of `data` without a multi-byte UTF-8 character cut at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        return len(data) if back >= _char_len(byte) else len(data) - back
    return len(data)


def read(run: Run, offset: int, limit: int) -> tuple[bytes, int]:
    """Bytes from `offset`, at most `limit` (or one whole character when `limit` is smaller
    than it), never ending inside a UTF-8 character. Returns the bytes and the next offset."""
    limit = max(1, min(limit, MAX_READ))
    end = min(run.log_size, offset + limit + 3)  # room to finish a character cut by `limit`
    if offset >= end:
        return b"", offset
    rows = db.session.execute(
        sa.select(RunLogChunk.offset, RunLogChunk.data)
        .where(
            RunLogChunk.run_id == run.id,
            RunLogChunk.offset < end,
            RunLogChunk.offset + RunLogChunk.size > offset,
        )
        .order_by(RunLogChunk.offset)
    ).all()
    buf = bytearray()
    for chunk_offset, chunk in rows:
        start = max(0, offset - chunk_offset)
        stop = min(len(chunk), end - chunk_offset)
        buf += chunk[start:stop]
    data = bytes(buf)
    page = data[:limit]
    if len(data) > limit:
        cut = utf8_boundary(page)
        # a page holding part of one character returns the whole character
        page = page[:cut] if cut > 0 else data[: _char_len(data[0])]
    return page, offset + len(page)
