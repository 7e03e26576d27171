"""Notifications: made in the transaction of what they report, one per event and user; sent by
email through a real SMTP server on loopback (aiosmtpd) and to a chat webhook on loopback by
RQ jobs on the real worker pool; settings; the hourly cap folding the rest into a digest."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from aiosmtpd.controller import Controller
from helpers import account, assert_problem, free_port, wait_for
from servers import WorkerPool
from test_execution import create, wait_status
from test_terminals import add_member


class Inbox:
    def __init__(self):
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append((envelope.rcpt_tos, envelope.content.decode("utf-8", "replace")))
        return "250 OK"


@pytest.fixture
def smtp():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    inbox.url = f"smtp://127.0.0.1:{controller.port}"
    yield inbox
    controller.stop()


class Chat(BaseHTTPRequestHandler):
    posts: list = []

    def do_POST(self):
        Chat.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def chat():
    Chat.posts = []
    server = HTTPServer(("127.0.0.1", 0), Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/T000/B000"
    server.shutdown()


@pytest.fixture
def notifying(app, client, live, smtp):
    pool = WorkerPool(
        app,
        SWITCHBOARD_PUBLIC_URL=live.url,
        SWITCHBOARD_SMTP_URL=smtp.url,
        SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS="127.0.0.0/8",
    )
    yield pool
    pool.stop()
    print("---- worker output ----\n" + pool.output())


def inbox_of(client, acct, unread=False):
    resp = client.get(
        f"/api/v1/notifications{'?unread=true' if unread else ''}", headers=acct.headers
    )
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


def test_developers_are_told_of_a_question_in_app_by_email_and_in_chat(
    app, client, member, project, smtp, chat, notifying, monkeypatch
):
    # the chat webhook is on loopback: allowed here as the worker allows it
    monkeypatch.setitem(app.config, "SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    dev = account(app, client, "dan")
    add_member(client, member, dev, "developer")
    viewer = account(app, client, "vera")
    add_member(client, member, viewer, "viewer")
    resp = client.put(
        "/api/v1/me/notification-settings",
        json={"chat_url": chat, "channels": {"question": {"email": False}}},
        headers=dev.headers,
    )
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["channels"]["question"] == {"in_app": True, "email": False, "chat": True}
    task = create(client, member, prompt='switchboard ask "Ship it?"')
    wait_status(client, member, task["id"], "waiting", timeout=20)

    for acct in (member, dev):
        got = wait_for(lambda a=acct: inbox_of(client, a)["data"])
        assert got[0]["kind"] == "question" and "Ship it?" in got[0]["title"]
    assert inbox_of(client, viewer)["data"] == []  # viewers do not answer
    # the maintainer by email (the developer turned email off), the developer in chat
    wait_for(lambda: smtp.messages, timeout=15)
    (to, content), *others = smtp.messages
    assert to == [f"{member.username}@example.com"] and not others
    assert "Subject: [Switchboard] A question waits: Ship it?" in content
    wait_for(lambda: Chat.posts, timeout=15)
    assert "Ship it?" in Chat.posts[0]["text"]
    # read
    mine = inbox_of(client, dev)
    assert mine["meta"]["unread"] == 1
    note_id = mine["data"][0]["id"]
    assert (
        client.post(f"/api/v1/notifications/{note_id}/read", headers=dev.headers).status_code == 200
    )
    assert inbox_of(client, dev, unread=True)["data"] == []
    assert_problem(
        client.post(f"/api/v1/notifications/{note_id}/read", headers=member.headers), 404
    )
    done = client.post("/api/v1/notifications/read-all", headers=member.headers).get_json()
    assert done == {"read": 1}


def test_a_failed_task_tells_its_creator(client, member, project, notifying):
    task = create(client, member, prompt="exit 3")
    wait_status(client, member, task["id"], "failed")
    got = wait_for(lambda: inbox_of(client, member)["data"])
    assert got[0]["kind"] == "task_failed" and got[0]["link"] == f"/api/v1/tasks/{task['id']}"


def test_one_email_per_event_however_often_sent_and_the_hourly_cap_folds_the_rest(
    app, client, member, project, smtp
):
    from app.database import db
    from app.notifications import service
    from app.notifications.models import Notification

    app.config.update(SWITCHBOARD_SMTP_URL=smtp.url, SWITCHBOARD_NOTIFY_EMAILS_PER_HOUR=1)
    try:
        with app.app_context():
            made = []
            for i in range(3):
                for _ in range(2):  # the same event twice: one notification
                    made += service.notify(
                        [member.id], "task_failed", f"task_failed:{i}:1", title=f"failed {i}",
                        body="b", link=None, project_id=None, data={},
                    )  # fmt: skip
            db.session.commit()
            assert len(made) == 3
            ids = [n.id for n in made]
            assert service.send(ids[0]) == "emailed"
            assert service.send(ids[0]) == "nothing"  # a retried job sends nothing twice
            assert service.send(ids[1]) == "folded"  # past the cap
            assert service.send(ids[2]) == "folded"
            assert len(smtp.messages) == 1
            # an hour later: the next email says what was folded
            first = db.session.get(Notification, ids[0])
            first.emailed_at = first.emailed_at - timedelta(hours=2)
            db.session.commit()
            later = service.notify(
                [member.id], "task_failed", "task_failed:9:1", title="failed 9", body="b",
                link=None, project_id=None, data={},
            )  # fmt: skip
            db.session.commit()
            assert service.send(later[0].id) == "emailed"
    finally:
        app.config.update(SWITCHBOARD_SMTP_URL="", SWITCHBOARD_NOTIFY_EMAILS_PER_HOUR=20)
    deadline = time.monotonic() + 5
    while len(smtp.messages) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "And 2 more since your last emails" in smtp.messages[1][1]


def test_attack_chat_url_to_a_private_address_is_refused(client, member):
    resp = client.put(
        "/api/v1/me/notification-settings",
        json={"chat_url": "http://169.254.169.254/latest/meta-data"},
        headers=member.headers,
    )
    assert_problem(resp, 422)


def test_a_review_request_reaches_the_projects_developers(
    app, client, member, smtp, notifying, tmp_path
):
    from helpers import bare_repo

    dev = account(app, client, "dan")
    resp = client.post(
        "/api/v1/projects",
        headers=member.headers,
        json={"key": "demo", "name": "Demo", "repo_url": str(bare_repo(tmp_path)),
              "default_agent": "shell"},
    )  # fmt: skip
    assert resp.status_code == 201
    add_member(client, member, dev, "developer")
    task = create(client, member, prompt="echo more >> README.md", title="tidy")
    done = wait_status(client, member, task["id"], "review", timeout=30)
    got = wait_for(lambda: inbox_of(client, member)["data"])
    assert (
        got[0]["kind"] == "review"
        and got[0]["link"] == f"/api/v1/runs/{done['latest_run_id']}/diff"
    )
    assert [n["kind"] for n in inbox_of(client, dev)["data"]] == ["review"]
    wait_for(lambda: len(smtp.messages) == 2, timeout=15)  # the maintainer's and the developer's
    assert all("A change waits for review: tidy" in content for _to, content in smtp.messages)


def test_a_notification_arrives_on_its_persons_activity_stream_only(
    app, client, member, project, live
):
    """In-app, live: the person's activity stream carries their notifications (and nobody
    else's)."""
    from test_live_streams import _stream

    from app.database import db
    from app.notifications import service

    other = account(app, client, "olga")
    streams = [_stream(live, "/api/v1/stream", acct.headers) for acct in (member, other)]

    def read_until(stream, needle, seconds):
        """What the stream sent until `needle` (or the time ran out)."""
        conn, resp = stream
        conn.sock.settimeout(seconds)
        seen = b""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while needle not in seen and time.monotonic() < deadline:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                seen += chunk
        return seen

    for stream in streams:  # a first ping: each stream listens now
        assert b":ping" in read_until(stream, b":ping", 10)
    with app.app_context():
        made = service.notify(
            [member.id], "task_failed", "task_failed:77:1", title="failed 77", body="b",
            link="/api/v1/tasks/77", project_id=None, data={"task_id": 77},
        )  # fmt: skip
        db.session.commit()
        note_id = made[0].id
    mine = read_until(streams[0], b"failed 77", 10)
    assert b"event: notification" in mine and f'"id":{note_id}'.encode() in mine
    theirs = read_until(streams[1], b"failed 77", 2.5)  # pings only
    assert b"notification" not in theirs and b"failed 77" not in theirs
    for conn, _resp in streams:
        conn.close()
