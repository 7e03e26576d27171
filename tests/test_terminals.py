"""Terminals end to end: a PTY task on the real worker pool, people attached over real
WebSockets to a live gunicorn; keystrokes and resizes through Redis to the worker holding the
PTY; many viewers and one controller; every refusal before the socket opens."""

from __future__ import annotations

import json
import time

from helpers import wait_for
from simple_websocket import Client
from test_execution import create, log_text, wait_status


class Attached:
    """A person's socket: JSON frames and output bytes, read as they come."""

    def __init__(self, live, run_id, token, takeover=False):
        url = f"ws://127.0.0.1:{live.port}/api/v1/runs/{run_id}/terminal?token={token}"
        self.ws = Client.connect(url + ("&takeover=1" if takeover else ""))
        self.output = bytearray()
        self.frames: list[dict] = []
        self.hello = self.expect("hello")

    def pump(self, timeout=0.2):
        raw = self.ws.receive(timeout=timeout)
        if isinstance(raw, bytes):
            self.output += raw
        elif raw is not None:
            self.frames.append(json.loads(raw))
        return raw

    def expect(self, kind, timeout=10.0, **match):
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for frame in self.frames[seen:]:
                if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                    return frame
            seen = len(self.frames)
            assert time.monotonic() < deadline, f"no {kind} frame; got {self.frames}"
            self.pump()

    def wait_output(self, text, timeout=10.0):
        deadline = time.monotonic() + timeout
        while text.encode() not in self.output:
            assert time.monotonic() < deadline, f"no {text!r} in {bytes(self.output)!r}"
            self.pump()

    def type(self, text):
        self.ws.send(text.encode())

    def send(self, **frame):
        self.ws.send(json.dumps(frame))

    def close(self):
        self.ws.close()


def token(client, acct, run_id, mode="view"):
    resp = client.post(
        f"/api/v1/runs/{run_id}/terminal-token", json={"mode": mode}, headers=acct.headers
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()["token"]


def running_asker(client, acct):
    task = create(client, acct, agent="shell", prompt="asker", tty=True)
    wait_status(client, acct, task["id"], "running")
    return task["latest_run_id"]


def test_a_controller_types_into_the_agent_and_everyone_sees_it(client, member, project, worker, live):
    run_id = running_asker(client, member)
    ctl = Attached(live, run_id, token(client, member, run_id, "control"))
    assert ctl.hello["mode"] == "control"
    assert (ctl.hello["cols"], ctl.hello["rows"]) == (120, 40)
    ctl.wait_output("name? ")  # the scrollback
    viewer = Attached(live, run_id, token(client, member, run_id, "view"))
    assert viewer.hello["controller"]["username"] == member.username
    viewer.wait_output("name? ")

    ctl.type("ada\r")
    ctl.wait_output("hello ada")
    viewer.wait_output("hello ada")
    wait_for(lambda: "hello ada" in log_text(client, member, run_id)[0], timeout=10)

    ctl.send(type="resize", cols=100, rows=30)
    ctl.expect("resize", cols=100, rows=30)
    viewer.expect("resize", cols=100, rows=30)
    ctl.type("stty size\r")
    ctl.wait_output("30 100")

    # a viewer's keystrokes reach nobody
    viewer.type("rm -rf nothing\r")
    assert "viewers cannot type" in viewer.expect("error")["detail"]

    ctl.type("quit\r")
    exit_frame = ctl.expect("exit")
    assert exit_frame["status"] == "succeeded" and exit_frame["exit_code"] == 0
    viewer.expect("exit")
    log = log_text(client, member, run_id)[0]
    assert "rm -rf nothing" not in log
    events = client.get(f"/api/v1/runs/{run_id}/events", headers=member.headers).get_json()
    kinds = [e["type"] for e in events["data"]]
    assert "terminal_control" in kinds and "terminal_resize" in kinds
