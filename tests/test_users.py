"""Profile, password, administration of users, deactivation, and the users CLI."""

import sqlalchemy as sa
from helpers import assert_problem, at_once, login

from app.auth.models import RefreshToken
from app.database import db
from app.users.models import User


def test_me_and_profile_update(client, member):
    me = client.get("/api/v1/me", headers=member.headers).get_json()
    assert me["username"] == "alice" and me["role"] == "member"
    assert "admin" not in me["abilities"] and "runs:start" in me["abilities"]
    assert "password" not in str(me) and "totp_secret" not in me
    resp = client.patch(
        "/api/v1/me", json={"git_name": "Alice A", "git_email": "a@x.io"}, headers=member.headers
    )
    assert resp.status_code == 200 and resp.get_json()["git_name"] == "Alice A"
    # a member cannot promote themselves through the profile
    assert_problem(client.patch("/api/v1/me", json={"role": "admin"}, headers=member.headers), 422)


def test_password_change_keeps_this_login_and_ends_others(client, member, app):
    other = login(client, member.username, member.password)
    resp = client.put(
        "/api/v1/me/password",
        headers=member.headers,
        json={"current_password": member.password, "new_password": "a brand new password"},
    )
    assert resp.status_code == 204
    assert_problem(
        client.post("/api/v1/auth/refresh", json={"refresh_token": other["refresh_token"]}), 401
    )
    assert (
        client.post(
            "/api/v1/auth/refresh", json={"refresh_token": member.refresh_token}
        ).status_code
        == 200
    )
    login(client, member.username, "a brand new password")
    assert_problem(
        client.post(
            "/api/v1/auth/login", json={"username": member.username, "password": member.password}
        ),
        401,
    )


def test_password_change_needs_the_current_one(client, member):
    assert_problem(
        client.put(
            "/api/v1/me/password",
            headers=member.headers,
            json={"current_password": "wrong-wrong", "new_password": "a brand new password"},
        ),
        403,
    )
    body = assert_problem(
        client.put(
            "/api/v1/me/password",
            headers=member.headers,
            json={"current_password": member.password, "new_password": "short"},
        ),
        422,
    )
    assert "new_password" in body["errors"]


def test_admin_creates_lists_gets_and_updates(client, admin):
    resp = client.post(
        "/api/v1/users",
        headers=admin.headers,
        json={"username": "Bob", "password": "bob-password", "email": "bob@x.io"},
    )
    assert resp.status_code == 201
    bob = resp.get_json()
    assert bob["username"] == "bob" and bob["role"] == "member" and bob["active"] is True
    assert resp.headers["Location"] == f"/api/v1/users/{bob['id']}"
    got = client.get(f"/api/v1/users/{bob['id']}", headers=admin.headers).get_json()
    assert got["email"] == "bob@x.io"
    listed = client.get("/api/v1/users?role=member", headers=admin.headers).get_json()["data"]
    assert [u["username"] for u in listed] == ["bob"]
    found = client.get("/api/v1/users?q=bo", headers=admin.headers).get_json()["data"]
    assert [u["username"] for u in found] == ["bob"]
    upd = client.patch(
        f"/api/v1/users/{bob['id']}", json={"role": "admin", "git_name": "B"}, headers=admin.headers
    )
    assert upd.status_code == 200 and upd.get_json()["role"] == "admin"


def test_bad_username_422(client, admin):
    body = assert_problem(
        client.post(
            "/api/v1/users",
            headers=admin.headers,
            json={"username": "-bad name", "password": "long enough"},
        ),
        422,
    )
    assert "username" in body["errors"]


def test_deactivation_kills_every_credential_at_once(client, admin, member, app):
    pat = client.post(
        "/api/v1/me/tokens",
        headers=member.headers,
        json={"label": "x", "abilities": ["projects:read"]},
    ).get_json()["token"]
    resp = client.patch(f"/api/v1/users/{member.id}", json={"active": False}, headers=admin.headers)
    assert resp.status_code == 200 and resp.get_json()["active"] is False
    assert_problem(client.get("/api/v1/me", headers=member.headers), 401)
    assert_problem(client.get("/api/v1/me", headers={"X-API-Key": pat}), 401)
    assert_problem(
        client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token}), 401
    )
    # reactivation does not bring the old credentials back
    client.patch(f"/api/v1/users/{member.id}", json={"active": True}, headers=admin.headers)
    assert_problem(client.get("/api/v1/me", headers={"X-API-Key": pat}), 401)
    with app.app_context():
        assert (
            db.session.scalar(
                sa.select(sa.func.count(RefreshToken.id)).where(
                    RefreshToken.user_id == member.id, RefreshToken.revoked_at.is_(None)
                )
            )
            == 0
        )


