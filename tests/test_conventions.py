"""The API conventions every module inherits: problem+json, request ids, body rules, pagination."""

import pytest
from helpers import assert_problem, count

from app.audit.models import AuditLog
from app.users.models import User


def test_unknown_route_is_problem_json(client):
    body = assert_problem(client.get("/api/v1/nope"), 404, "not_found")
    assert body["instance"] == "/api/v1/nope"


def test_unknown_id_is_404(client, admin):
    assert_problem(client.get("/api/v1/users/99999", headers=admin.headers), 404, "not_found")


def test_method_not_allowed(client):
    resp = client.delete("/api/v1/health")
    assert_problem(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"]


def test_missing_credentials_401(client):
    resp = client.get("/api/v1/me")
    assert_problem(resp, 401, "unauthenticated")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_garbage_token_401(client):
    assert_problem(
        client.get("/api/v1/me", headers={"Authorization": "Bearer nonsense"}), 401, "invalid_token"
    )
    assert_problem(
        client.get("/api/v1/me", headers={"Authorization": "Basic abc"}), 401, "invalid_token"
    )


def test_malformed_json_400_changes_nothing(client, admin, app):
    before = count(app, User)
    resp = client.post(
        "/api/v1/users",
        data='{"username": "bob", ',
        headers={**admin.headers, "Content-Type": "application/json"},
    )
    assert_problem(resp, 400, "malformed_json")
    assert count(app, User) == before


def test_non_json_body_415(client, admin, app):
    before = count(app, User)
    resp = client.post(
        "/api/v1/users",
        data="username=bob&password=x",
        headers={**admin.headers, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_problem(resp, 415, "unsupported_media_type")
    assert count(app, User) == before


def test_body_over_limit_413(client, admin, app):
    before = count(app, User)
    big = '{"username": "bob", "password": "' + "x" * (1024 * 1024 + 10) + '"}'
    resp = client.post(
        "/api/v1/users", data=big, headers={**admin.headers, "Content-Type": "application/json"}
    )
    assert_problem(resp, 413)
    assert count(app, User) == before


def test_validation_422_names_each_field(client, admin, app):
    before = count(app, User)
    resp = client.post(
        "/api/v1/users",
        json={"username": "", "email": "not-an-email", "role": "emperor", "surprise": 1},
        headers=admin.headers,
    )
    body = assert_problem(resp, 422, "validation_failed")
    assert {"username", "password", "email", "role", "surprise"} <= set(body["errors"])
    assert all(isinstance(v, list) for v in body["errors"].values())
    assert count(app, User) == before


def test_conflict_409(client, admin, app):
    payload = {"username": "bob", "password": "long enough pw"}
    assert client.post("/api/v1/users", json=payload, headers=admin.headers).status_code == 201
    before = count(app, User)
    assert_problem(
        client.post("/api/v1/users", json=payload, headers=admin.headers), 409, "conflict"
    )
    assert count(app, User) == before


def test_forbidden_403(client, member):
    assert_problem(client.get("/api/v1/users", headers=member.headers), 403, "forbidden")


def test_500_has_request_id_and_no_traceback(client):
    resp = client.get("/api/v1/_test/boom", headers={"X-Request-ID": "req-abc-123"})
    body = assert_problem(resp, 500, "internal_error")
    assert body["request_id"] == "req-abc-123"
    text = resp.get_data(as_text=True)
    assert "Traceback" not in text and "secret internals" not in text
    assert "req-abc-123" in text


def test_request_id_echoed_or_generated(client):
    assert (
        client.get("/api/v1/health", headers={"X-Request-ID": "abc-1"}).headers["X-Request-ID"]
        == "abc-1"
    )
    generated = client.get("/api/v1/health").headers["X-Request-ID"]
    assert len(generated) == 32
    # a hostile value is replaced, not reflected
    hostile = client.get("/api/v1/health", headers={"X-Request-ID": 'x" onload=1 ' * 10})
    assert hostile.headers["X-Request-ID"] != 'x" onload=1 ' * 10


def test_rate_limit_429_with_headers(client, member, app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_READ", "3/minute")
    statuses = [client.get("/api/v1/me", headers=member.headers) for _ in range(4)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    assert statuses[0].headers["RateLimit-Limit"] == "3"
    assert statuses[0].headers["RateLimit-Remaining"] == "2"
    assert "Retry-After" not in statuses[0].headers
    resp = statuses[3]
    assert_problem(resp, 429, "too_many_requests")
    assert int(resp.headers["Retry-After"]) >= 1
    assert resp.headers["RateLimit-Remaining"] == "0"


def test_rate_limit_is_per_principal(client, member, admin, app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_RATE_LIMIT_READ", "2/minute")
    for _ in range(2):
        assert client.get("/api/v1/me", headers=member.headers).status_code == 200
    assert client.get("/api/v1/me", headers=member.headers).status_code == 429
    assert client.get("/api/v1/me", headers=admin.headers).status_code == 200


@pytest.mark.parametrize("limit", ["0", "201", "abc"])
def test_bad_pagination_params_422(client, admin, limit):
    assert_problem(client.get(f"/api/v1/users?limit={limit}", headers=admin.headers), 422)


def test_bad_cursor_422(client, admin):
    body = assert_problem(client.get("/api/v1/users?cursor=%%%", headers=admin.headers), 422)
    assert "cursor" in body["errors"]


def test_cursor_pagination_walks_everything_once(client, admin, app):
    from helpers import make_user

    for i in range(7):
        make_user(app, f"user{i}")
    seen, url, pages = [], "/api/v1/users?limit=3&cursor=", 0  # an empty cursor: the first page
    while url:
        resp = client.get(url, headers=admin.headers)
        assert resp.status_code == 200
        body = resp.get_json()
        seen += [u["username"] for u in body["data"]]
        pages += 1
        nxt = body["meta"]["next_cursor"]
        if nxt:
            link = resp.headers["Link"]
            assert link.endswith('>; rel="next"') and f"cursor={nxt}" in link
            assert "limit=3" in link
            url = f"/api/v1/users?limit=3&cursor={nxt}"
        else:
            assert "Link" not in resp.headers
            url = None
    assert pages == 3
    assert len(seen) == len(set(seen)) == 8  # root + 7


def test_unknown_query_params_are_ignored(client, admin):
    assert client.get("/api/v1/users?utm_source=x", headers=admin.headers).status_code == 200


def test_timestamps_are_rfc3339_utc(client, member):
    body = client.get("/api/v1/me", headers=member.headers).get_json()
    assert body["created_at"].endswith("Z") and "T" in body["created_at"]


def test_mutating_requests_are_audited(client, member, app):
    before = count(app, AuditLog)
    client.patch("/api/v1/me", json={"git_name": "Alice"}, headers=member.headers)
    assert count(app, AuditLog) == before + 1
