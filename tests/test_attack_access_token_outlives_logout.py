"""Security issue, item 8: an access token ends with its login — at logout, at a password change
(the other logins), when its refresh token is reused — not only at its expiry. The task fast path
(PostgreSQL) asks the same rule as every other route."""

from __future__ import annotations

import pytest
from helpers import assert_problem, login


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _create(client, token):
    return client.post(
        "/api/v1/tasks",
        headers=_bearer(token),
        json={"project": "demo", "title": "t", "prompt": "p", "target": "external"},
    )


def test_attack_access_token_after_logout(client, member, project):
    session = login(client, member.username, member.password)
    access = session["access_token"]
    assert client.get("/api/v1/me", headers=_bearer(access)).status_code == 200
    assert _create(client, access).status_code == 201
    out = client.post("/api/v1/auth/logout", json={"refresh_token": session["refresh_token"]})
    assert out.status_code == 204
    for resp in (client.get("/api/v1/me", headers=_bearer(access)), _create(client, access)):
        assert_problem(resp, 401)
        assert resp.get_json()["code"] == "token_revoked"
    # the other login of the same user goes on
    assert client.get("/api/v1/me", headers=member.headers).status_code == 200


def test_attack_access_token_after_a_password_change(client, member, project):
    other = login(client, member.username, member.password)["access_token"]
    changed = client.put(
        "/api/v1/me/password",
        headers=member.headers,
        json={"current_password": member.password, "new_password": "a-brand-new-passphrase"},
    )
    assert changed.status_code == 204
    assert_problem(client.get("/api/v1/me", headers=_bearer(other)), 401)
    assert_problem(_create(client, other), 401)
    assert client.get("/api/v1/me", headers=member.headers).status_code == 200  # this login


@pytest.mark.parametrize("reused_by", ["attacker"])
def test_attack_access_token_after_refresh_token_reuse(client, member, project, reused_by):
    session = login(client, member.username, member.password)
    rotated = client.post("/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert rotated.status_code == 200
    newer = rotated.get_json()["access_token"]
    assert client.get("/api/v1/me", headers=_bearer(newer)).status_code == 200
    reused = client.post("/api/v1/auth/refresh", json={"refresh_token": session["refresh_token"]})
    assert_problem(reused, 401)
    for token in (session["access_token"], newer):
        assert_problem(client.get("/api/v1/me", headers=_bearer(token)), 401)
