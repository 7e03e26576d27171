"""Outbound webhooks: signed deliveries to a real HTTP receiver, sent by a real worker, with
retries, dead letters, redelivery and the SSRF guard."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import assert_problem, wait_for
from servers import WorkerPool

from app.subscriptions import outbound
from app.webhooks.signatures import sign

LOOPBACK = "127.0.0.0/8"


class Receiver:
    """A local HTTP endpoint answering with scripted status codes (then the last one)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                status = (
                    receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0]
                )
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?team=a"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [h["X-Switchboard-Event"] for h, _ in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([200])
    yield r
    r.server.shutdown()


@pytest.fixture
def allow_loopback(app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS", LOOPBACK)


def pool(app, processes=0, schedule="0,0,0", **extra) -> WorkerPool:
    env = dict(
        SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS=LOOPBACK,
        SWITCHBOARD_WEBHOOK_RETRY_SCHEDULE=schedule,
        SWITCHBOARD_WEBHOOK_TIMEOUT_S="5",
        **extra,
    )
    if processes:
        return WorkerPool(app, processes=processes, **env)
    return WorkerPool(app, processes=1, queues="events", **env)


def subscribe(client, admin, url, events=("task.created",), **extra) -> dict:
    resp = client.post(
        "/api/v1/subscriptions",
        headers=admin.headers,
        json={"url": url, "events": list(events), **extra},
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def new_task(client, member, **extra) -> dict:
    body = {"project": "demo", "title": "t", "prompt": "echo hi", "target": "external", **extra}
    resp = client.post("/api/v1/tasks", headers=member.headers, json=body)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def deliveries(client, admin, sub_id) -> list[dict]:
    resp = client.get(f"/api/v1/subscriptions/{sub_id}/deliveries", headers=admin.headers)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["data"]


def state_is(client, admin, sub_id, state):
    return lambda: (d := deliveries(client, admin, sub_id)) and d[0]["state"] == state and d[0]


def test_failures_are_retried_until_delivered(
    app, client, admin, member, project, receiver, allow_loopback
):
    receiver.statuses = [500, 500, 200]
    sub = subscribe(client, admin, receiver.url)
    assert len(sub["secret"]) >= 32
    listed = client.get("/api/v1/subscriptions", headers=admin.headers).get_json()["data"]
    assert "secret" not in listed[0]
    workers = pool(app)
    try:
        task = new_task(client, member)
        done = wait_for(state_is(client, admin, sub["id"], "delivered"), timeout=20)
    finally:
        workers.stop()
    assert [a["status_code"] for a in done["history"]] == [500, 500, 200]
    assert done["attempts"] == 3 and done["history"][0]["error"].startswith("HTTP 500")
    # every attempt: the same delivery id, a valid signature over the exact body
    assert len({h["X-Switchboard-Delivery"] for h, _ in receiver.requests}) == 1
    for headers, body in receiver.requests:
        assert headers["X-Switchboard-Signature-256"] == sign(sub["secret"], body)
        assert headers["X-Switchboard-Event"] == "task.created"
        assert headers["X-Switchboard-Delivery"] == done["delivery"]
    sent = json.loads(receiver.requests[-1][1])
    assert sent["event"] == "task.created" and sent["project"] == "demo"
    assert sent["data"]["task_id"] == task["id"]


def test_dead_letter_after_the_schedule_then_redeliver(
    app, client, admin, member, project, receiver, allow_loopback
):
    receiver.statuses = [503]
    sub = subscribe(client, admin, receiver.url)
    # one retry 1 s later: the maintenance sweep queues it when it is due
    workers = pool(app, schedule="1", SWITCHBOARD_SWEEP_INTERVAL="1")
    try:
        new_task(client, member)
        dead = wait_for(state_is(client, admin, sub["id"], "dead"), timeout=20)
        assert [a["status_code"] for a in dead["history"]] == [503, 503]
        gap = dead["history"][1]["at"] > dead["history"][0]["at"]
        assert gap
        receiver.statuses = [200]
        resp = client.post(f"/api/v1/deliveries/{dead['id']}/redeliver", headers=admin.headers)
        assert resp.status_code == 202 and resp.get_json()["state"] == "pending"
        done = wait_for(state_is(client, admin, sub["id"], "delivered"), timeout=20)
    finally:
        workers.stop()
    assert [a["status_code"] for a in done["history"]] == [503, 503, 200]
    assert [a["number"] for a in done["history"]] == [1, 2, 3]
    assert_problem(
        client.post(f"/api/v1/deliveries/{dead['id']}/redeliver", headers=member.headers), 403
    )


def test_run_and_task_events_from_a_real_run(
    app, client, admin, member, project, receiver, allow_loopback
):
    sub = subscribe(client, admin, receiver.url, events=["*"], project="demo")
    workers = pool(app, processes=1)
    try:
        new_task(client, member, target="pool")
        wanted = {"task.created", "run.started", "run.finished", "task.finished"}
        wait_for(lambda: wanted <= set(receiver.events()), timeout=30)
    finally:
        workers.stop()
    bodies = {json.loads(b)["event"]: json.loads(b) for _, b in receiver.requests}
    assert bodies["run.finished"]["data"]["status"] == "succeeded"
    assert bodies["task.finished"]["data"]["status"] == "completed"
    assert sub["project"] == "demo"


def test_private_targets_are_refused(client, admin, member):
    for url in (
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:9/hook",
        "ftp://example.com/hook",
    ):
        resp = client.post(
            "/api/v1/subscriptions",
            headers=admin.headers,
            json={"url": url, "events": ["task.created"]},
        )
        assert_problem(resp, 422)
    assert_problem(
        client.post(
            "/api/v1/subscriptions",
            headers=member.headers,
            json={"url": "https://example.com/", "events": ["task.created"]},
        ),
        403,
    )
    # checked again when sending, so a name that resolves to loopback later is refused too
    result = outbound.post("http://localhost:9/x", b"{}", {}, timeout=2, allowed=[])
    assert result.status is None and result.error.startswith("refused:")


def test_subscription_changes(client, admin, allow_loopback, receiver):
    sub = subscribe(client, admin, receiver.url)
    resp = client.patch(
        f"/api/v1/subscriptions/{sub['id']}",
        headers=admin.headers,
        json={"events": ["run.finished", "task.finished"], "active": False},
    )
    assert resp.status_code == 200
    assert resp.get_json()["events"] == ["run.finished", "task.finished"]
    assert_problem(
        client.patch(
            f"/api/v1/subscriptions/{sub['id']}", headers=admin.headers, json={"events": ["nope"]}
        ),
        422,
    )
    assert (
        client.delete(f"/api/v1/subscriptions/{sub['id']}", headers=admin.headers).status_code
        == 204
    )
    assert_problem(client.get(f"/api/v1/subscriptions/{sub['id']}", headers=admin.headers), 404)
