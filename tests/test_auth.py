"""Login, refresh rotation with reuse detection, logout, expiry and brute-force throttling."""

from datetime import timedelta

import sqlalchemy as sa
from helpers import assert_problem, login, make_user

from app.audit.models import AuditLog
from app.auth import tokens
from app.auth.models import RefreshToken
from app.database import db
from app.timeutil import utcnow


def _audit_actions(app):
    with app.app_context():
        return list(db.session.scalars(sa.select(AuditLog.action).order_by(AuditLog.id)))


def test_login_by_username_or_email(client, app):
    make_user(app, "carol", "carol-password", email="Carol@Example.com")
    by_name = login(client, "CAROL", "carol-password")
    assert by_name["token_type"] == "Bearer" and by_name["expires_in"] == 900
    assert by_name["refresh_token"].startswith("sbf_")
    by_email = login(client, "carol@example.com", "carol-password")
    resp = client.post(
        "/api/v1/auth/login", json={"email": "carol@example.com", "password": "carol-password"}
    )
    assert resp.status_code == 200
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {by_email['access_token']}"})
    assert me.get_json()["username"] == "carol"


def test_failed_login_does_not_reveal_existence(client, app):
    make_user(app, "dave", "dave-password")
    wrong = assert_problem(
        client.post("/api/v1/auth/login", json={"username": "dave", "password": "nope-nope"}), 401
    )
    ghost = assert_problem(
        client.post("/api/v1/auth/login", json={"username": "ghost", "password": "nope-nope"}), 401
    )
    for key in ("code", "detail", "title"):
        assert wrong[key] == ghost[key]
    assert _audit_actions(app).count("auth.login_failed") == 2


def test_inactive_user_cannot_log_in(client, app, admin):
    uid = make_user(app, "erin", "erin-password")
    client.patch(f"/api/v1/users/{uid}", json={"active": False}, headers=admin.headers)
    assert_problem(
        client.post("/api/v1/auth/login", json={"username": "erin", "password": "erin-password"}),
        401,
        "invalid_credentials",
    )


def test_login_needs_an_identifier(client):
    body = assert_problem(client.post("/api/v1/auth/login", json={"password": "x"}), 422)
    assert "username" in body["errors"]


def test_refresh_rotates(client, member):
    resp = client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token})
    assert resp.status_code == 200
    pair = resp.get_json()
    assert pair["refresh_token"] != member.refresh_token
    assert (
        client.get(
            "/api/v1/me", headers={"Authorization": f"Bearer {pair['access_token']}"}
        ).status_code
        == 200
    )
    # the new one works once more
    again = client.post("/api/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    assert again.status_code == 200


def test_refresh_reuse_revokes_the_family(client, member, app):
    first = client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token})
    newest = first.get_json()["refresh_token"]
    # an attacker replays the rotated token
    resp = client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token})
    assert_problem(resp, 401, "refresh_token_reused")
    # ...so even the legitimate newest token of that login is dead now
    assert_problem(client.post("/api/v1/auth/refresh", json={"refresh_token": newest}), 401)
    with app.app_context():
        live = db.session.scalar(
            sa.select(sa.func.count(RefreshToken.id)).where(
                RefreshToken.user_id == member.id, RefreshToken.revoked_at.is_(None)
            )
        )
    assert live == 0
    assert "auth.refresh_reuse" in _audit_actions(app)


def test_reuse_in_one_family_leaves_other_logins_alone(client, member):
    other = login(client, member.username, member.password)
    client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token})
    client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token})
    resp = client.post("/api/v1/auth/refresh", json={"refresh_token": other["refresh_token"]})
    assert resp.status_code == 200


def test_logout_revokes(client, member):
    assert (
        client.post("/api/v1/auth/logout", json={"refresh_token": member.refresh_token}).status_code
        == 204
    )
    assert_problem(
        client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token}), 401
    )


def test_unknown_refresh_token(client):
    assert_problem(
        client.post("/api/v1/auth/refresh", json={"refresh_token": "sbf_nope"}),
        401,
        "invalid_refresh_token",
    )


def test_expired_access_token(client, member, app):
    with app.app_context():
        stale = tokens.encode_access(app.config["SECRET_KEY"], member.id, None, ttl=-60)
    assert_problem(
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {stale}"}), 401, "token_expired"
    )


def test_token_signed_with_another_key(client, member):
    forged = tokens.encode_access("another-secret-key-another-secret", member.id, None, 60)
    assert_problem(
        client.get("/api/v1/me", headers={"Authorization": f"Bearer {forged}"}),
        401,
        "invalid_token",
    )


def test_expired_refresh_token(client, member, app):
    with app.app_context():
        db.session.execute(
            sa.update(RefreshToken).values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
    assert_problem(
        client.post("/api/v1/auth/refresh", json={"refresh_token": member.refresh_token}),
        401,
        "invalid_refresh_token",
    )


def test_failed_logins_per_account_are_refused(client, app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_USER", "3/minute")
    make_user(app, "frank", "frank-password")
    for _ in range(3):
        assert_problem(
            client.post(
                "/api/v1/auth/login", json={"username": "frank", "password": "guess-guess"}
            ),
            401,
        )
    resp = client.post(
        "/api/v1/auth/login", json={"username": "frank", "password": "frank-password"}
    )
    assert_problem(resp, 429, "too_many_requests")
    assert int(resp.headers["Retry-After"]) >= 1
    # another account from the same IP is not locked by frank's failures
    make_user(app, "gina", "gina-password")
    login(client, "gina", "gina-password")


def test_failed_logins_per_ip_are_refused(client, app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_IP", "4/minute")
    for i in range(4):
        client.post("/api/v1/auth/login", json={"username": f"u{i}", "password": "guess-guess"})
    assert_problem(client.post("/api/v1/auth/login", json={"username": "x", "password": "y"}), 429)
    # bad bearer tokens from that IP are refused too
    assert_problem(client.get("/api/v1/me", headers={"X-API-Key": "sbp_nothing"}), 429)
    # a different client IP is unaffected
    resp = client.post(
        "/api/v1/auth/login",
        json={"username": "x", "password": "y"},
        environ_base={"REMOTE_ADDR": "10.9.8.7"},
    )
    assert resp.status_code == 401
