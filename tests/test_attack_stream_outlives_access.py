"""Security issue, item 6: a live stream ends when its access does. A stream opened while a user
could read a project kept delivering it after the user was removed, deactivated or logged out;
now each change is announced, every stream of that user checks its credential and resource
again, and ends with a `closed` event when either is gone (what is still allowed goes on)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from helpers import account, login
from servers import LiveServer
from sse import Reader
from test_execution import create, wait_status
from test_live_streams import _frames, _stream


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _later(app, action: Callable[[object], None], delay: float = 0.3) -> dict[str, float]:
    """Run `action(client)` from another thread while the test reads the stream (the stream's
    thread is then asleep, waiting for Redis: the change must wake it)."""
    done: dict[str, float] = {}

    def run() -> None:
        time.sleep(delay)
        done["at"] = time.monotonic()  # the change begins (its request commits, then announces)
        with app.test_client() as other:
            action(other)

    threading.Thread(target=run, daemon=True).start()
    return done


def _closed_after(reader: Reader, done: dict[str, float]) -> float:
    frames = reader.take(lambda f: f.event in ("closed", "task.created"), timeout=10)
    last = frames[-1]
    assert last.event == "closed", [f.event for f in frames]
    assert last.data["reason"] == "access_ended"
    assert list(reader) == []  # and the stream is over
    return time.monotonic() - done["at"]


@pytest.fixture
def bob(app, client, member, project):
    bob = account(app, client, "bob")
    resp = client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": bob.username, "role": "developer"},
    )
    assert resp.status_code == 201, resp.get_json()
    return bob


def _ends(admin, member, bob, pat):  # how access ends → the change, made by someone
    return {
        "removed from the project": lambda c: c.delete(
            f"/api/v1/projects/demo/members/{bob.id}", headers=member.headers
        ),
        "deactivated": lambda c: c.patch(
            f"/api/v1/users/{bob.id}", headers=admin.headers, json={"active": False}
        ),
        "logged out": lambda c: c.post(
            "/api/v1/auth/logout", json={"refresh_token": bob.refresh_token}
        ),
        "token revoked": lambda c: c.delete(
            f"/api/v1/me/tokens/{pat['id']}", headers=_bearer(bob.access_token)
        ),
    }


@pytest.mark.parametrize(
    "how", ["removed from the project", "deactivated", "logged out", "token revoked"]
)
@pytest.mark.parametrize("path", ["/api/v1/stream", "/api/v1/stream?project=demo", "task"])
def test_attack_stream_outlives_access(app, client, admin, member, bob, how, path):
    pat = client.post(
        "/api/v1/me/tokens",
        headers=bob.headers,
        json={"label": "s", "abilities": ["projects:read"]},
    ).get_json()
    credential = pat["token"] if how == "token revoked" else bob.access_token
    if path == "task":  # a task that waits (external target): its stream waits between runs
        t = client.post(
            "/api/v1/tasks",
            headers=member.headers,
            json={"project": "demo", "title": "t", "prompt": "p", "target": "external"},
        ).get_json()
        path = f"/api/v1/tasks/{t['id']}/stream"
    resp = client.get(path, headers=_bearer(credential), buffered=False)
    assert resp.status_code == 200
    reader = Reader(resp)
    reader.take(lambda f: f.comment)  # open
    done = _later(app, _ends(admin, member, bob, pat)[how])
    took = _closed_after(reader, done)
    print(f"closed {took * 1000:.0f} ms after the change")
    assert took < 5  # within a second here; a loaded CI machine gets leeway


def test_a_change_that_leaves_access_keeps_the_stream(app, client, admin, member, bob, project):
    """Another user's change, or a role that still reads the project: the stream goes on."""
    carol = account(app, client, "carol")
    resp = client.get("/api/v1/stream", headers=bob.headers, buffered=False)
    reader = Reader(resp)
    reader.take(lambda f: f.comment)

    def changes(c) -> None:
        c.patch(f"/api/v1/users/{carol.id}", headers=admin.headers, json={"active": False})
        c.post(
            "/api/v1/projects/demo/members",
            headers=member.headers,
            json={"username": bob.username, "role": "viewer"},
        )
        c.post(
            "/api/v1/tasks",
            headers=member.headers,
            json={"project": "demo", "title": "after", "prompt": "p", "target": "external"},
        )

    _later(app, changes)
    frames = reader.take(lambda f: f.event in ("closed", "task.created"), timeout=10)
    assert frames[-1].event == "task.created", [f.event for f in frames]
    reader.close()


def test_attack_parked_run_stream_outlives_removal(app, client, member, bob, project, worker):
    """A run's stream over gunicorn, parked (the hub writes its lines from another thread)."""
    live = LiveServer(app)
    try:
        t = create(client, member, prompt="echo first; sleep 30; echo second")
        run_id = wait_status(client, member, t["id"], "running")["latest_run_id"]
        conn, resp = _stream(live, f"/api/v1/runs/{run_id}/stream", bob.headers)
        frames = _frames(resp)
        for frame in frames:
            if frame.event == "log" and "first" in frame.data["text"]:
                break
        done = _later(
            app,
            lambda c: c.delete(f"/api/v1/projects/demo/members/{bob.id}", headers=member.headers),
        )
        seen = [f for f in frames]  # until the server ends the stream
        assert seen and seen[-1].event == "closed", [f.event for f in seen]
        took = time.monotonic() - done["at"]
        print(f"closed {took * 1000:.0f} ms after the change")
        assert took < 5
        conn.close()
        client.post(f"/api/v1/tasks/{t['id']}/cancel", headers=member.headers)
    finally:
        live.stop()
        print("---- web output ----\n" + live.output())


def test_stream_token_ends_with_its_login(app, client, member, project):
    """A stream token asked for by a login is refused once that login has ended."""
    session = login(client, member.username, member.password)
    minted = client.post(
        "/api/v1/auth/stream-token",
        headers=_bearer(session["access_token"]),
        json={"path": "/api/v1/stream"},
    ).get_json()
    client.post("/api/v1/auth/logout", json={"refresh_token": session["refresh_token"]})
    resp = client.get(f"/api/v1/stream?stream_token={minted['token']}")
    assert resp.status_code == 401
