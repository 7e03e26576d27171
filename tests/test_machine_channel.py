"""A machine's control channel over a real WebSocket to a live gunicorn (two worker processes):
auth, heartbeats, reports on its runs by offset and sequence (resent without duplicates), and
what the server routes to it through Redis from whichever process decides (drain, takeover,
decommission), and refusals of what a machine must not send."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from helpers import register_machine, wait_for
from servers import LiveServer
from simple_websocket import Client, ConnectionClosed
from test_execution import create

from app.database import db
from app.runs.models import Run
from app.timeutil import utcnow


@pytest.fixture(scope="module")
def live2(app):
    """One server for the module: it keeps nothing of a test's (the database and Redis are
    cleaned between tests, and a machine's credential is checked on every connection)."""
    server = LiveServer(app, WEB_CONCURRENCY="2")
    yield server
    server.stop()


@pytest.fixture
def registered(client, admin):
    return register_machine(client, admin)


class Peer:
    """A scripted machine: frames out, frames in."""

    def __init__(self, live, machine_id=None, credential=None, auth=True, resume=()):
        self.ws = Client.connect(f"ws://127.0.0.1:{live.port}/api/v1/machines/connect")
        if auth:
            self.send(
                type="auth",
                machine_id=machine_id,
                credential=credential,
                client_version="test",
                resume=[{"run_id": r} for r in resume],
            )
            self.welcome = self.expect("welcome")

    def send(self, **frame):
        self.ws.send(json.dumps(frame))

    def receive(self, timeout=5.0):
        raw = self.ws.receive(timeout=timeout)
        return None if raw is None else json.loads(raw)

    def expect(self, kind, timeout=5.0, **match):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {kind} frame"
            frame = self.receive(timeout=left)
            assert frame is not None, f"no {kind} frame"
            if frame["type"] == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame

    def closed_with(self, timeout=5.0):
        """The close code, once the server has closed the connection."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self.ws.receive(timeout=0.2)
                if not self.ws.connected:
                    break
        except ConnectionClosed:
            pass
        assert not self.ws.connected
        return self.ws.close_reason

    def close(self):
        with contextlib.suppress(ConnectionClosed):
            self.ws.close()


def _assigned_run(app, client, member, machine_name="box"):
    """A run as the scheduler hands it to the machine."""
    task = create(client, member, prompt="echo hi", target="external")
    with app.app_context():
        run = db.session.get(Run, task["latest_run_id"])
        run.status, run.executor = "assigned", f"machine:{machine_name}"
        run.lease_expires_at = utcnow() + timedelta(seconds=15)
        db.session.commit()
        return task, run.id


def test_auth_heartbeat_and_state(client, member, registered, live2):
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    assert peer.welcome["heartbeat_s"] == 5 and peer.welcome["runs"] == []
    url = f"/api/v1/machines/{registered['machine_id']}"
    assert client.get(url, headers=member.headers).get_json()["state"] == "online"
    peer.send(type="heartbeat", free_slots=1, cpu_pct=12.5, disk_free_mb=5000)
    wait_for(
        lambda: (
            client.get(url, headers=member.headers).get_json()["heartbeat"].get("cpu_pct") == 12.5
        )
    )
    peer.close()


@pytest.mark.parametrize(
    "first",
    [
        "not json at all",
        json.dumps({"type": "heartbeat"}),  # not authenticated yet
        json.dumps({"type": "auth", "machine_id": "1", "credential": "x"}),  # id not an int
        json.dumps([1, 2, 3]),
        json.dumps({"type": "auth", "machine_id": 1, "credential": "sbk_x", "evil": 1}),
    ],
)
def test_attack_malformed_first_frames_are_refused(registered, live2, first):
    peer = Peer(live2, auth=False)
    peer.ws.send(first)
    assert peer.expect("error")
    assert peer.closed_with() == 1008


def test_attack_wrong_credential_or_another_machines_id(client, admin, registered, live2):
    peer = Peer(live2, auth=False)
    peer.send(type="auth", machine_id=registered["machine_id"], credential="sbk_wrong")
    assert "wrong credential" in peer.expect("error")["detail"]
    assert peer.closed_with() == 1008
    other = Peer(live2, auth=False)
    other.send(
        type="auth", machine_id=registered["machine_id"] + 1, credential=registered["credential"]
    )
    assert other.expect("error") and other.closed_with() == 1008


def test_attack_oversized_frame_is_closed_1009(registered, live2):
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    peer.send(type="heartbeat", padding="x" * (1024 * 1024 + 10))
    assert peer.closed_with() == 1009


def test_attack_unknown_and_malformed_frames_after_auth(registered, live2):
    for frame in ({"type": "assign", "run_id": 1}, {"type": "log", "run_id": 1, "offset": -1}):
        peer = Peer(live2, registered["machine_id"], registered["credential"])
        peer.send(**frame)
        assert peer.expect("error") and peer.closed_with() == 1008


def test_a_run_reported_by_offset_and_seq_resent_without_duplicates(
    app, client, member, project, registered, live2
):
    task, run_id = _assigned_run(app, client, member)
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    peer.send(type="accept", run_id=run_id)
    peer.send(type="started", run_id=run_id, pid=4242, agent_version="claude 1.0.3")
    peer.send(type="log", run_id=run_id, offset=0, text="hello\n")
    assert peer.expect("ack", run_id=run_id)["offset"] == 6
    peer.send(type="log", run_id=run_id, offset=0, text="hello\n")  # resent: stored once
    assert peer.expect("ack", run_id=run_id)["offset"] == 6
    peer.send(type="log", run_id=run_id, offset=100, text="later")  # a gap: where to resume
    assert peer.expect("ack", run_id=run_id)["offset"] == 6
    raw = "wörld\n".encode()
    peer.send(type="log", run_id=run_id, offset=6, data=base64.b64encode(raw).decode())
    assert peer.expect("ack", run_id=run_id)["offset"] == 6 + len(raw)
    for _ in range(2):  # the second is a resend
        peer.send(type="event", run_id=run_id, seq=1, event={"type": "tool_use", "data": {"n": 1}})
        assert peer.expect("ack", run_id=run_id)["seq"] == 1
    peer.send(type="event", run_id=run_id, seq=5, event={"type": "x", "data": {}})  # a gap
    assert peer.expect("ack", run_id=run_id)["seq"] == 1
    # an end claiming more output than is stored is not taken: resend first
    peer.send(type="finished", run_id=run_id, status="succeeded", exit_code=0, log_size=99)
    assert peer.expect("ack", run_id=run_id)["offset"] == 6 + len(raw)
    peer.send(
        type="finished",
        run_id=run_id,
        status="succeeded",
        exit_code=0,
        log_size=6 + len(raw),
        event_count=1,
        facts={"cost_usd": 0.0123, "input_tokens": 10, "output_tokens": 20, "model": "m"},
    )
    assert peer.expect("ack", run_id=run_id)["finished"] is True
    peer.send(type="finished", run_id=run_id, status="failed", exit_code=1, log_size=0)
    assert peer.expect("ack", run_id=run_id)["finished"] is True  # the first end stays
    peer.close()

    run = client.get(f"/api/v1/runs/{run_id}", headers=member.headers).get_json()
    assert run["status"] == "succeeded" and run["executor"] == "machine:box"
    assert run["agent_version"] == "claude 1.0.3" and run["cost_usd"] == 0.0123
    log = client.get(f"/api/v1/runs/{run_id}/log", headers=member.headers).get_json()
    assert log["text"] == "hello\nwörld\n"
    events = client.get(f"/api/v1/runs/{run_id}/events", headers=member.headers).get_json()
    assert [(e["seq"], e["type"]) for e in events["data"]] == [(1, "tool_use")]
    assert client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).json["status"] == (
        "completed"
    )


def test_attack_frames_for_another_machines_run_change_nothing(
    app, client, member, project, registered, live2
):
    _task, run_id = _assigned_run(app, client, member, machine_name="someone-else")
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    peer.send(type="log", run_id=run_id, offset=0, text="injected\n")
    assert "not assigned to this machine" in peer.expect("error")["detail"]
    peer.send(type="finished", run_id=run_id, status="failed", exit_code=1, log_size=0)
    assert peer.expect("error")
    peer.send(type="heartbeat", free_slots=1)  # still served
    peer.close()
    run = client.get(f"/api/v1/runs/{run_id}", headers=member.headers).get_json()
    assert run["status"] == "assigned" and run["log_size"] == 0


def test_reconnect_resumes_from_what_is_stored(app, client, member, project, registered, live2):
    _task, run_id = _assigned_run(app, client, member)
    _gone, taken = _assigned_run(app, client, member, machine_name="elsewhere")
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    peer.send(type="log", run_id=run_id, offset=0, text="abc")
    peer.expect("ack", run_id=run_id)
    peer.close()
    again = Peer(live2, registered["machine_id"], registered["credential"], resume=[run_id, taken])
    assert again.welcome["runs"] == [
        {"run_id": run_id, "offset": 3, "seq": 0},
        {"run_id": taken, "abandon": True},
    ]
    again.close()


def test_what_the_server_decides_reaches_the_machine_through_redis(
    app, client, admin, member, project, registered, live2
):
    """The API call is served by the test's own app, not by the process holding the socket."""
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    url = f"/api/v1/machines/{registered['machine_id']}"
    assert client.post(f"{url}/drain", headers=admin.headers).status_code == 200
    peer.expect("drain")
    assert client.post(f"{url}/undrain", headers=admin.headers).status_code == 200
    peer.expect("undrain")
    _task, run_id = _assigned_run(app, client, member)
    client.post(f"/api/v1/runs/{run_id}/stop", headers=member.headers)
    peer.send(type="heartbeat", free_slots=0)
    assert peer.expect("stop", run_id=run_id)["grace_s"] >= 1

    newer = Peer(live2, registered["machine_id"], registered["credential"])
    assert "took over" in peer.expect("error")["detail"]
    assert peer.closed_with() == 4000
    assert client.delete(url, headers=admin.headers).status_code == 200
    assert newer.expect("disconnect")["reason"] == "decommissioned"
    assert newer.closed_with() == 1008
    refused = Peer(live2, auth=False)
    refused.send(
        type="auth", machine_id=registered["machine_id"], credential=registered["credential"]
    )
    assert refused.expect("error") and refused.closed_with() == 1008


