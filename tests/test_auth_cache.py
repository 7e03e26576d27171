"""A process remembers a repeated credential's user, token and project roles for a few seconds
(`app.auth.cache`), so that a polling script's read costs one query; a change that matters is
honoured at once — by the process that made it, and by every other once it is announced."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from helpers import assert_problem, wait_for


def run_read(client: Any, who: Any) -> tuple[str, dict]:
    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    task = client.post("/api/v1/tasks", headers=who, json=body).get_json()
    return f"/api/v1/runs/{task['latest_run_id']}", task


def test_a_repeated_read_asks_the_database_only_for_the_run(app, client, member, project):
    from app.database import db

    path, _task = run_read(client, member.headers)
    assert client.get(path, headers=member.headers).status_code == 200  # remembered from here
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    with app.app_context():
        engine = db.engine
    sa.event.listen(engine, "before_cursor_execute", note)
    try:
        for _ in range(3):
            assert client.get(path, headers=member.headers).status_code == 200
    finally:
        sa.event.remove(engine, "before_cursor_execute", note)
    touched = " ".join(seen)
    assert "FROM runs" in touched
    assert "FROM users" not in touched and "FROM project_members" not in touched


def test_a_revoked_token_is_refused_at_once_although_remembered(app, client, member, project):
    made = client.post(
        "/api/v1/me/tokens",
        headers=member.headers,
        json={"label": "script", "abilities": ["projects:read"]},
    ).get_json()
    pat = {"Authorization": f"Bearer {made['token']}"}
    path, _task = run_read(client, member.headers)
    for _ in range(2):
        assert client.get(path, headers=pat).status_code == 200
    revoked = client.delete(f"/api/v1/me/tokens/{made['id']}", headers=member.headers)
    assert revoked.status_code == 204
    assert_problem(client.get(path, headers=pat), 401, "invalid_token")


def test_a_member_removed_loses_access_at_once(app, client, member, admin, project):
    from helpers import account

    bob = account(app, client, "bob")
    added = client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": bob.username, "role": "viewer"},
    )
    assert added.status_code in (200, 201), added.get_json()
    path, _task = run_read(client, member.headers)
    assert client.get(path, headers=bob.headers).status_code == 200
    gone = client.delete(f"/api/v1/projects/demo/members/{bob.id}", headers=member.headers)
    assert gone.status_code == 204, gone.get_json()
    assert_problem(client.get(path, headers=bob.headers), 404)


def test_a_change_announced_by_another_process_is_forgotten(app, client, member, project):
    """Another process deactivates the user: its announcement, heard on Redis, empties this
    process's memory of them (without it the next read would be served from memory)."""
    from app.auth import cache
    from app.database import db
    from app.live import pubsub
    from app.users.models import User

    path, _task = run_read(client, member.headers)
    assert client.get(path, headers=member.headers).status_code == 200
    with app.app_context():
        memory = cache.remembered()
        assert memory.get(("user", member.id)) is not None
        # as another process would: the row changes, and the change is announced
        db.session.execute(sa.update(User).where(User.id == member.id).values(is_active=False))
        db.session.commit()
        pubsub.publish(cache.channel(), {"user_id": member.id})
        wait_for(lambda: memory.get(("user", member.id)) is None, timeout=5)
    assert_problem(client.get(path, headers=member.headers), 401)


def test_nothing_is_remembered_when_the_setting_is_zero(app, client, member, project, monkeypatch):
    from app.auth import cache

    monkeypatch.setitem(app.config, "SWITCHBOARD_AUTH_CACHE_SECONDS", 0)
    monkeypatch.delitem(app.extensions, "switchboard_auth_cache", raising=False)
    path, _task = run_read(client, member.headers)
    assert client.get(path, headers=member.headers).status_code == 200
    with app.app_context():
        assert cache.remembered().get(("user", member.id)) is None
    monkeypatch.delitem(app.extensions, "switchboard_auth_cache", raising=False)


def test_the_memory_is_bounded(monkeypatch):
    """However many distinct credentials a process sees, its memory stays within its bound
    (only valid ones are remembered; expired entries go first, then the oldest)."""
    from app.auth import cache

    monkeypatch.setattr(cache, "MAX_ENTRIES", 100)
    memory = cache.Remembered(5)
    for n in range(250):
        memory.put(("user", n), n, {"id": n})
    assert len(memory.entries) <= 100
    assert memory.get(("user", 249)) == {"id": 249}  # the newest is kept
