"""A deploy stops web processes with SIGTERM: open streams and long-polls are told to go
elsewhere at once, gunicorn exits in seconds (not at the platform's kill, 30 s), and a client
that reconnects with Last-Event-ID to the next process misses nothing."""

import http.client
import signal
import threading
import time

from servers import LiveServer
from sse import parse
from test_execution import create


def _open(live, path, headers):
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=20)
    conn.request("GET", path, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    return conn, resp


class Follower:
    """Reads a stream in a thread: its frames, its raw bytes, and when it ended."""

    def __init__(self, live, path, headers):
        self.conn, self.resp = _open(live, path, headers)
        self.raw = b""
        self.frames = []
        self.ended_at = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        buf = b""
        try:
            while chunk := self.resp.read1(65536):
                self.raw += chunk
                buf += chunk
                while b"\n\n" in buf:
                    block, buf = buf.split(b"\n\n", 1)
                    frame = parse(block)
                    if frame is not None and not frame.comment:
                        self.frames.append(frame)
        except OSError:
            pass
        self.ended_at = time.monotonic()

    def ids(self):
        return [int(f.id) for f in self.frames if f.id]

    def wait_for_id(self, ident, timeout=10):
        deadline = time.monotonic() + timeout
        while ident not in self.ids():
            assert time.monotonic() < deadline, (ident, self.ids())
            time.sleep(0.02)


def _activity_ids(app, project):
    """The project's activity as stored, oldest first."""
    from app.activity import service

    with app.app_context():
        return [row.id for row in service.since(0, [project["id"]])]


def test_sigterm_ends_streams_and_long_polls_at_once_and_clients_resume(
    app, client, member, project
):
    first = LiveServer(app, WEB_CONCURRENCY="2", SWITCHBOARD_STREAM_PING_SECONDS="15")
    try:
        queued = create(client, member, prompt="echo never runs: no worker here")
        activity = Follower(first, "/api/v1/stream", member.headers)
        between_runs = Follower(first, f"/api/v1/tasks/{queued['id']}/stream", member.headers)
        polled: dict = {}

        def long_poll():
            conn = http.client.HTTPConnection("127.0.0.1", first.port, timeout=40)
            conn.request(
                "GET", f"/api/v1/tasks/{queued['id']}?wait=30&status=queued", headers=member.headers
            )
            resp = conn.getresponse()
            polled["status"] = resp.status
            polled["at"] = time.monotonic()

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        seen = create(client, member, prompt="echo seen before the stop")
        last = _activity_ids(app, project)[-1]
        activity.wait_for_id(last)
        time.sleep(0.3)  # the long-poll is waiting in the server by now

        stopped_at = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        first.proc.wait(timeout=10)  # TimeoutExpired fails the test: 10 s at most
        exit_seconds = time.monotonic() - stopped_at
    finally:
        first.stop()
    for follower in (activity, between_runs):
        follower.thread.join(timeout=5)
        assert follower.ended_at is not None
        assert follower.raw.endswith(
            b"retry: 500\n: server restarting; reconnect with Last-Event-ID\n\n"
        ), follower.raw[-200:]
    poller.join(timeout=5)
    assert polled["status"] == 200 and polled["at"] - stopped_at < 5
    assert exit_seconds < 10, first.output()
    print(f"gunicorn exited {exit_seconds:.2f} s after SIGTERM")

    # while no web process runs, the work goes on (webhooks, the API of other processes)
    missed = [create(client, member, prompt=f"echo made while down {n}") for n in range(2)]
    expected = [i for i in _activity_ids(app, project) if i > last]
    assert len(expected) >= 2 and seen["id"] != missed[0]["id"]

    second = LiveServer(app)
    try:
        resumed = Follower(
            second, "/api/v1/stream", dict(member.headers, **{"Last-Event-ID": str(last)})
        )
        resumed.wait_for_id(expected[-1])
        assert resumed.ids() == expected  # every one, once, in order
    finally:
        second.stop()  # the stream ends with it
        resumed.thread.join(timeout=5)
        resumed.conn.close()


def test_an_idle_worker_pool_stops_at_once_on_sigterm(app):
    """Platforms kill what is still running a few seconds after SIGTERM (honcho after 5 s):
    an idle pool stops within a second or two (it took 10-60 s: RQ's command thread waited
    out its 60 s poll before the process could exit)."""
    from rq import Worker
    from servers import WorkerPool

    from app.queues import get_redis

    pool = WorkerPool(app, processes=2)
    try:
        with app.app_context():
            conn = get_redis()
        deadline = time.monotonic() + 30
        while Worker.count(connection=conn) < 3:
            assert time.monotonic() < deadline, pool.output()
            time.sleep(0.05)
        time.sleep(1.5)  # every process is idle, waiting for work
        stopped = time.monotonic()
        pool.proc.send_signal(signal.SIGTERM)
        pool.proc.wait(timeout=10)
        took = time.monotonic() - stopped
    finally:
        pool.stop()
    assert took < 3, (took, pool.output())
