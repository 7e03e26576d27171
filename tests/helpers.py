"""Small assertions shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa


def assert_problem(resp: Any, status: int, code: str | None = None) -> dict:
    """The response is RFC 9457 problem+json with this status (and code)."""
    assert resp.status_code == status, (resp.status_code, resp.get_data(as_text=True))
    assert resp.mimetype == "application/problem+json", resp.mimetype
    body = resp.get_json()
    for key in ("type", "title", "status", "detail", "instance", "code", "request_id"):
        assert key in body, (key, body)
    assert body["status"] == status
    assert body["request_id"] == resp.headers["X-Request-ID"]
    if code is not None:
        assert body["code"] == code, body
    return body


def count(app: Any, model: Any) -> int:
    from app.database import db

    with app.app_context():
        return db.session.scalar(sa.select(sa.func.count()).select_from(model))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; fail with a clear message at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def at_once(app: Any, count: int, request: Callable[[Any, int], Any]) -> list[Any]:
    """`count` requests sent together from their own threads (each its own test client, so
    its own session and database transaction): their responses. `request(client, i)`."""
    import threading

    barrier, answers = threading.Barrier(count), [None] * count

    def send(i: int) -> None:
        client = app.test_client()
        barrier.wait()
        answers[i] = request(client, i)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers
