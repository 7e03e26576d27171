"""Security issue, item 10 (the smaller ones closed so far): one login limit per account whatever
names it, failed logins that do not record what was typed, an Idempotency-Key that answers only
the request it made (and only to who may still see it), and an SSRF guard that knows IPv6's ways
back to IPv4."""

from __future__ import annotations

import json

import pytest
from helpers import GH_SECRET, account, assert_problem, count, make_user

from app.tasks.models import Task


def test_attack_login_limit_split_between_username_and_email(client, app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_USER", "3/minute")
    make_user(app, "frank", "frank-password", email="frank@example.com")
    for _ in range(3):
        resp = client.post("/api/v1/auth/login", json={"username": "frank", "password": "guess"})
        assert_problem(resp, 401)
    by_email = client.post(
        "/api/v1/auth/login", json={"username": "FRANK@example.com", "password": "guess"}
    )
    assert_problem(by_email, 429, "too_many_requests")  # the same account, the same bucket


def test_attack_failed_login_records_what_was_typed(client, app, admin):
    typed = "correct-horse-battery-staple-typed-as-a-name"
    assert_problem(
        client.post("/api/v1/auth/login", json={"username": typed, "password": "x"}), 401
    )
    make_user(app, "gus", "gus-password")
    assert_problem(
        client.post("/api/v1/auth/login", json={"username": "gus", "password": "x"}), 401
    )
    entries = client.get(
        "/api/v1/audit-logs?action=auth.login_failed", headers=admin.headers
    ).get_json()["data"]
    assert len(entries) == 2 and typed not in json.dumps(entries)
    assert sorted(e["payload"]["account_exists"] for e in entries) == [False, True]
    assert {e["actor_name"] for e in entries} == {None, "gus"}


def test_attack_idempotency_key_with_another_body(client, app, member, project):
    body = {"project": "demo", "title": "deploy", "prompt": "ship it", "target": "external"}
    headers = {**member.headers, "Idempotency-Key": "deploy-1"}
    first = client.post("/api/v1/tasks", json=body, headers=headers)
    assert first.status_code == 201
    again = client.post("/api/v1/tasks", json=body, headers=headers)
    assert again.status_code == 201 and again.get_json()["id"] == first.get_json()["id"]
    for change in ({"title": "other"}, {"prompt": "rm -rf /"}, {"priority": "urgent"}):
        resp = client.post("/api/v1/tasks", json={**body, **change}, headers=headers)
        assert_problem(resp, 422, "idempotency_key_reused")
        assert next(iter(change)) in resp.get_json()["fields"]
    assert count(app, Task) == 1


def test_attack_idempotency_replay_after_losing_access(client, app, member, project):
    bob = account(app, client, "bob")
    client.post(
        "/api/v1/projects/demo/members",
        headers=member.headers,
        json={"username": bob.username, "role": "developer"},
    )
    body = {"project": "demo", "title": "t", "prompt": "p", "target": "external"}
    headers = {**bob.headers, "Idempotency-Key": "k-1"}
    assert client.post("/api/v1/tasks", json=body, headers=headers).status_code == 201
    client.delete(f"/api/v1/projects/demo/members/{bob.id}", headers=member.headers)
    replay = client.post("/api/v1/tasks", json=body, headers=headers)
    assert_problem(replay, 422)
    assert "id" not in replay.get_json()  # the task is not shown to who can no longer see it


@pytest.mark.parametrize(
    "host", ["[::7f00:1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[::ffff:0:7f00:1]"]
)
def test_attack_ssrf_through_ipv6_transition_addresses(client, admin, member, host):
    resp = client.post(
        "/api/v1/subscriptions",
        headers=admin.headers,
        json={"url": f"http://{host}:8000/hook", "events": ["task.created"]},
    )
    assert_problem(resp, 422)
    resp = client.post(
        "/api/v1/projects",
        headers=member.headers,
        json={"key": "p", "name": "p", "repo_url": f"https://{host}/x.git"},
    )
    assert_problem(resp, 422)


def test_attack_totp_codes_guessed_on_the_account_routes(client, app, member, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_USER", "3/minute")
    assert client.post("/api/v1/me/totp/setup", headers=member.headers).status_code == 200
    for _ in range(3):
        resp = client.post(
            "/api/v1/me/totp/verify", headers=member.headers, json={"code": "000000"}
        )
        assert resp.status_code == 422
    resp = client.post("/api/v1/me/totp/verify", headers=member.headers, json={"code": "000000"})
    assert_problem(resp, 429, "too_many_requests")


def test_attack_stream_token_for_run_1_opens_run_18(client, member):
    token = client.post(
        "/api/v1/auth/stream-token", headers=member.headers, json={"path": "/api/v1/runs/1"}
    ).get_json()["token"]
    resp = client.get(f"/api/v1/runs/18/stream?stream_token={token}")
    assert_problem(resp, 401)
    # its own run's stream (a 404 here: there is no run 1) is past the token check
    assert client.get(f"/api/v1/runs/1/stream?stream_token={token}").status_code == 404


def test_attack_stream_token_outlives_the_token_that_asked(client, member):
    made = client.post(
        "/api/v1/me/tokens",
        headers=member.headers,
        json={"label": "s", "abilities": ["projects:read"]},
    ).get_json()
    pat = {"Authorization": f"Bearer {made['token']}"}
    token = client.post(
        "/api/v1/auth/stream-token", headers=pat, json={"path": "/api/v1/stream"}
    ).get_json()["token"]
    opened = client.get(f"/api/v1/stream?stream_token={token}", buffered=False)
    assert opened.status_code == 200
    opened.close()
    client.delete(f"/api/v1/me/tokens/{made['id']}", headers=member.headers)
    assert_problem(client.get(f"/api/v1/stream?stream_token={token}"), 401)


def test_attack_subscription_url_secrets_in_the_audit_log(client, admin):
    secret_url = "https://hooks.example.com/services/T000/B000/XXXXsecretXXXX?token=tok-123"
    client.post(
        "/api/v1/subscriptions",
        headers=admin.headers,
        json={"url": secret_url, "events": ["task.created"]},
    )
    client.post(  # refused (a private address): its body is not kept either
        "/api/v1/subscriptions",
        headers=admin.headers,
        json={"url": "http://10.0.0.1/hook?token=tok-456", "events": ["task.created"]},
    )
    audit = json.dumps(
        client.get("/api/v1/audit-logs", headers=admin.headers).get_json(), ensure_ascii=False
    )
    assert "XXXXsecretXXXX" not in audit and "tok-123" not in audit and "tok-456" not in audit
    assert "https://hooks.example.com/…" in audit


def test_attack_enumerate_usernames_by_adding_user_ids(client, app, admin, member, project):
    members = "/api/v1/projects/demo/members"
    secret_name = account(app, client, "quiet-quentin")
    guessed = client.post(
        members, headers=member.headers, json={"user_id": secret_name.id, "role": "viewer"}
    )
    assert_problem(guessed, 422)
    assert "quiet-quentin" not in guessed.get_data(as_text=True)
    assert_problem(client.get("/api/v1/users", headers=member.headers), 403)
    # a name (or an email) the maintainer already knows adds the person
    unknown = client.post(
        members, headers=member.headers, json={"username": "nobody", "role": "viewer"}
    )
    assert_problem(unknown, 422)
    added = client.post(
        members,
        headers=member.headers,
        json={"email": "quiet-quentin@example.com", "role": "viewer"},
    )
    assert added.status_code == 201 and added.get_json()["username"] == "quiet-quentin"
    # a member's id changes their role; an administrator may name anyone by id
    changed = client.post(
        members, headers=member.headers, json={"user_id": secret_name.id, "role": "developer"}
    )
    assert changed.status_code == 201 and changed.get_json()["role"] == "developer"
    other = account(app, client, "otto")
    by_admin = client.post(
        members, headers=admin.headers, json={"user_id": other.id, "role": "viewer"}
    )
    assert by_admin.status_code == 201
    both = client.post(
        members,
        headers=member.headers,
        json={"username": "otto", "email": "x@y.z", "role": "viewer"},
    )
    assert_problem(both, 422)


def _chunked_post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", path)
        for name, value in {**headers, "Transfer-Encoding": "chunked"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        for start in range(0, len(body), 1000):
            piece = body[start : start + 1000]
            conn.send(b"%X\r\n%s\r\n" % (len(piece), piece))
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_attack_chunked_body_over_the_limit(app, client, admin, member, project, gh):
    from servers import LiveServer

    from app.webhooks.signatures import sign

    live = LiveServer(
        app,
        SWITCHBOARD_MAX_BODY_BYTES="4000",
        SWITCHBOARD_WEBHOOK_MAX_BODY_BYTES="4000",
        SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_IP="3/minute",
    )
    try:
        big = json.dumps({"padding": "x" * 10_000}).encode()
        hook = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "issues",
            "X-Hub-Signature-256": sign("whatever", big),
        }
        for _ in range(5):  # more than the bad-signature limit: none of them counts as one
            status, body = _chunked_post(live.port, "/api/v1/webhooks/gh", big, hook)
            assert status == 413, body
            assert json.loads(body)["code"] == "payload_too_large"
        task = {"Content-Type": "application/json", **member.headers}
        status, body = _chunked_post(live.port, "/api/v1/tasks", big, task)
        assert status == 413, body
        ping = json.dumps({"zen": "Keep it logically awesome.", "hook_id": 1}).encode()
        signed = {**hook, "X-GitHub-Event": "ping", "X-Hub-Signature-256": sign(GH_SECRET, ping)}
        status, body = _chunked_post(live.port, "/api/v1/webhooks/gh", ping, signed)
        assert status == 200, body  # a chunked delivery within the limit is taken
    finally:
        live.stop()
        print("---- web output ----\n" + live.output())
