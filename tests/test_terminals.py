"""Terminals end to end: a PTY task on the real worker pool, people attached over real
WebSockets to a live gunicorn; keystrokes and resizes through Redis to the worker holding the
PTY; many viewers and one controller; every refusal before the socket opens."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import time

import pytest
from helpers import account, wait_for
from simple_websocket import Client, ConnectionClosed
from test_execution import agent_pids, create, log_text, wait_status
from test_live_streams import _frames, _stream

from app.queues import get_redis
from app.terminals import relay, tokens
from app.terminals.service import controller


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

    def closed_with(self, timeout=5.0):
        """The close code, once the server has closed the socket."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ConnectionClosed):
            while self.ws.connected and time.monotonic() < deadline:
                self.pump()
        assert not self.ws.connected
        return self.ws.close_reason

    def type(self, text):
        self.ws.send(text.encode())

    def send(self, **frame):
        self.ws.send(json.dumps(frame))

    def close(self):
        self.ws.close()


def add_member(client, owner, acct, role):
    resp = client.post(
        "/api/v1/projects/demo/members",
        headers=owner.headers,
        json={"username": acct.username, "role": role},
    )
    assert resp.status_code == 201, resp.get_json()


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


def test_a_controller_types_into_the_agent_and_everyone_sees_it(
    client, member, project, worker, live
):
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


def test_output_typed_reaches_the_sse_stream_too(client, member, project, worker, live):
    run_id = running_asker(client, member)
    conn, resp = _stream(live, f"/api/v1/runs/{run_id}/stream", member.headers)
    text = ""
    frames = _frames(resp)
    ctl = Attached(live, run_id, token(client, member, run_id, "control"))
    ctl.wait_output("name? ")
    ctl.type("ada\r")
    for frame in frames:
        if frame.event == "log":
            text += frame.data["text"]
            if "hello ada" in text:
                break
    conn.close()
    ctl.type("quit\r")
    ctl.expect("exit")


def test_a_takeover_demotes_the_controller_and_is_audited(
    app, client, admin, member, project, worker, live
):
    dev = account(app, client, "dan")
    add_member(client, member, dev, "developer")
    run_id = running_asker(client, member)
    first = Attached(live, run_id, token(client, member, run_id, "control"))
    # a second controller is refused before its socket opens, unless it takes over
    refused = upgrade(live, run_id, token(client, dev, run_id, "control"))
    assert refused.status == 409 and refused.problem["controller"]["username"] == "alice"
    second = Attached(live, run_id, token(client, dev, run_id, "control"), takeover=True)
    assert second.hello["mode"] == "control"
    demoted = first.expect("control", mode="view")
    assert "dan took over" in demoted["detail"]
    first.type("from alice\r")
    assert "viewers cannot type" in first.expect("error")["detail"]
    second.type("dan\r")
    first.wait_output("hello dan")
    second.close()  # hands the keyboard back
    first.expect("control", action="release")
    entries = client.get(
        f"/api/v1/audit-logs?target_type=run&target_id={run_id}", headers=admin.headers
    ).get_json()["data"]
    actions = [(e["action"], e["actor_name"]) for e in entries]
    assert ("terminal.take", "alice") in actions
    assert ("terminal.takeover", "dan") in actions
    assert ("terminal.release", "dan") in actions
    wait_for(
        lambda: (
            "from alice" not in log_text(client, member, run_id)[0]
            and _events(client, member, run_id, "terminal_control") >= 3
        )
    )


def _events(client, acct, run_id, kind):
    data = client.get(f"/api/v1/runs/{run_id}/events", headers=acct.headers).get_json()["data"]
    return len([e for e in data if e["type"] == kind])


class Refusal:
    def __init__(self, status, problem):
        self.status, self.problem = status, problem


def upgrade(live, run_id, tok):
    """A WebSocket handshake by hand: the answer when the server refuses it."""
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
    conn.request(
        "GET",
        f"/api/v1/runs/{run_id}/terminal?token={tok}",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version": "13",
        },
    )
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.getheader("Content-Type") == "application/problem+json", (resp.status, body)
    return Refusal(resp.status, json.loads(body))


