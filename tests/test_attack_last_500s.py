"""Security issue, item 9: input built to crash the server gets a 400/422 problem+json and
changes nothing — JSON nested 10,000 deep, cursors and Last-Event-IDs beyond any integer column,
lone UTF-16 surrogates, integers of thousands of digits, NaN and Infinity."""

from __future__ import annotations

import json

import pytest
from helpers import assert_problem, count
from test_webhooks import deliver, fixture

from app.pagination import encode_cursor
from app.tasks.models import Task
from app.webhooks.models import WebhookEvent

DEEP = "[" * 10_000 + "]" * 10_000


def _post_raw(client, path, text, headers=None):
    return client.post(
        path, data=text.encode(), headers=headers or {}, content_type="application/json"
    )


@pytest.mark.parametrize("path", ["/api/v1/auth/login", "/api/v1/auth/refresh", "/api/v1/tasks"])
def test_attack_json_nested_10000_deep(app, client, member, project, path):
    body = '{"username": "alice", "password": "x", "refresh_token": "x", "prompt": ' + DEEP + "}"
    resp = _post_raw(client, path, body, member.headers)
    assert_problem(resp, 400)
    assert "nests deeper than 64" in resp.get_json()["detail"]
    assert count(app, Task) == 0


def test_attack_json_nested_10000_deep_to_the_webhook_receiver(app, client, gh):
    payload = fixture("issues.labeled")
    payload["issue"]["body"] = json.loads("[" * 60 + "]" * 60)  # deep, but within the limit
    assert deliver(client, payload, "issues").status_code in (200, 202)
    stored = count(app, WebhookEvent)
    body = '{"action": "labeled", "x": ' + DEEP + "}"
    from helpers import GH_SECRET

    from app.webhooks.signatures import sign

    resp = client.post(
        "/api/v1/webhooks/gh",
        data=body.encode(),
        headers={
            "X-GitHub-Event": "issues",
            "X-GitHub-Delivery": "deep-1",
            "X-Hub-Signature-256": sign(GH_SECRET, body.encode()),
        },
        content_type="application/json",
    )
    assert_problem(resp, 400)
    assert count(app, WebhookEvent) == stored


def test_attack_cursor_beyond_any_integer(client, member, project):
    for path in ("/api/v1/tasks", "/api/v1/runs", "/api/v1/projects", "/api/v1/me/tokens"):
        for value in (2**64, -(2**64), 10**30):
            resp = client.get(f"{path}?cursor={encode_cursor(value)}", headers=member.headers)
            assert_problem(resp, 422)


def test_attack_last_event_id_of_25_digits(client, member, project):
    resp = client.get("/api/v1/stream", headers={**member.headers, "Last-Event-ID": "9" * 25})
    assert_problem(resp, 422)


def test_attack_lone_surrogate_in_a_title(app, client, member, project):
    for text in ('"\\ud800"', '"a\\udfff"', '"\\ud800\\u0041"'):
        body = '{"project": "demo", "title": ' + text + ', "prompt": "p"}'
        resp = _post_raw(client, "/api/v1/tasks", body, member.headers)
        assert_problem(resp, 400)
        assert "surrogate" in resp.get_json()["detail"]
    ok = '{"project": "demo", "title": "\\ud83d\\ude00 fine", "prompt": "p", "target": "external"}'
    assert _post_raw(client, "/api/v1/tasks", ok, member.headers).status_code == 201
    assert count(app, Task) == 1


def test_attack_integer_of_5000_digits_in_config(app, client, member, project):
    body = '{"project": "demo", "title": "t", "prompt": "p", "config": {"n": ' + "7" * 5000 + "}}"
    resp = _post_raw(client, "/api/v1/tasks", body, member.headers)
    assert_problem(resp, 400)
    assert count(app, Task) == 0


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_attack_nan_and_infinity(app, client, member, project, gh, constant):
    body = '{"project": "demo", "title": "t", "prompt": "p", "config": {"x": ' + constant + "}}"
    assert_problem(_post_raw(client, "/api/v1/tasks", body, member.headers), 400)
    assert count(app, Task) == 0
    from helpers import GH_SECRET

    from app.webhooks.signatures import sign

    delivery = ('{"action": "labeled", "n": ' + constant + "}").encode()
    resp = client.post(
        "/api/v1/webhooks/gh",
        data=delivery,
        headers={
            "X-GitHub-Event": "issues",
            "X-GitHub-Delivery": f"nan-{constant}",
            "X-Hub-Signature-256": sign(GH_SECRET, delivery),
        },
        content_type="application/json",
    )
    assert_problem(resp, 400)
    assert count(app, WebhookEvent) == 0
