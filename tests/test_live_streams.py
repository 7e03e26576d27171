"""Streams over real sockets: a live gunicorn, a real worker pool, and (when Debian's Chromium is
installed) a real browser's EventSource."""

import http.client
import shutil
import threading

import pytest
import redis
from helpers import wait_for
from servers import LiveServer
from sse import parse
from test_execution import create, task, wait_status


def _stream(live, path, headers, timeout=20):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=timeout)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


def _frames(resp):
    buf = b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            frame = parse(block)
            if frame is not None:
                yield frame


@pytest.mark.parametrize("when", ["before it starts", "while it runs"])
def test_lines_arrive_while_the_agent_runs(client, member, project, worker, live, when):
    t = create(client, member, prompt="echo first; sleep 2; echo second")
    if when == "while it runs":
        run_id = wait_status(client, member, t["id"], "running")["latest_run_id"]
        path = f"/api/v1/runs/{run_id}/stream"
    else:
        path = f"/api/v1/tasks/{t['id']}/stream"  # subscribed before the run is even taken
    conn, resp = _stream(live, path, member.headers)
    assert resp.getheader("Content-Type").startswith("text/event-stream")
    assert resp.getheader("X-Accel-Buffering") == "no"
    text = ""
    for frame in _frames(resp):
        if frame.event == "log":
            text += frame.data["text"]
            if text == "first\n":
                # it arrives while the agent still sleeps before "second": its run goes on
                assert task(client, member, t["id"])["runs"][0]["finished_at"] is None
        if frame.event == "done":
            break
    conn.close()
    assert text == "first\nsecond\n"


def test_many_live_subscribers_get_every_byte_once(client, member, project, worker, app):
    """Through gunicorn, caught-up streams are written by the hub while their threads sleep
    (parked): every subscriber, including one that keeps disconnecting and resuming with
    Last-Event-ID, must end with exactly the stored log."""
    script = (
        "for i in $(seq 1 3000); do echo line-$i; "
        "if [ $((i % 150)) = 0 ]; then sleep 0.05; fi; done"
    )
    live = LiveServer(app, SWITCHBOARD_STREAM_CAP="100")
    t = create(client, member, prompt=script)
    run_id = wait_status(client, member, t["id"], "running")["latest_run_id"]
    path = f"/api/v1/runs/{run_id}/stream"
    texts: dict[int, str] = {}

    def follow(n: int) -> None:
        conn, resp = _stream(live, path, member.headers, timeout=30)
        text = ""
        for frame in _frames(resp):
            if frame.event == "log":
                text += frame.data["text"]
            if frame.event == "done":
                break
        conn.close()
        texts[n] = text

    def hop() -> None:
        """Reads a few frames, hangs up, resumes from the last id, until done."""
        text, last, done = "", None, False
        while not done:
            headers = dict(member.headers, **({"Last-Event-ID": last} if last else {}))
            conn, resp = _stream(live, path, headers, timeout=30)
            for i, frame in enumerate(_frames(resp)):
                if frame.event == "log":
                    text += frame.data["text"]
                last = frame.id or last
                if frame.event == "done":
                    done = True
                    break
                if i >= 5:
                    break
            conn.close()
        texts[-1] = text

    threads = [threading.Thread(target=follow, args=(n,)) for n in range(3)]
    threads.append(threading.Thread(target=hop))
    for th in threads:
        th.start()
    try:
        for th in threads:
            th.join(timeout=60)
    finally:
        live.stop()
    stored = client.get(f"/api/v1/runs/{run_id}/log?limit=1048576", headers=member.headers)
    expected = "".join(f"line-{i}\n" for i in range(1, 3001))
    assert stored.get_json()["text"] == expected
    assert sorted(texts) == [-1, 0, 1, 2]
    for n, text in texts.items():
        assert text == expected, (n, len(text))


def test_clients_leave_no_threads_or_subscriptions(app, client, member, project):
    server = LiveServer(app, SWITCHBOARD_STREAM_CAP="1000", SWITCHBOARD_STREAMS_PER_PROCESS="16")
    try:
        t = create(client, member, prompt="x", target="external")
        with app.app_context():
            from app.live.pubsub import run_channel

            channel = run_channel(t["latest_run_id"])
        path = f"/api/v1/runs/{t['latest_run_id']}/stream"
        r = redis.Redis.from_url(app.config["SWITCHBOARD_REDIS_URL"])

        def visit(n: int) -> None:
            for _ in range(n):
                conn, resp = _stream(server, path, member.headers)
                next(_frames(resp))  # the stream is open
                conn.close()

        # warm-up: every gunicorn thread and the stream hub exist, then measure the baseline
        threads = [threading.Thread(target=visit, args=(1,)) for _ in range(16)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wait_for(lambda: r.pubsub_numsub(channel)[0][1] == 0, timeout=30)
        baseline = server.threads()
        threads = [threading.Thread(target=visit, args=(10,)) for _ in range(10)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wait_for(
            lambda: r.pubsub_numsub(channel)[0][1] == 0 and server.threads() == baseline, timeout=30
        )
    finally:
        server.stop()


def test_stream_token_never_logged(client, member, project, live):
    t = create(client, member, prompt="x", target="external")
    path = f"/api/v1/tasks/{t['id']}/stream"
    token = client.post(
        "/api/v1/auth/stream-token", json={"path": path}, headers=member.headers
    ).get_json()["token"]
    conn, resp = _stream(live, f"{path}?stream_token={token}", {})
    next(_frames(resp))
    conn.close()
    wait_for(lambda: f"GET {path}" in live.output(), timeout=5)
    assert token not in live.output()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (CI installs it)")
def test_browser_eventsource_with_stream_token(client, member, project, worker, live):
    from playwright.sync_api import sync_playwright

    t = create(client, member, prompt="for i in 1 2 3; do echo browser $i; sleep 0.3; done")
    run_id = wait_status(client, member, t["id"], ("running", "completed"))["latest_run_id"]
    path = f"/api/v1/runs/{run_id}/stream"
    token = client.post(
        "/api/v1/auth/stream-token", json={"path": path}, headers=member.headers
    ).get_json()["token"]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(f"{live.url}/api/v1/health")
            text = page.evaluate(
                """url => new Promise((resolve, reject) => {
                    const source = new EventSource(url);
                    let text = "";
                    source.addEventListener("log", e => { text += JSON.parse(e.data).text; });
                    source.addEventListener("done", () => { source.close(); resolve(text); });
                    setTimeout(() => reject(new Error("no done event: " + text)), 20000);
                })""",
                f"{path}?stream_token={token}",
            )
        finally:
            browser.close()
    assert text == "browser 1\nbrowser 2\nbrowser 3\n"