def test_sigterm_tells_machines_to_reconnect(registered, app):
    live = LiveServer(app, WEB_CONCURRENCY="1")
    try:
        peer = Peer(live, registered["machine_id"], registered["credential"])
        stopped = time.monotonic()
        live.proc.send_signal(signal.SIGTERM)
        assert peer.closed_with(timeout=8) == 1012
        live.proc.wait(timeout=10)
        assert time.monotonic() - stopped < 10
    finally:
        live.stop()


# -- scheduling: the server assigns queued runs to machines ----------------------------------


def _task(client, member, target, **fields):
    resp = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "t", "prompt": "echo hi", "target": target, **fields},
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def test_a_labelled_task_is_assigned_run_and_completed(
    app, client, member, project, registered, live2
):
    put = client.put(
        "/api/v1/projects/demo/secrets/API_TOKEN", headers=member.headers, json={"value": "s3cr3t"}
    )
    assert put.status_code in (200, 201), put.get_json()
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    task = _task(client, member, "labels:linux")
    assign = peer.expect("assign")["run"]
    assert assign["run_id"] == task["latest_run_id"] and assign["prompt"] == "echo hi"
    assert assign["agent"] == "shell" and assign["project"] == "demo"
    assert assign["env"]["API_TOKEN"] == "s3cr3t"
    assert assign["env"]["SWITCHBOARD_RUN_TOKEN"].startswith("sbr_")
    run_id = assign["run_id"]
    run = client.get(f"/api/v1/runs/{run_id}", headers=member.headers).get_json()
    assert run["status"] == "assigned" and run["executor"] == "machine:box"
    peer.send(type="accept", run_id=run_id)
    peer.send(type="started", run_id=run_id, pid=7, agent_version="bash 5.2")
    peer.send(type="log", run_id=run_id, offset=0, text="hi\n")
    peer.expect("ack", run_id=run_id)
    # the run's token works for its own run while it runs
    token = {"Authorization": f"Bearer {assign['env']['SWITCHBOARD_RUN_TOKEN']}"}
    report = client.post(
        f"/api/v1/runs/{run_id}/events", headers=token, json={"type": "note", "data": {}}
    )
    assert report.status_code == 201, report.get_json()
    peer.send(type="finished", run_id=run_id, status="succeeded", exit_code=0, log_size=3)
    peer.expect("ack", run_id=run_id, finished=True)
    done = client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).get_json()
    assert done["status"] == "completed"
    peer.close()


