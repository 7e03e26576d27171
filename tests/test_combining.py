"""`app.combining.Combiner`: what arrives during a write is written together next, every
submitter returns once its item was written, and a write that raises releases everyone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from app.combining import Combiner


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_items_arriving_during_a_write_are_written_together_next() -> None:
    batches: list[list[int]] = []
    first_started, release = threading.Event(), threading.Event()

    def write(batch: list[int]) -> None:
        if not batches:
            first_started.set()
            release.wait(5)
        batches.append(batch)

    combiner: Combiner[int] = Combiner(write, limit=3)
    returned: list[int] = []

    def submit(n: int) -> None:
        combiner.submit(n)
        returned.append(n)

    threads = [threading.Thread(target=submit, args=(0,))]
    threads[0].start()
    assert first_started.wait(5)
    for n in range(1, 6):  # five more queue up behind the first write
        threads.append(threading.Thread(target=submit, args=(n,)))
        threads[-1].start()
    wait_until(lambda: len(combiner._queue) == 6)
    assert returned == []  # nobody returns before its item is written
    release.set()
    for t in threads:
        t.join(5)
    assert batches[0] == [0]
    assert sorted(batches[1] + batches[2]) == [1, 2, 3, 4, 5]  # at most three at a time
    assert len(batches) == 3 and len(batches[1]) == 3
    assert sorted(returned) == list(range(6))
    assert (combiner.batches, combiner.items) == (3, 6)


def test_a_write_that_raises_releases_everyone_and_raises_in_its_writer_only() -> None:
    first_started, release = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def write(batch: list[str]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            first_started.set()
            release.wait(5)
            raise RuntimeError("the database went away")

    combiner: Combiner[str] = Combiner(write)
    errors: list[BaseException] = []

    def submit(item: str) -> None:
        try:
            combiner.submit(item)
        except RuntimeError as exc:
            errors.append(exc)

    leader = threading.Thread(target=submit, args=("a",))
    leader.start()
    assert first_started.wait(5)
    followers = [threading.Thread(target=submit, args=(x,)) for x in "bc"]
    for t in followers:
        t.start()
    wait_until(lambda: len(combiner._queue) == 3)
    release.set()
    for t in [leader, *followers]:
        t.join(5)
        assert not t.is_alive()
    assert [str(e) for e in errors] == ["the database went away"]
    assert calls == [["a"], ["b", "c"]]  # the next in line wrote what had queued up
    assert not combiner._queue


def test_alone_an_item_is_written_by_its_own_thread_at_once() -> None:
    seen: list[tuple[list[int], str]] = []
    combiner: Combiner[int] = Combiner(lambda b: seen.append((b, threading.current_thread().name)))
    combiner.submit(7)
    assert seen == [([7], threading.current_thread().name)]


@pytest.mark.parametrize("count", [50])
def test_many_threads_each_return_once_written(count: int) -> None:
    written: list[int] = []
    lock = threading.Lock()

    def write(batch: list[int]) -> None:
        time.sleep(0.001)
        with lock:
            written.extend(batch)

    combiner: Combiner[int] = Combiner(write)
    done: list[int] = []

    def submit(n: int) -> None:
        combiner.submit(n)
        assert n in written  # returned only after its own item was written
        done.append(n)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(done) == sorted(written) == list(range(count))
    assert combiner.items == count and combiner.batches <= count
