"""Personal access tokens: shown once, stored hashed, abilities bounded by the user, revocable."""

from datetime import timedelta

import sqlalchemy as sa
from helpers import assert_problem

from app.auth.models import PersonalAccessToken
from app.database import db
from app.timeutil import rfc3339, utcnow


def _create(client, acct, abilities, **extra):
    return client.post(
        "/api/v1/me/tokens",
        headers=acct.headers,
        json={"label": "ci", "abilities": abilities, **extra},
    )


def test_token_is_shown_once_and_stored_hashed(client, member, app):
    resp = _create(client, member, ["projects:read", "runs:start"])
    assert resp.status_code == 201
    body = resp.get_json()
    raw = body["token"]
    assert raw.startswith("sbp_") and len(raw) > 40
    assert resp.headers["Location"] == f"/api/v1/me/tokens/{body['id']}"
    assert body["abilities"] == ["projects:read", "runs:start"]
    listed = client.get("/api/v1/me/tokens", headers=member.headers).get_json()["data"]
    assert [t["id"] for t in listed] == [body["id"]]
    assert "token" not in listed[0] and raw not in str(listed)
    with app.app_context():
        row = db.session.get(PersonalAccessToken, body["id"])
        assert row.token_hash != raw and raw not in row.token_hash
        assert raw[:10] == row.prefix


def test_token_works_as_bearer_and_api_key(client, member, app):
    raw = _create(client, member, ["projects:read"]).get_json()["token"]
    me = client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"})
    assert me.status_code == 200 and me.get_json()["abilities"] == ["projects:read"]
    assert client.get("/api/v1/me", headers={"X-API-Key": raw}).status_code == 200
    with app.app_context():
        row = db.session.scalar(sa.select(PersonalAccessToken))
        assert row.last_used_at is not None


def test_token_without_admin_is_403_on_users(client, admin):
    raw = _create(client, admin, ["projects:read", "settings:read"]).get_json()["token"]
    assert_problem(client.get("/api/v1/users", headers={"X-API-Key": raw}), 403)
    full = _create(client, admin, ["admin"]).get_json()["token"]
    assert client.get("/api/v1/users", headers={"X-API-Key": full}).status_code == 200


def test_token_cannot_exceed_its_user(client, member, app):
    assert_problem(_create(client, member, ["admin"]), 403)
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(PersonalAccessToken.id))) == 0


def test_token_cannot_mint_a_stronger_token(client, member):
    weak = _create(client, member, ["projects:read"]).get_json()["token"]
    resp = client.post(
        "/api/v1/me/tokens",
        headers={"X-API-Key": weak},
        json={"label": "x", "abilities": ["runs:start"]},
    )
    assert_problem(resp, 403)


def test_unknown_ability_422(client, member):
    body = assert_problem(_create(client, member, ["projects:read", "fly"]), 422)
    assert list(body["errors"]) == ["abilities.1"]


def test_revoked_token_401(client, member):
    body = _create(client, member, ["projects:read"]).get_json()
    assert (
        client.delete(f"/api/v1/me/tokens/{body['id']}", headers=member.headers).status_code == 204
    )
    assert_problem(
        client.get("/api/v1/me", headers={"X-API-Key": body["token"]}), 401, "invalid_token"
    )


def test_other_users_token_is_404(client, member, admin):
    body = _create(client, member, ["projects:read"]).get_json()
    assert_problem(client.delete(f"/api/v1/me/tokens/{body['id']}", headers=admin.headers), 404)


def test_expired_token_401(client, member, app):
    soon = rfc3339(utcnow() + timedelta(hours=1))
    body = _create(client, member, ["projects:read"], expires_at=soon).get_json()
    assert body["expires_at"] == soon
    with app.app_context():
        row = db.session.get(PersonalAccessToken, body["id"])
        row.expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
    assert_problem(
        client.get("/api/v1/me", headers={"X-API-Key": body["token"]}), 401, "token_expired"
    )


def test_expiry_in_the_past_422(client, member):
    past = rfc3339(utcnow() - timedelta(hours=1))
    assert_problem(_create(client, member, ["projects:read"], expires_at=past), 422)


def test_demoted_admin_token_loses_admin(client, admin, app):
    from helpers import account

    raw = _create(client, admin, ["admin"]).get_json()["token"]
    other = account(app, client, "boss", role="admin")
    client.patch(f"/api/v1/users/{admin.id}", json={"role": "member"}, headers=other.headers)
    assert_problem(client.get("/api/v1/users", headers={"X-API-Key": raw}), 403)


def test_get_one_token(client, member):
    body = _create(client, member, ["projects:read"]).get_json()
    one = client.get(f"/api/v1/me/tokens/{body['id']}", headers=member.headers)
    assert one.status_code == 200 and one.get_json()["label"] == "ci"
    assert "token" not in one.get_json()
