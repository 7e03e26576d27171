"""Live streams: run logs, task fan-in and the activity feed, resumable without gaps."""

import pytest
from helpers import account, assert_problem, unreachable_redis, wait_for
from sse import Reader
from test_execution import create, log_text, task, wait_status


@pytest.fixture(autouse=True)
def quick_pings(app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_STREAM_PING_SECONDS", 1)


def open_stream(client, url, acct, last_id=None):
    headers = dict(acct.headers)
    if last_id:
        headers["Last-Event-ID"] = last_id
    resp = client.get(url, headers=headers, buffered=False)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["X-Accel-Buffering"] == "no"
    return Reader(resp)


def test_finished_run_streams_everything_then_done(client, member, project, worker):
    t = create(client, member, agent="claude", prompt="stream me")
    done = wait_status(client, member, t["id"], ("completed", "failed"))
    run = done["runs"][0]
    frames = open_stream(client, f"/api/v1/runs/{run['id']}/stream", member).take(
        lambda f: f.event == "done"
    )
    text = "".join(f.data["text"] for f in frames if f.event == "log")
    assert text == log_text(client, member, run["id"])[0]
    assert [f.data["seq"] for f in frames if f.event == "event"] == list(range(1, 10))
    assert [f.data["status"] for f in frames if f.event == "status"] == ["succeeded"]
    assert frames[-1].event == "done" and frames[-1].data["status"] == "succeeded"
    assert frames[-1].id == f"{run['log_size']}-9"


def test_live_stream_resumes_without_gap_or_duplicate(client, member, project, worker):
    script = (
        'for i in $(seq 1 10000); do echo "line $i"; '
        "[ $((i % 1000)) = 0 ] && sleep 0.15; done; true"
    )
    t = create(client, member, prompt=script)
    running = wait_status(client, member, t["id"], "running")
    run_id = running["latest_run_id"]
    url = f"/api/v1/runs/{run_id}/stream"
    received, last_id, reconnects = "", None, 0
    while True:
        reader = open_stream(client, url, member, last_id)
        got = 0
        finished = False
        for frame in reader:
            if frame.id:
                last_id = frame.id
            if frame.event == "log":
                assert frame.data["offset"] == len(received.encode())
                received += frame.data["text"]
                got += 1
            if frame.event == "done":
                finished = True
                break
            if got >= 3 and reconnects < 6:  # drop the connection mid-stream
                break
        reader.close()
        if finished:
            break
        reconnects += 1
    assert reconnects >= 3
    stored = log_text(client, member, run_id)[0]
    assert received == stored
    assert received.splitlines() == [f"line {i}" for i in range(1, 10001)]


def test_task_stream_fans_in_retries(client, member, project, worker):
    t = create(
        client,
        member,
        max_attempts=2,
        prompt='echo "attempt $SWITCHBOARD_ATTEMPT"; [ "$SWITCHBOARD_ATTEMPT" = 2 ]',
    )
    frames = open_stream(client, f"/api/v1/tasks/{t['id']}/stream", member).take(
        lambda f: f.event == "done"
    )
    logs = [(f.data["run_id"], f.data["text"]) for f in frames if f.event == "log"]
    runs = task(client, member, t["id"])["runs"]
    assert logs == [(runs[0]["id"], "attempt 1\n"), (runs[1]["id"], "attempt 2\n")]
    statuses = [(f.data["run_id"], f.data["status"]) for f in frames if f.event == "status"]
    assert (runs[0]["id"], "failed") in statuses and (runs[1]["id"], "succeeded") in statuses
    assert frames[-1].data["status"] == "completed"
    # resume after the first run: only the second run comes again
    first_end = next(f.id for f in frames if f.event == "log" and f.data["run_id"] == runs[0]["id"])
    again = open_stream(client, f"/api/v1/tasks/{t['id']}/stream", member, first_end).take(
        lambda f: f.event == "done"
    )
    assert [(f.data["run_id"], f.data["text"]) for f in again if f.event == "log"] == [
        (runs[1]["id"], "attempt 2\n")
    ]


def test_activity_feed_respects_projects(client, app, member, project):
    bob = account(app, client, "bob")
    client.post(
        "/api/v1/projects",
        headers=bob.headers,
        json={"key": "other", "name": "Other", "default_agent": "shell"},
    )
    alice_feed = open_stream(client, "/api/v1/stream", member)
    bob_feed = open_stream(client, "/api/v1/stream", bob)
    mine = create(client, member, title="alice-task", prompt="x", target="external")
    theirs = client.post(
        "/api/v1/tasks",
        headers=bob.headers,
        json={"project": "other", "title": "bob-task", "prompt": "x", "target": "external"},
    ).get_json()
    a = alice_feed.take(lambda f: f.event == "task.created")
    b = bob_feed.take(lambda f: f.event == "task.created")
    assert a[-1].data["data"]["task_id"] == mine["id"]
    assert b[-1].data["data"]["task_id"] == theirs["id"]
    # alice's feed never carries bob's project: the next thing she sees is her own cancel
    client.post(f"/api/v1/tasks/{theirs['id']}/cancel", headers=bob.headers)
    client.post(f"/api/v1/tasks/{mine['id']}/cancel", headers=member.headers)
    rest = alice_feed.take(
        lambda f: f.event == "task.status" and f.data["data"]["status"] == "cancelled"
    )
    assert all(
        f.data.get("project_id") != theirs
        and (f.data.get("data") or {}).get("task_id") != theirs["id"]
        for f in a + rest
        if f.data
    )
    # resuming from an id replays what came after it
    replay = open_stream(client, "/api/v1/stream", member, a[-1].id).take(
        lambda f: f.event == "task.status" and f.data["data"]["status"] == "cancelled"
    )
    assert {f.data["data"]["task_id"] for f in replay if f.data} == {mine["id"]}
    for feed in (alice_feed, bob_feed):
        feed.close()


def test_stream_token_for_eventsource(client, member, project):
    t = create(client, member, prompt="x", target="external")
    path = f"/api/v1/tasks/{t['id']}/stream"
    resp = client.post("/api/v1/auth/stream-token", json={"path": path}, headers=member.headers)
    assert resp.status_code == 201
    token = resp.get_json()["token"]
    assert resp.get_json()["expires_in"] == 60
    ok = client.get(f"{path}?stream_token={token}", buffered=False)
    assert ok.status_code == 200
    ok.close()
    assert_problem(client.get(f"/api/v1/stream?stream_token={token}"), 401)  # other path
    assert_problem(client.get(f"/api/v1/me?stream_token={token}"), 401)  # not a stream
    assert_problem(client.get(f"{path}?stream_token=garbage"), 401)
    assert_problem(
        client.post(
            "/api/v1/auth/stream-token", json={"path": "/etc/passwd"}, headers=member.headers
        ),
        422,
    )


def test_per_user_stream_cap(client, member, project, app, monkeypatch):
    monkeypatch.setitem(app.config, "SWITCHBOARD_STREAM_CAP", 2)
    streams = [open_stream(client, "/api/v1/stream", member) for _ in range(2)]
    assert_problem(client.get("/api/v1/stream", headers=member.headers), 429)
    streams[0].close()
    third = open_stream(client, "/api/v1/stream", member)
    for s in (streams[1], third):
        s.close()


def test_subscriptions_are_released(client, member, project, app):
    from app.live.hub import hub

    with app.app_context():
        h = hub()
    before = h.channel_count()
    readers = [open_stream(client, "/api/v1/stream", member) for _ in range(3)]
    for r in readers:
        frames = iter(r)
        next(frames)  # ": stream open"
        next(frames)  # the first ping: the stream is subscribed and waiting
    # two Redis channels, shared by the three: the feed's and the person's (notifications)
    assert h.channel_count() == before + 2
    for r in readers:
        r.close()
    wait_for(lambda: h.channel_count() == before, timeout=5)


def test_a_stream_asked_for_while_redis_is_away_is_a_503_to_retry(
    client, member, project, app, monkeypatch
):
    """Streams need Redis: while it restarts, the answer says so and when to try again."""
    import redis

    t = create(client, member, prompt="x", target="external")
    run = client.post(
        f"/api/v1/tasks/{t['id']}/claim", json={"executor": "e"}, headers=member.headers
    ).get_json()
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    monkeypatch.setitem(app.extensions, "switchboard_redis", dead)
    resp = client.get(f"/api/v1/runs/{run['id']}/stream", headers=member.headers)
    body = assert_problem(resp, 503, "service_unavailable")
    assert resp.headers["Retry-After"] == "1" and body["detail"].startswith("Redis is unavailable")


def test_while_redis_is_away_only_the_first_request_waits_for_it(
    client, member, project, app, monkeypatch
):
    """Notifications and jobs are skipped for a moment after Redis failed, instead of every
    request waiting for the client's retries; the runs are queued again by the sweep."""
    from app.live import pubsub

    dead, asked = unreachable_redis()
    monkeypatch.setitem(app.extensions, "switchboard_redis", dead)
    monkeypatch.setitem(app.extensions, "switchboard_queues", {})
    monkeypatch.setattr(pubsub, "REDIS_BACKOFF_SECONDS", 30.0)
    seen = []
    for _ in range(4):
        created = create(client, member, prompt="echo hi")  # the view: Redis after the commit
        assert created["status"] == "queued"
        seen.append(len(asked))
    assert seen[0] > 0, seen  # the first one did try
    assert seen[1:] == [seen[0]] * 3, seen  # the others did not ask Redis at all


def test_attack_a_line_without_end_costs_linear_time_and_bounded_memory():
    """An agent printing megabytes without a newline: each chunk is copied once (it was the
    whole line so far with every chunk), and past the limit the line is not kept at all."""
    from app.agents.lines import Lines

    lines = Lines(limit=1024 * 1024)
    chunk = b"x" * 4096
    for i in range(5_000):  # 20 MB
        assert lines.feed(chunk) == []
        assert len(lines.partial) <= 1024 * 1024, i
    assert lines.feed(b"tail\nnext line\nstart") == [b"next line"]  # the long one: not parsed
    assert lines.rest() == b"start"
    assert Lines().feed(b"a\nb") == [b"a"] and Lines().rest() == b""
