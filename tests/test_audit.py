"""The audit trail: what is recorded, who may read it, filters, and that no secret lands in it."""

import json
import logging
from datetime import timedelta

import pyotp
import sqlalchemy as sa
from helpers import assert_problem

from app.audit.models import AuditLog
from app.audit.redact import REDACTED, redact
from app.database import db
from app.timeutil import rfc3339, utcnow


def _entries(app):
    with app.app_context():
        return list(db.session.scalars(sa.select(AuditLog).order_by(AuditLog.id)))


def test_security_events_are_recorded_with_context(client, admin, app):
    client.post(
        "/api/v1/auth/login",
        json={"username": "root", "password": "wrong-wrong"},
        headers={"X-Request-ID": "rid-fail-1"},
    )
    created = client.post(
        "/api/v1/me/tokens",
        headers=admin.headers,
        json={"label": "ci", "abilities": ["projects:read"]},
    ).get_json()
    client.delete(f"/api/v1/me/tokens/{created['id']}", headers=admin.headers)
    client.post(
        "/api/v1/users", headers=admin.headers, json={"username": "bob", "password": "bob-password"}
    )
    actions = [e.action for e in _entries(app)]
    for expected in (
        "user.create",
        "auth.login",
        "auth.login_failed",
        "token.create",
        "token.revoke",
    ):
        assert expected in actions, (expected, actions)
    failed = next(e for e in _entries(app) if e.action == "auth.login_failed")
    assert failed.request_id == "rid-fail-1" and failed.ip == "127.0.0.1"
    assert failed.actor_name == "root"
    created_entry = next(e for e in _entries(app) if e.action == "token.create")
    assert created_entry.actor_id == admin.id and created_entry.via == "session"
    assert created_entry.target_type == "token" and created_entry.target_id == str(created["id"])


def test_audit_log_api_filters_and_paginates(client, admin, member, app):
    for _ in range(3):
        client.post("/api/v1/auth/login", json={"username": "alice", "password": "nope-nope"})
    base = "/api/v1/audit-logs"
    failed = client.get(f"{base}?action=auth.login_failed", headers=admin.headers).get_json()
    assert len(failed["data"]) == 3
    assert all(e["action"] == "auth.login_failed" for e in failed["data"])
    family = client.get(f"{base}?action=auth.", headers=admin.headers).get_json()["data"]
    assert {e["action"] for e in family} == {"auth.login", "auth.login_failed"}
    mine = client.get(f"{base}?actor_id={member.id}", headers=admin.headers).get_json()["data"]
    assert mine and all(e["actor_id"] == member.id for e in mine)
    target = client.get(
        f"{base}?target_type=user&target_id={member.id}", headers=admin.headers
    ).get_json()["data"]
    assert target and all(e["target_id"] == str(member.id) for e in target)
    future = rfc3339(utcnow() + timedelta(hours=1))
    assert client.get(f"{base}?since={future}", headers=admin.headers).get_json()["data"] == []
    assert client.get(f"{base}?until={future}", headers=admin.headers).get_json()["data"]
    page = client.get(f"{base}?limit=2", headers=admin.headers).get_json()
    assert len(page["data"]) == 2 and page["meta"]["next_cursor"]
    ids = [e["id"] for e in page["data"]]
    assert ids == sorted(ids, reverse=True)  # newest first
    nxt = client.get(
        f"{base}?limit=2&cursor={page['meta']['next_cursor']}", headers=admin.headers
    ).get_json()["data"]
    assert nxt[0]["id"] < ids[-1]


def test_audit_log_is_admin_only(client, member):
    assert_problem(client.get("/api/v1/audit-logs", headers=member.headers), 403)


def test_redact_nested():
    out = redact(
        {
            "password": "p",
            "nested": {"api_key": "k", "ok": 1, "list": [{"secret": 2}]},
            "refresh_token": "t",
            "code": "123456",
            "totp_code": "1",
            "label": "fine",
            "note": "sbp_abcdef",
        }
    )
    assert out == {
        "password": REDACTED,
        "nested": {"api_key": REDACTED, "ok": 1, "list": [{"secret": REDACTED}]},
        "refresh_token": REDACTED,
        "code": REDACTED,
        "totp_code": REDACTED,
        "label": "fine",
        "note": REDACTED,
    }


def test_no_secret_reaches_logs_or_audit(client, admin, app, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = {admin.password, admin.access_token, admin.refresh_token}
    # wrong password attempt, user creation, password change
    client.post("/api/v1/auth/login", json={"username": "root", "password": "wrong-guess-77"})
    secrets.add("wrong-guess-77")
    client.post(
        "/api/v1/users",
        headers=admin.headers,
        json={"username": "bob", "password": "bob-secret-pw"},
    )
    secrets.add("bob-secret-pw")
    # tokens
    pat = client.post(
        "/api/v1/me/tokens", headers=admin.headers, json={"label": "ci", "abilities": ["admin"]}
    ).get_json()["token"]
    secrets.add(pat)
    client.get("/api/v1/me", headers={"X-API-Key": pat})
    pair = client.post("/api/v1/auth/refresh", json={"refresh_token": admin.refresh_token})
    secrets |= set(pair.get_json().values()) - {"Bearer", 900}
    # TOTP
    setup = client.post("/api/v1/me/totp/setup", headers=admin.headers).get_json()
    secrets.add(setup["secret"])
    code = pyotp.TOTP(setup["secret"]).now()
    client.post("/api/v1/me/totp/verify", json={"code": code}, headers=admin.headers)
    later = pyotp.TOTP(setup["secret"]).at(utcnow() + timedelta(seconds=30))
    client.post(
        "/api/v1/auth/login",
        json={"username": "root", "password": admin.password, "totp_code": later},
    )
    secrets |= {code, later}
    changed = client.put(
        "/api/v1/me/password",
        headers=admin.headers,
        json={"current_password": admin.password, "new_password": "n3w-passw0rd-x"},
    )
    assert changed.status_code == 204
    secrets.add("n3w-passw0rd-x")
    # a request the catch-all audit records with its body
    client.patch("/api/v1/me", headers=admin.headers, json={"git_name": "Root"})

    with app.app_context():
        rows = [
            json.dumps(
                {c.name: getattr(e, c.name) for c in AuditLog.__table__.columns}, default=str
            )
            for e in db.session.scalars(sa.select(AuditLog))
        ]
    haystack = "\n".join(rows) + "\n" + caplog.text
    assert len(rows) >= 8
    leaked = [s for s in secrets if isinstance(s, str) and s in haystack]
    assert leaked == []