def test_last_admin_cannot_be_demoted_or_deactivated(client, admin, app):
    assert_problem(
        client.patch(f"/api/v1/users/{admin.id}", json={"role": "member"}, headers=admin.headers),
        409,
    )
    assert_problem(
        client.patch(f"/api/v1/users/{admin.id}", json={"active": False}, headers=admin.headers),
        409,
    )
    with app.app_context():
        assert db.session.get(User, admin.id).role == "admin"


def test_members_cannot_administer(client, member):
    assert_problem(
        client.post(
            "/api/v1/users",
            headers=member.headers,
            json={"username": "x", "password": "long enough"},
        ),
        403,
    )
    assert_problem(
        client.patch(f"/api/v1/users/{member.id}", json={"role": "admin"}, headers=member.headers),
        403,
    )


def test_cli_users_create_and_list(app, client):
    runner = app.test_cli_runner()
    result = runner.invoke(
        args=["users", "create", "ops", "--admin", "--generate-password", "--email", "ops@x.io"]
    )
    assert result.exit_code == 0, result.output
    assert "created admin ops" in result.output
    password = result.output.split("password (shown once): ")[1].strip()
    login(client, "ops", password)
    listed = runner.invoke(args=["users", "list"])
    assert "ops\tops@x.io\tadmin\tactive" in listed.output
    dup = runner.invoke(args=["users", "create", "ops", "--password", "whatever-long"])
    assert dup.exit_code != 0 and "already exists" in dup.output


def test_release_creates_admin_once(app, client, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_ADMIN_USERNAME", "boss")
    monkeypatch.setitem(app.config, "SWITCHBOARD_ADMIN_PASSWORD", "")
    runner = app.test_cli_runner()
    first = runner.invoke(args=["release"])
    assert first.exit_code == 0, first.output
    password = first.output.split("admin password (shown once): ")[1].split()[0]
    login(client, "boss", password)
    second = runner.invoke(args=["release"])
    assert second.exit_code == 0 and "password" not in second.output


def test_release_in_production_never_makes_up_a_password(app, client, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_ENV", "production")
    monkeypatch.setitem(app.config, "SWITCHBOARD_ADMIN_USERNAME", "boss")
    monkeypatch.setitem(app.config, "SWITCHBOARD_ADMIN_PASSWORD", "")
    runner = app.test_cli_runner()
    refused = runner.invoke(args=["release"])
    assert refused.exit_code == 1
    assert "SWITCHBOARD_ADMIN_PASSWORD" in refused.output
    assert "password (shown once)" not in refused.output
    no_admin = client.post(
        "/api/v1/auth/login", json={"username": "boss", "password": "anything at all"}
    )
    assert no_admin.status_code == 401
    monkeypatch.setitem(app.config, "SWITCHBOARD_ADMIN_PASSWORD", "the-config-var-password")
    done = runner.invoke(args=["release"])
    assert done.exit_code == 0, done.output
    assert "the-config-var-password" not in done.output
    login(client, "boss", "the-config-var-password")
    again = runner.invoke(args=["release"])  # every deploy runs it
    assert again.exit_code == 0 and "created" not in again.output


def test_two_admins_demoting_each_other_at_once_leave_one(client, admin, app):
    """Each alone is allowed (another admin remains); together they would leave none."""
    other = client.post(
        "/api/v1/users",
        headers=admin.headers,
        json={"username": "root2", "password": "another long password", "role": "admin"},
    ).get_json()
    root2 = login(client, "root2", "another long password")
    headers = [admin.headers, {"Authorization": f"Bearer {root2['access_token']}"}]
    targets = [other["id"], admin.id]
    answers = at_once(
        app,
        2,
        lambda c, i: c.patch(
            f"/api/v1/users/{targets[i]}", json={"role": "member"}, headers=headers[i]
        ),
    )
    # the loser is refused as the last admin (409), or as no admin any more (403)
    codes = sorted(a.status_code for a in answers)
    assert codes in ([200, 403], [200, 409]), [a.get_json() for a in answers]
    with app.app_context():
        admins = db.session.scalar(
            sa.select(sa.func.count(User.id)).where(User.role == "admin", User.is_active)
        )
    assert admins == 1


def test_the_same_username_created_twice_at_once_is_one_user(client, admin, app):
    body = {"username": "twin", "password": "a long enough password"}
    answers = at_once(
        app, 6, lambda c, _: c.post("/api/v1/users", json=body, headers=admin.headers)
    )
    assert sorted(a.status_code for a in answers) == [201] + [409] * 5, [
        a.get_json() for a in answers
    ]
    with app.app_context():
        assert (
            db.session.scalar(sa.select(sa.func.count(User.id)).where(User.username == "twin")) == 1
        )
