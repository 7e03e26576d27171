"""Security issue, item 4: a token's abilities hold on every route. Changing the account
(profile, password, TOTP, tokens) needs a login session or the `account` ability; a token mints
only tokens with fewer abilities that end no later than itself, and they are revoked with it.
Every operation of the OpenAPI document is public or names the abilities it needs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from helpers import assert_problem


def _pat(client, headers, abilities, expires_at=None, label="t"):
    body = {"label": label, "abilities": abilities}
    if expires_at is not None:
        body["expires_at"] = expires_at.isoformat().replace("+00:00", "Z")
    resp = client.post("/api/v1/me/tokens", headers=headers, json=body)
    return resp


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_attack_settings_read_token_changes_the_account(client, member):
    weak = _pat(client, member.headers, ["settings:read"]).get_json()
    other = _pat(client, member.headers, ["projects:read"], label="other").get_json()
    headers = _bearer(weak["token"])
    for method, path, body in (
        ("patch", "/api/v1/me", {"email": "evil@example.com"}),
        ("put", "/api/v1/me/password", {"current_password": "x", "new_password": "y" * 12}),
        ("post", "/api/v1/me/totp/setup", None),
        ("post", "/api/v1/me/totp/verify", {"code": "123456"}),
        ("delete", "/api/v1/me/totp", {"code": "123456"}),
        ("get", "/api/v1/me/tokens", None),
        ("post", "/api/v1/me/tokens", {"label": "child", "abilities": ["settings:read"]}),
        ("delete", f"/api/v1/me/tokens/{other['id']}", None),
    ):
        resp = getattr(client, method)(path, headers=headers, json=body)
        assert_problem(resp, 403)
        assert "account" in resp.get_json()["detail"]
    me = client.get("/api/v1/me", headers=headers)
    assert me.status_code == 200 and me.get_json()["email"] == "alice@example.com"
    assert (
        client.get("/api/v1/me/tokens/" + str(other["id"]), headers=member.headers).get_json()[
            "revoked_at"
        ]
        is None
    )


def test_attack_child_token_outlives_its_parent(client, member):
    soon = datetime.now(UTC) + timedelta(minutes=2)
    parent = _pat(client, member.headers, ["account", "projects:read"], expires_at=soon).get_json()
    headers = _bearer(parent["token"])
    # more abilities than the parent: refused
    assert_problem(_pat(client, headers, ["account", "admin"]), 403)
    # no expiry, or a later one: refused
    assert_problem(_pat(client, headers, ["projects:read"]), 422)
    assert_problem(_pat(client, headers, ["projects:read"], soon + timedelta(days=1)), 422)
    child = _pat(client, headers, ["projects:read"], soon - timedelta(seconds=30))
    assert child.status_code == 201, child.get_json()
    grandchild_parent = _pat(client, headers, ["account", "projects:read"], soon).get_json()
    grandchild = _pat(
        client, _bearer(grandchild_parent["token"]), ["projects:read"], soon
    ).get_json()
    for token in (child.get_json(), grandchild):
        assert client.get("/api/v1/projects", headers=_bearer(token["token"])).status_code == 200
    # revoking the parent revokes what it minted, and what that minted
    assert (
        client.delete(f"/api/v1/me/tokens/{parent['id']}", headers=member.headers).status_code
        == 204
    )
    for token in (parent, child.get_json(), grandchild_parent, grandchild):
        assert_problem(client.get("/api/v1/projects", headers=_bearer(token["token"])), 401)


def test_a_session_and_an_account_token_still_manage_the_account(client, member):
    full = _pat(client, member.headers, ["account"]).get_json()
    resp = client.patch("/api/v1/me", headers=_bearer(full["token"]), json={"git_name": "A"})
    assert resp.status_code == 200
    resp = client.patch("/api/v1/me", headers=member.headers, json={"git_name": "B"})
    assert resp.status_code == 200


def test_every_operation_is_public_or_names_its_abilities(app):
    from app.extensions import api

    with app.app_context():
        spec = api.spec.to_dict()
    undeclared = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            if op.get("security") == [] or "x-abilities" in op:
                continue
            undeclared.append(f"{method.upper()} {path}")
    assert undeclared == [], "declare @requires(...) (or @public) on: " + ", ".join(undeclared)


@pytest.mark.parametrize("ability", ["runs:start", "projects:read"])
def test_the_abilities_of_the_table_are_enforced(client, member, project, ability):
    """A route's declared abilities are what it checks (spot check on two of the table's)."""
    token = _pat(
        client, member.headers, [a for a in ("runs:start", "projects:read") if a != ability]
    )
    headers = _bearer(token.get_json()["token"])
    if ability == "runs:start":
        resp = client.post(
            "/api/v1/tasks", headers=headers, json={"project": "demo", "title": "t", "prompt": "p"}
        )
    else:
        resp = client.get("/api/v1/tasks", headers=headers)
    assert_problem(resp, 403)