def test_attack_terminal_tokens_refused_before_the_socket_opens(
    app, client, member, project, worker, live
):
    viewer = account(app, client, "vera")
    add_member(client, member, viewer, "viewer")
    run_id = running_asker(client, member)
    other_run = running_asker(client, member)

    used = token(client, member, run_id, "control")
    Attached(live, run_id, used).close()
    assert upgrade(live, run_id, used).status == 401  # used twice

    expired = token(client, member, run_id, "view")
    with app.app_context():
        key = tokens._key(expired)
        assert get_redis().exists(key)
        get_redis().pexpire(key, 1)
        wait_for(lambda: not get_redis().exists(key), timeout=2)  # its 60 s are over
    assert upgrade(live, run_id, expired).status == 401

    for_other = token(client, member, other_run, "view")
    assert upgrade(live, run_id, for_other).status == 403  # a token for another run

    # a viewer may not ask for the keyboard, nor keep one asked for before being demoted
    resp = client.post(
        f"/api/v1/runs/{run_id}/terminal-token", json={"mode": "control"}, headers=viewer.headers
    )
    assert resp.status_code == 403
    assert resp.headers["Content-Type"] == "application/problem+json"
    dev = account(app, client, "dan")
    add_member(client, member, dev, "developer")
    asked = token(client, dev, run_id, "control")
    add_member(client, member, dev, "viewer")
    assert upgrade(live, run_id, asked).status == 403

    # a token with fewer abilities: read-only personal access token
    pat = client.post(
        "/api/v1/me/tokens",
        json={"label": "ro", "abilities": ["projects:read"]},
        headers=member.headers,
    ).get_json()["token"]
    resp = client.post(
        f"/api/v1/runs/{run_id}/terminal-token",
        json={"mode": "control"},
        headers={"Authorization": f"Bearer {pat}"},
    )
    assert resp.status_code == 403
    with app.app_context():
        assert get_redis().llen(relay.inbox_key(run_id)) == 0  # nothing typed reached it
        # the keyboard: handed back by the first (closed) socket, taken by none of the refused
        wait_for(lambda: controller(run_id) is None, timeout=5)


def test_attack_socket_outlives_access(app, client, member, project, worker, live):
    dev = account(app, client, "dan")
    add_member(client, member, dev, "developer")
    run_id = running_asker(client, member)
    watcher = Attached(live, run_id, token(client, dev, run_id, "view"))
    resp = client.delete(f"/api/v1/projects/demo/members/{dev.id}", headers=member.headers)
    assert resp.status_code == 204, resp.get_json()
    closed = watcher.expect("closed")
    assert closed["reason"] == "access_ended"
    assert watcher.closed_with() == 1008


def test_a_run_without_a_terminal_has_none_to_attach(client, member, project):
    task = create(client, member, agent="shell", prompt="true")
    resp = client.post(
        f"/api/v1/runs/{task['latest_run_id']}/terminal-token",
        json={"mode": "view"},
        headers=member.headers,
    )
    assert resp.status_code == 409 and "no terminal" in resp.get_json()["detail"]


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_stop_and_timeout_end_terminal_runs_like_pipe_runs(
    app, client, member, project, worker, how
):
    task = create(
        client,
        member,
        agent="shell",
        tty=True,
        prompt="sleep 600 & sleep 600",
        **({"timeout_s": 1} if how == "timeout" else {}),
    )
    run_id = wait_status(client, member, task["id"], "running")["latest_run_id"]
    wait_for(lambda: len(agent_pids(app, run_id)) >= 2)
    if how == "stop":
        assert client.post(f"/api/v1/runs/{run_id}/stop", headers=member.headers).status_code == 202
    done = wait_status(client, member, task["id"], ("cancelled", "failed"), timeout=10)
    assert done["runs"][0]["status"] == ("cancelled" if how == "stop" else "timed_out")
    wait_for(lambda: agent_pids(app, run_id) == [], timeout=3)


