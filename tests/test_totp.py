"""TOTP enrolment, login with real pyotp codes, replay refusal, disabling and admin reset."""

from datetime import timedelta

import pyotp
from helpers import assert_problem

from app.timeutil import utcnow


def _enable(client, acct):
    setup = client.post("/api/v1/me/totp/setup", headers=acct.headers)
    assert setup.status_code == 200
    body = setup.get_json()
    assert body["otpauth_uri"].startswith("otpauth://totp/")
    assert f"secret={body['secret']}" in body["otpauth_uri"]
    totp = pyotp.TOTP(body["secret"])
    resp = client.post("/api/v1/me/totp/verify", json={"code": totp.now()}, headers=acct.headers)
    assert resp.status_code == 204
    return totp


def _login(client, acct, **extra):
    return client.post(
        "/api/v1/auth/login", json={"username": acct.username, "password": acct.password, **extra}
    )


def test_setup_is_inactive_until_verified(client, member):
    client.post("/api/v1/me/totp/setup", headers=member.headers)
    assert client.get("/api/v1/me", headers=member.headers).get_json()["totp_enabled"] is False
    assert _login(client, member).status_code == 200


def test_wrong_verify_code_keeps_it_off(client, member):
    client.post("/api/v1/me/totp/setup", headers=member.headers)
    assert_problem(
        client.post("/api/v1/me/totp/verify", json={"code": "000000"}, headers=member.headers),
        422,
        "totp_invalid",
    )
    assert client.get("/api/v1/me", headers=member.headers).get_json()["totp_enabled"] is False


def test_login_requires_a_valid_code(client, member):
    totp = _enable(client, member)
    assert_problem(_login(client, member), 401, "totp_required")
    assert_problem(_login(client, member, totp_code="123456"), 401, "totp_invalid")
    # the code used for verification cannot be replayed; the next step's code works
    next_code = totp.at(utcnow() + timedelta(seconds=30))
    assert _login(client, member, totp_code=next_code).status_code == 200
    assert_problem(_login(client, member, totp_code=next_code), 401, "totp_invalid")


def test_wrong_password_with_totp_is_plain_invalid_credentials(client, member):
    totp = _enable(client, member)
    resp = client.post(
        "/api/v1/auth/login",
        json={"username": member.username, "password": "wrong-wrong", "totp_code": totp.now()},
    )
    assert_problem(resp, 401, "invalid_credentials")


def test_setup_twice_when_enabled_is_409(client, member):
    _enable(client, member)
    assert_problem(client.post("/api/v1/me/totp/setup", headers=member.headers), 409)


def test_disable_needs_a_code(client, member):
    totp = _enable(client, member)
    assert_problem(
        client.delete("/api/v1/me/totp", json={"code": "111111"}, headers=member.headers),
        422,
        "totp_invalid",
    )
    code = totp.at(utcnow() + timedelta(seconds=30))
    assert (
        client.delete("/api/v1/me/totp", json={"code": code}, headers=member.headers).status_code
        == 204
    )
    assert _login(client, member).status_code == 200


def test_admin_reset(client, member, admin):
    _enable(client, member)
    resp = client.post(f"/api/v1/users/{member.id}/reset-totp", headers=admin.headers)
    assert resp.status_code == 200 and resp.get_json()["totp_enabled"] is False
    assert _login(client, member).status_code == 200
    assert_problem(client.post(f"/api/v1/users/{admin.id}/reset-totp", headers=member.headers), 403)
