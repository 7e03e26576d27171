"""The Redis names a run's terminal uses, and what web processes put in its inbox.

- the inbox (a list): keystrokes, resizes and notes for the run's events, in order; the run's
  executor pops them (`workers.terminal`). A list, not pub/sub: what is typed before the
  executor listens waits for it instead of being lost.
- the notice channel: who holds the keyboard, the terminal's new size; every socket attached to
  the run hears it.
- the state (a hash): the terminal's size, and the controller (with its own key, so that its
  expiry frees the keyboard of a web process that died).
"""

from __future__ import annotations

import json
from typing import Any

from app.live import pubsub
from app.queues import get_redis

#: an inbox nobody reads (the run has not started, or its executor died) is dropped after this
INBOX_TTL_S = 600
#: past this many unread items, input is refused: the agent is not reading
INBOX_MAX = 2048
#: item kinds: keystrokes (raw bytes follow), a resize, a note for the run's events
KEYS, RESIZE, NOTE = b"k", b"r", b"n"


def _base(run_id: int) -> str:
    return f"{pubsub.namespace()}:run:{run_id}:tty"


def inbox_key(run_id: int) -> str:
    return f"{_base(run_id)}:in"


def notice_channel(run_id: int) -> str:
    return f"{_base(run_id)}:notice"


def size_key(run_id: int) -> str:
    return f"{_base(run_id)}:size"


def controller_key(run_id: int) -> str:
    return f"{_base(run_id)}:controller"


def encode(kind: bytes, payload: bytes | dict[str, Any]) -> bytes:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return kind + body


def decode(item: bytes) -> tuple[bytes, Any]:
    kind, body = item[:1], item[1:]
    return kind, (body if kind == KEYS else json.loads(body))


def put(run_id: int, kind: bytes, payload: bytes | dict[str, Any]) -> bool:
    """Add to the run's inbox; False when too much waits unread (nothing is added then)."""
    key = inbox_key(run_id)
    client = get_redis()
    pipe = client.pipeline(transaction=False)
    pipe.rpush(key, encode(kind, payload))
    pipe.expire(key, INBOX_TTL_S)
    length = pipe.execute()[0]
    if length > INBOX_MAX:
        client.rpop(key)
        return False
    return True


def size(run_id: int, default: tuple[int, int]) -> tuple[int, int]:
    """(columns, rows) as the executor last set them."""
    raw = get_redis().hgetall(size_key(run_id))
    try:
        return int(raw[b"cols"]), int(raw[b"rows"])
    except (KeyError, ValueError):
        return default


def tell(run_id: int, notice: dict[str, Any]) -> None:
    pubsub.publish(notice_channel(run_id), notice)
