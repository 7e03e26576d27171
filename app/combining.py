"""Combining: requests that arrive while another is being written are written together.

A thread that finds no write in progress writes its own request at once, as it would alone; the
requests that arrive meanwhile queue up, and when it is done the oldest of them writes all of them
in one go (flat combining, as databases group commits). Under load one round trip then carries
several requests, and every request still waits only for the write in progress and its own.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Combiner(Generic[T]):
    def __init__(self, write: Callable[[list[T]], None], limit: int = 32) -> None:
        """`write(batch)` writes the batch's items and reports on each (an item it could not
        write is its own thread's to retry). Should it raise, the exception reaches the thread
        that wrote, and the others return as if written: their items say they were not."""
        self._write = write
        self._limit = limit
        self._lock = threading.Lock()
        self._queue: deque[_Slot[T]] = deque()
        self.batches = 0  # written batches and items, for the tests
        self.items = 0

    def submit(self, item: T) -> None:
        """Return once `item` was written, by this thread or by the one ahead of it."""
        slot = _Slot(item, threading.Condition(self._lock))
        with self._lock:
            self._queue.append(slot)
            while not slot.done and self._queue[0] is not slot:
                slot.turn.wait()
            if slot.done:
                return
            batch = [self._queue[i] for i in range(min(len(self._queue), self._limit))]
        try:
            self._write([s.item for s in batch])
        finally:
            with self._lock:
                self.batches += 1
                self.items += len(batch)
                for s in batch:
                    self._queue.popleft()
                    s.done = True
                    s.turn.notify()
                if self._queue:  # the next one writes what queued up meanwhile
                    self._queue[0].turn.notify()


class _Slot(Generic[T]):
    __slots__ = ("done", "item", "turn")

    def __init__(self, item: T, turn: threading.Condition) -> None:
        self.item = item
        self.turn = turn
        self.done = False