def test_switchboard_attach_types_and_detaches_leaving_the_run_running(
    client, member, project, worker, live
):
    import subprocess
    import sys
    from pathlib import Path

    import pexpect

    run_id = running_asker(client, member)
    pat = client.post(
        "/api/v1/me/tokens",
        json={"label": "cli", "abilities": ["projects:read", "runs:control"]},
        headers=member.headers,
    ).get_json()["token"]
    switchboard = str(Path(sys.executable).parent / "switchboard")
    child = pexpect.spawn(
        switchboard,
        ["attach", str(run_id), "--control", "--server", live.url, "--token", pat],
        dimensions=(30, 100),
        timeout=15,
    )
    try:
        child.expect_exact("Ctrl-] detaches")
        child.expect_exact("name? ")  # the scrollback
        child.send("ada\r")
        child.expect_exact("hello ada")
        child.send("stty size\r")  # the local terminal's size was sent on attach
        child.expect_exact("30 100")
        # a second controller is told why it may not, and how it could
        second = subprocess.run(
            [switchboard, "attach", str(run_id), "--control", "--server", live.url],
            env={**os.environ, "SWITCHBOARD_TOKEN": pat},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "409: someone else holds the keyboard (--takeover" in second.stderr
        child.send("\x1d")
        child.expect_exact("detached")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    run = client.get(f"/api/v1/runs/{run_id}", headers=member.headers).get_json()
    assert run["status"] == "running"  # detaching left it running
    assert "hello ada" in log_text(client, member, run_id)[0]


def test_a_machine_run_has_the_same_terminal(app, client, admin, member, project, tmp_path):
    """The terminal of a run on a machine: keys and resizes relayed as `pty_*` frames on its
    control channel by whichever web process holds it (two here), output back as its log."""
    from servers import LiveServer
    from test_machine_client import MachineProcess, _machine_online

    live2 = LiveServer(app, WEB_CONCURRENCY="2")
    box = MachineProcess(client, admin, live2, tmp_path, "m1")
    try:
        wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
        task = create(client, member, agent="shell", prompt="asker", tty=True, target="machine:m1")
        run_id = wait_status(client, member, task["id"], "running")["latest_run_id"]
        ctl = Attached(live2, run_id, token(client, member, run_id, "control"))
        viewer = Attached(live2, run_id, token(client, member, run_id, "view"))
        ctl.wait_output("name? ", timeout=15)
        ctl.type("ada\r")
        viewer.wait_output("hello ada")
        ctl.send(type="resize", cols=100, rows=30)
        viewer.expect("resize", cols=100, rows=30)
        ctl.type("stty size\r")
        ctl.wait_output("30 100")
        ctl.type("quit\r")
        assert ctl.expect("exit", timeout=15)["status"] == "succeeded"
        assert "hello ada" in log_text(client, member, run_id)[0]
        wait_for(lambda: _events(client, member, run_id, "terminal_resize") == 1)
        assert _events(client, member, run_id, "terminal_control") >= 1
    finally:
        box.stop()
        live2.stop()
        print("---- machine ----\n" + box.output())


def test_a_killed_worker_ends_its_terminal_run_and_the_sockets_on_it(
    app, client, member, project, worker, live
):
    """The `bash` agent runs in a terminal by default; its worker killed with -9, the run ends
    `lost` as any run does, and an attached socket is told so and closed, never left hanging."""
    import signal

    task = create(client, member, agent="bash", prompt="echo ready")
    assert task["tty"] is None  # the agent's default decides
    running = wait_status(client, member, task["id"], "running")
    run = running["runs"][0]
    viewer = Attached(live, run["id"], token(client, member, run["id"], "view"))
    viewer.wait_output("ready")
    os.kill(int(run["executor"].rsplit(":", 1)[1]), signal.SIGKILL)
    exit_frame = viewer.expect("exit", timeout=30)
    assert exit_frame["status"] == "lost"
    assert viewer.closed_with() == 1000
    wait_for(lambda: agent_pids(app, run["id"]) == [], timeout=5)


def test_a_controller_hands_the_keyboard_back_and_keeps_watching(
    client, member, project, worker, live
):
    run_id = running_asker(client, member)
    ctl = Attached(live, run_id, token(client, member, run_id, "control"))
    ctl.send(type="release")
    frame = ctl.expect("control", action="release")
    assert frame["mode"] == "view" and frame["controller"] is None
    ctl.type("x")
    assert "viewers cannot type" in ctl.expect("error")["detail"]
    # the keyboard is free: another controller takes it without a take-over
    again = Attached(live, run_id, token(client, member, run_id, "control"))
    assert again.hello["mode"] == "control"