def test_without_an_eligible_machine_the_task_waits_saying_why(
    app, client, member, project, registered, live2
):
    gpu = _task(client, member, "labels:gpu")
    assert gpu["status"] == "queued"
    assert gpu["status_reason"] == "waiting: no machine has labels gpu"  # the answer says why
    detail = client.get(f"/api/v1/tasks/{gpu['id']}", headers=member.headers).get_json()
    assert detail["status_reason"] == "waiting: no machine has labels gpu"
    offline = _task(client, member, "machine:box")
    detail = client.get(f"/api/v1/tasks/{offline['id']}", headers=member.headers).get_json()
    assert detail["status_reason"] == "waiting: no online machine among the machine box"
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    assert peer.expect("assign")["run"]["run_id"] == offline["latest_run_id"]  # on connect
    detail = client.get(f"/api/v1/tasks/{offline['id']}", headers=member.headers).get_json()
    assert detail["status_reason"] is None
    missing_agent = _task(client, member, "labels:linux", agent="claude")
    detail = client.get(f"/api/v1/tasks/{missing_agent['id']}", headers=member.headers).json
    assert (
        detail["status_reason"]
        == "waiting: agent claude is not installed on the machines with labels linux"
    )
    peer.close()


def test_bad_targets_are_422(client, member, project):
    for target in ("labels:", "labels:Has Space", "machine:", "machine:-x", "somewhere"):
        resp = client.post(
            "/api/v1/tasks",
            headers=member.headers,
            json={"project": "demo", "title": "t", "prompt": "x", "target": target},
        )
        assert resp.status_code == 422, (target, resp.get_json())


