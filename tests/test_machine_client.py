"""The `switchboard machine` client as a team runs it: real client processes registered with an
enrollment token, connected to a live gunicorn (two worker processes), running real agents (the
suite's fake claude prints Claude Code's stream-json) for tasks scheduled onto them; and what
goes wrong around them: a server restart mid-run, a dropped connection, a machine killed with -9,
a stop, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import descendants, wait_for
from servers import FAKE_AGENTS, LiveServer
from test_live_streams import _frames, _stream

from workers.process import child_pids

SWITCHBOARD = str(Path(sys.executable).parent / "switchboard")


class MachineProcess:
    """A registered `switchboard machine run`, in its own session (killed for sure at the end)."""

    def __init__(self, client, admin, live, tmp_path: Path, name: str, labels="linux", slots=2):
        token = client.post(
            "/api/v1/machine-tokens", headers=admin.headers, json={"labels": labels.split(",")}
        ).get_json()["token"]
        self.state = tmp_path / name
        self.env = {
            "PATH": f"{FAKE_AGENTS}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "LANG": "C.UTF-8",
        }
        reg = subprocess.run(
            [SWITCHBOARD, "machine", "register", "--server", live.url, "--token", token,
             "--name", name, "--slots", str(slots), "--state-dir", str(self.state)],
            env=self.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert reg.returncode == 0, reg.stdout + reg.stderr
        self.log_path = tmp_path / f"{name}.log"
        self.start()

    def start(self) -> None:
        self.log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [SWITCHBOARD, "machine", "run", "--state-dir", str(self.state), "--sandbox", "none"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def live2(app):
    server = LiveServer(app, WEB_CONCURRENCY="2")
    yield server
    server.stop()


def _task(client, member, prompt, target="labels:linux", **fields):
    resp = client.post(
        "/api/v1/tasks",
        headers=member.headers,
        json={"project": "demo", "title": "t", "prompt": prompt, "target": target, **fields},
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def _until(client, member, task_id, statuses, timeout=30):
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)

    def reached():
        got = client.get(f"/api/v1/tasks/{task_id}", headers=member.headers).get_json()
        return got if got["status"] in statuses else None

    return wait_for(reached, timeout=timeout, interval=0.1)


def _machine_online(client, member, name):
    machines = client.get("/api/v1/machines?state=online", headers=member.headers).json["data"]
    return name in {m["name"] for m in machines}


def test_a_task_runs_on_a_machine_and_streams_like_a_pool_run(
    app, client, admin, member, project, live2, tmp_path
):
    box = MachineProcess(client, admin, live2, tmp_path, "m1")
    try:
        wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
        machine = client.get("/api/v1/machines", headers=member.headers).json["data"][0]
        assert {"claude", "shell"} <= set(machine["agents"])

        task = _task(client, member, "echo one; echo two")
        done = _until(client, member, task["id"], {"completed", "failed"})
        assert done["status"] == "completed", (done, box.output())
        run = client.get(f"/api/v1/runs/{done['latest_run_id']}", headers=member.headers).json
        assert run["executor"] == "machine:m1" and run["exit_code"] == 0
        log = client.get(f"/api/v1/runs/{run['id']}/log", headers=member.headers).json
        assert log["text"] == "one\ntwo\n"

        # a real agent's stream-json: events, cost and version as for a pool run, followed live
        claude = _task(client, member, "Fix the bug in parser.py", agent="claude")
        conn, resp = _stream(live2, f"/api/v1/tasks/{claude['id']}/stream", member.headers)
        kinds = []
        for frame in _frames(resp):
            kinds.append(frame.event)
            if frame.event == "done":
                break
        conn.close()
        assert "log" in kinds and "event" in kinds, kinds
        done = _until(client, member, claude["id"], {"completed", "failed"})
        run = client.get(f"/api/v1/runs/{done['latest_run_id']}", headers=member.headers).json
        assert run["status"] == "succeeded", box.output()
        assert run["cost_usd"] and run["agent_version"] and run["session_id"], str(run)
        events = client.get(f"/api/v1/runs/{run['id']}/events", headers=member.headers).json
        assert {"init", "result"} <= {e["type"] for e in events["data"]}
    finally:
        box.stop()


def _lines_task(client, member, n=3000, pause_every=300):
    script = (
        f"for i in $(seq 1 {n}); do echo line-$i; "
        f"if [ $((i % {pause_every})) = 0 ]; then sleep 0.1; fi; done"
    )
    return _task(client, member, script), "".join(f"line-{i}\n" for i in range(1, n + 1))


def test_a_server_restart_mid_run_loses_and_repeats_nothing(
    app, client, admin, member, project, tmp_path
):
    first = LiveServer(app, WEB_CONCURRENCY="2")
    box = MachineProcess(client, admin, first, tmp_path, "m1")
    second = None
    try:
        wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
        task, expected = _lines_task(client, member)
        _until(client, member, task["id"], "running")
        first.stop()  # SIGTERM: the machine's channel is closed with 1012
        # the agent goes on; the machine reconnects to the server's next process, same port
        second = LiveServer(app, port=first.port, WEB_CONCURRENCY="2")
        done = _until(client, member, task["id"], {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", box.output()
        run_id = done["latest_run_id"]
        log = client.get(
            f"/api/v1/runs/{run_id}/log?limit=1048576", headers=member.headers
        ).get_json()
        assert log["text"] == expected  # byte for byte: no gap, no duplicate
        assert len(done["runs"]) == 1
    finally:
        box.stop()
        if second is not None:
            second.stop()


def test_a_dropped_connection_mid_run_loses_and_repeats_nothing(
    app, client, admin, member, project, live2, tmp_path
):
    box = MachineProcess(client, admin, live2, tmp_path, "m1")
    try:
        wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
        task, expected = _lines_task(client, member)
        _until(client, member, task["id"], "running")
        # cut the machine's TCP connection from the server's side, as a network would
        dropped = subprocess.run(
            ["ss", "-K", "dst", "127.0.0.1", "dport", "=", str(live2.port)],
            capture_output=True,
            text=True,
        )
        assert dropped.returncode == 0, dropped.stderr
        done = _until(client, member, task["id"], {"completed", "failed"}, timeout=60)
        assert done["status"] == "completed", box.output()
        log = client.get(
            f"/api/v1/runs/{done['latest_run_id']}/log?limit=1048576", headers=member.headers
        ).get_json()
        assert log["text"] == expected
        assert "reconnecting" in box.output()
    finally:
        box.stop()


def test_a_machine_killed_mid_run_is_lost_and_the_retry_runs_on_the_other(
    app, client, admin, member, project, live2, tmp_path
):
    one = MachineProcess(client, admin, live2, tmp_path, "m1", slots=1)
    wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
    task = _task(client, member, "echo started; sleep 30", max_attempts=2)
    other = None
    try:
        running = _until(client, member, task["id"], "running")
        assert running["runs"][0]["executor"] == "machine:m1"
        other = MachineProcess(client, admin, live2, tmp_path, "m2", slots=1)
        killed_at = time.monotonic()
        agents = child_pids(one.proc.pid)
        os.killpg(one.proc.pid, signal.SIGKILL)  # the host dies with its agents
        from app.runs import sweep

        def retried():
            with app.app_context():
                sweep.sweep()  # what the worker pool's maintenance does every few seconds
            got = client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).json
            return got if len(got["runs"]) == 2 else None

        detail = wait_for(retried, timeout=40, interval=0.5)
        assert time.monotonic() - killed_at < 30
        assert detail["runs"][0]["status"] == "lost"
        second = _until(client, member, task["id"], "running")
        assert second["runs"][1]["executor"] == "machine:m2"
        assert agents is not None
    finally:
        one.stop()
        if other is not None:
            other.stop()


def test_stop_reaches_the_remote_run_and_nothing_of_it_survives(
    app, client, admin, member, project, live2, tmp_path
):
    box = MachineProcess(client, admin, live2, tmp_path, "m1")
    try:
        wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
        task = _task(client, member, "echo working; sleep 60")
        running = _until(client, member, task["id"], "running")
        run_id = running["latest_run_id"]

        def printed():
            log = client.get(f"/api/v1/runs/{run_id}/log", headers=member.headers).json
            return log["text"] == "working\n"

        wait_for(printed, timeout=15)
        agent = descendants(box.proc.pid)  # the agent's shell and its sleep
        assert agent
        asked = time.monotonic()
        client.post(f"/api/v1/runs/{run_id}/stop", headers=member.headers)
        done = _until(client, member, task["id"], {"cancelled", "failed"}, timeout=30)
        run = client.get(f"/api/v1/runs/{run_id}", headers=member.headers).json
        assert run["status"] == "cancelled", box.output()
        assert time.monotonic() - asked < 2  # told at once; `sleep` ends at TERM
        assert done["status"] == "cancelled"
        assert not [pid for pid in agent if Path(f"/proc/{pid}").exists()]
    finally:
        box.stop()


def test_sigterm_drains_the_machine(app, client, admin, member, project, live2, tmp_path):
    box = MachineProcess(client, admin, live2, tmp_path, "m1")
    try:
        wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
        task = _task(client, member, "sleep 2; echo finished")
        _until(client, member, task["id"], "running")
        box.proc.send_signal(signal.SIGTERM)
        later = _task(client, member, "echo never here")
        done = _until(client, member, task["id"], {"completed", "failed"}, timeout=30)
        assert done["status"] == "completed", box.output()
        assert box.proc.wait(timeout=20) == 0
        waiting = client.get(f"/api/v1/tasks/{later['id']}", headers=member.headers).json
        assert waiting["status"] == "queued"
    finally:
        box.stop()


def test_an_admin_drains_and_undrains_a_machine(
    app, client, admin, member, project, live2, tmp_path
):
    box = MachineProcess(client, admin, live2, tmp_path, "m1")
    try:
        wait_for(lambda: _machine_online(client, member, "m1"), timeout=20)
        machine_id = client.get("/api/v1/machines", headers=member.headers).json["data"][0]["id"]
        first = _task(client, member, "sleep 1.5; echo first")
        _until(client, member, first["id"], "running")
        drained = client.post(f"/api/v1/machines/{machine_id}/drain", headers=admin.headers)
        assert drained.json["state"] == "draining"
        later = _task(client, member, "echo later")
        done = _until(client, member, first["id"], {"completed", "failed"})
        assert done["status"] == "completed", box.output()  # the running one finishes
        waiting = client.get(f"/api/v1/tasks/{later['id']}", headers=member.headers).json
        assert waiting["status"] == "queued" and "no online machine" in waiting["status_reason"]
        client.post(f"/api/v1/machines/{machine_id}/undrain", headers=admin.headers)
        resumed = _until(client, member, later["id"], {"completed", "failed"})
        assert resumed["status"] == "completed", box.output()
    finally:
        box.stop()