def test_slots_are_respected_and_a_freed_slot_takes_the_next(
    app, client, member, project, registered, live2
):
    peer = Peer(live2, registered["machine_id"], registered["credential"])  # one slot
    first = _task(client, member, "labels:linux", priority="low")
    second = _task(client, member, "labels:linux", priority="urgent")
    got = peer.expect("assign")["run"]["run_id"]
    assert got == first["latest_run_id"]  # the only one queued when the slot was free
    assert peer.receive(timeout=0.5) is None  # the slot is taken: nothing more
    peer.send(type="accept", run_id=got)
    peer.send(type="finished", run_id=got, status="succeeded", exit_code=0, log_size=0)
    nxt = peer.expect("assign")["run"]["run_id"]
    assert nxt == second["latest_run_id"]
    peer.close()


def test_an_offer_missed_is_made_again_and_one_not_taken_goes_back(
    app, client, member, project, registered, live2
):
    from app.machines import scheduling
    from app.machines.models import Machine

    peer = Peer(live2, registered["machine_id"], registered["credential"])
    task = _task(client, member, "machine:box")
    first = peer.expect("assign")["run"]
    peer.close()  # gone before accepting
    again = Peer(live2, registered["machine_id"], registered["credential"])
    offer = again.expect("assign")["run"]  # offered again on reconnect, with a new token
    assert offer["run_id"] == first["run_id"]
    assert offer["env"]["SWITCHBOARD_RUN_TOKEN"] != first["env"]["SWITCHBOARD_RUN_TOKEN"]
    again.close()

    def server_done_with_it() -> bool:  # its connection's thread has ended (it schedules too)
        with app.app_context():
            return db.session.get(Machine, registered["machine_id"]).connection is None

    wait_for(server_done_with_it, timeout=10)
    with app.app_context():  # the machine is gone for good: its offer expires
        machine = db.session.get(Machine, registered["machine_id"])
        machine.last_heartbeat_at = utcnow() - timedelta(minutes=5)
        db.session.get(Run, offer["run_id"]).lease_expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
        assert scheduling.sweep()["offers_reclaimed"] == 1
    run = client.get(f"/api/v1/runs/{offer['run_id']}", headers=member.headers).get_json()
    assert run["status"] == "queued" and run["executor"] is None
    detail = client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).get_json()
    assert detail["attempts"] == 1 and len(detail["runs"]) == 1  # no attempt spent
    assert detail["status_reason"] == "waiting: no online machine among the machine box"


def test_machine_states_reach_the_activity_feed_and_subscriptions(
    app, client, admin, registered, live2, monkeypatch
):
    """What admins watch: online, draining, offline, decommissioned, as activity entries of no
    project and as outbound events of an installation-wide subscription."""
    from test_subscriptions import LOOPBACK, deliveries, subscribe

    from app.activity.models import Activity

    monkeypatch.setitem(app.config, "SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS", LOOPBACK)
    sub = subscribe(client, admin, "http://127.0.0.1:9/hook", events=["machine.online", "*"])
    peer = Peer(live2, registered["machine_id"], registered["credential"])
    url = f"/api/v1/machines/{registered['machine_id']}"
    client.post(f"{url}/drain", headers=admin.headers)
    client.post(f"{url}/undrain", headers=admin.headers)
    peer.close()
    wait_for(lambda: client.get(url, headers=admin.headers).json["state"] == "offline")
    client.delete(url, headers=admin.headers)

    def kinds():
        with app.app_context():
            rows = db.session.scalars(sa.select(Activity).order_by(Activity.id)).all()
            return [(r.kind, r.project_id, r.data["name"]) for r in rows]

    expected = ["machine.online", "machine.draining", "machine.online", "machine.offline",
                "machine.decommissioned"]  # fmt: skip
    wait_for(lambda: [k for k, _, _ in kinds()] == expected)
    assert {(p, n) for _, p, n in kinds()} == {(None, "box")}
    sent = [d["event"] for d in deliveries(client, admin, sub["id"])]
    assert sorted(sent) == sorted(expected)
