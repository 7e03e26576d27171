"""Machines over the REST API: enrollment tokens, registration, credentials, state, and what
an admin does to a machine (drain, labels, decommission)."""

from datetime import timedelta

import sqlalchemy as sa
from helpers import assert_problem, at_once
from test_execution import create

from app.database import db
from app.machines.models import Machine, MachineToken
from app.runs.models import Run
from app.timeutil import utcnow


def _token(client, admin, **body):
    resp = client.post("/api/v1/machine-tokens", headers=admin.headers, json=body)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def _register(client, token, name="gpu-1", **body):
    return client.post(
        "/api/v1/machines/register",
        json={
            "enrollment_token": token,
            "name": name,
            "labels": ["linux"],
            "agents": {"claude": "1.0.3", "shell": None},
            "slots": 2,
            "hardware": {"os": "linux", "arch": "x86_64", "cpus": 8, "memory_mb": 32000},
            **body,
        },
    )


def test_enroll_register_and_see_the_machine(client, admin, member):
    made = _token(client, admin, labels=["gpu"], uses=1)
    assert made["token"].startswith("sbm_") and made["uses"] == 1 and made["used"] == 0
    listed = client.get("/api/v1/machine-tokens", headers=admin.headers).get_json()["data"]
    assert [t["id"] for t in listed] == [made["id"]]
    assert "token" not in listed[0] and made["token"].startswith(listed[0]["prefix"])

    resp = _register(client, made["token"])
    assert resp.status_code == 201, resp.get_json()
    reg = resp.get_json()
    assert reg["credential"].startswith("sbk_")
    assert reg["ws_url"] == "ws://localhost/api/v1/machines/connect"

    machine = client.get(f"/api/v1/machines/{reg['machine_id']}", headers=member.headers)
    assert machine.status_code == 200
    body = machine.get_json()
    assert body["name"] == "gpu-1" and body["state"] == "offline"  # no heartbeat yet
    assert body["labels"] == ["gpu", "linux"] and body["slots"] == 2
    assert body["agents"] == {"claude": "1.0.3", "shell": None}
    assert body["hardware"]["cpus"] == 8
    assert "credential" not in body and "credential_hash" not in body
    names = [m["name"] for m in client.get("/api/v1/machines", headers=member.headers).json["data"]]
    assert names == ["gpu-1"]
    counts = client.get("/api/v1/machines/healthz")  # no credential needed
    assert counts.get_json() == {"online": 0, "offline": 1, "draining": 0, "decommissioned": 0}


def test_attack_enrollment_token_reused_expired_revoked_or_forged(app, client, admin):
    once = _token(client, admin)
    assert _register(client, once["token"], name="a").status_code == 201
    assert_problem(_register(client, once["token"], name="b"), 401)  # used up

    expired = _token(client, admin)
    with app.app_context():
        row = db.session.get(MachineToken, expired["id"])
        row.expires_at = utcnow() - timedelta(seconds=1)
        db.session.commit()
    assert_problem(_register(client, expired["token"], name="c"), 401)

    revoked = _token(client, admin)
    assert (
        client.delete(f"/api/v1/machine-tokens/{revoked['id']}", headers=admin.headers).status_code
        == 204
    )
    assert_problem(_register(client, revoked["token"], name="d"), 401)
    assert_problem(_register(client, "sbm_" + "x" * 43, name="e"), 401)
    assert_problem(_register(client, "not a token", name="f"), 401)
    with app.app_context():
        assert db.session.scalar(sa.select(sa.func.count(Machine.id))) == 1


def test_attack_two_machines_racing_for_a_tokens_last_use(app, client, admin):
    token = _token(client, admin, uses=1)["token"]
    answers = at_once(app, 4, lambda c, i: _register(c, token, name=f"racer-{i}").status_code)
    assert sorted(answers) == [201, 401, 401, 401]
    with app.app_context():
        assert db.session.scalar(sa.select(MachineToken.used)) == 1


def test_a_taken_name_is_409_unless_the_token_replaces(client, admin):
    tokens = _token(client, admin, uses=5)
    first = _register(client, tokens["token"], name="mac").get_json()
    assert_problem(_register(client, tokens["token"], name="mac"), 409)
    replacing = _token(client, admin, replace=True)
    again = _register(client, replacing["token"], name="mac", labels=["xcode"])
    assert again.status_code == 201
    assert again.get_json()["machine_id"] == first["machine_id"]  # the same machine, anew
    old = client.post(
        f"/api/v1/machines/{first['machine_id']}/rotate-credential",
        json={"credential": first["credential"]},
    )
    assert_problem(old, 401)  # the replaced machine's credential no longer works


def test_a_token_naming_its_machine(client, admin):
    named = _token(client, admin, name="ci-box")
    reg = _register(client, named["token"], name=None)
    assert reg.status_code == 201 and reg.get_json()["name"] == "ci-box"


def test_rotating_a_credential_retires_the_old_one(client, admin):
    reg = _register(client, _token(client, admin)["token"]).get_json()
    url = f"/api/v1/machines/{reg['machine_id']}/rotate-credential"
    fresh = client.post(url, json={"credential": reg["credential"]})
    assert fresh.status_code == 200
    new = fresh.get_json()["credential"]
    assert new.startswith("sbk_") and new != reg["credential"]
    assert_problem(client.post(url, json={"credential": reg["credential"]}), 401)
    assert client.post(url, json={"credential": new}).status_code == 200
    # another machine's id with this credential: as unknown as a wrong credential
    assert_problem(
        client.post("/api/v1/machines/999/rotate-credential", json={"credential": new}), 401
    )


def test_state_is_derived_from_heartbeats_and_admin_choices(app, client, admin, member):
    reg = _register(client, _token(client, admin)["token"]).get_json()
    url = f"/api/v1/machines/{reg['machine_id']}"
    with app.app_context():
        machine = db.session.get(Machine, reg["machine_id"])
        machine.last_heartbeat_at, machine.connection = utcnow(), "its-connection"
        db.session.commit()
    assert client.get(url, headers=member.headers).get_json()["state"] == "online"
    online = client.get("/api/v1/machines?state=online", headers=member.headers).get_json()
    assert [m["name"] for m in online["data"]] == ["gpu-1"]
    with app.app_context():
        machine = db.session.get(Machine, reg["machine_id"])
        machine.last_heartbeat_at = utcnow() - timedelta(seconds=16)  # three intervals missed
        db.session.commit()
    assert client.get(url, headers=member.headers).get_json()["state"] == "offline"
    with app.app_context():  # heard from lately, but its connection closed
        machine = db.session.get(Machine, reg["machine_id"])
        machine.last_heartbeat_at, machine.connection = utcnow(), None
        db.session.commit()
    assert client.get(url, headers=member.headers).get_json()["state"] == "offline"

    assert_problem(client.post(f"{url}/drain", headers=member.headers), 403)
    drained = client.post(f"{url}/drain", headers=admin.headers)
    assert drained.status_code == 200 and drained.get_json()["state"] == "draining"
    assert client.post(f"{url}/undrain", headers=admin.headers).get_json()["state"] == "offline"


def test_labels_and_slots_are_an_admins_to_change(client, admin, member):
    reg = _register(client, _token(client, admin)["token"]).get_json()
    url = f"/api/v1/machines/{reg['machine_id']}"
    assert_problem(client.patch(url, headers=member.headers, json={"slots": 4}), 403)
    changed = client.patch(url, headers=admin.headers, json={"labels": ["gpu", "gpu"], "slots": 4})
    assert changed.get_json()["labels"] == ["gpu"] and changed.get_json()["slots"] == 4
    for bad in ({"slots": 0}, {"labels": ["Has Space"]}, {"labels": ["x"] * 33}, {"name": "z"}):
        assert_problem(client.patch(url, headers=admin.headers, json=bad), 422)
    filtered = client.get("/api/v1/machines?label=gpu", headers=member.headers).get_json()
    assert [m["name"] for m in filtered["data"]] == ["gpu-1"]
    assert client.get("/api/v1/machines?label=none", headers=member.headers).json["data"] == []


def test_decommission_revokes_and_queues_its_active_run_again(app, client, admin, member, project):
    reg = _register(client, _token(client, admin)["token"]).get_json()
    task = create(client, member, prompt="echo hi", target="external", max_attempts=2)
    with app.app_context():  # as if the machine had taken the run
        run = db.session.get(Run, task["latest_run_id"])
        run.status, run.executor = "running", "machine:gpu-1"
        run.lease_expires_at = utcnow() + timedelta(seconds=30)
        db.session.commit()
    listed = client.get(f"/api/v1/machines/{reg['machine_id']}/runs", headers=member.headers)
    assert [r["id"] for r in listed.get_json()["data"]] == [task["latest_run_id"]]

    gone = client.delete(f"/api/v1/machines/{reg['machine_id']}", headers=admin.headers)
    assert gone.status_code == 200 and gone.get_json()["state"] == "decommissioned"
    detail = client.get(f"/api/v1/tasks/{task['id']}", headers=member.headers).get_json()
    assert [r["status"] for r in detail["runs"]] == ["lost", "queued"]
    rotate = client.post(
        f"/api/v1/machines/{reg['machine_id']}/rotate-credential",
        json={"credential": reg["credential"]},
    )
    assert_problem(rotate, 401)
    assert_problem(
        client.patch(
            f"/api/v1/machines/{reg['machine_id']}", headers=admin.headers, json={"slots": 2}
        ),
        409,
    )
    # its name may be enrolled again
    assert _register(client, _token(client, admin)["token"]).status_code == 201


def test_machine_runs_match_the_executor_exactly(app, client, admin, member, project):
    token = _token(client, admin, uses=2)["token"]
    one = _register(client, token, name="gpu").get_json()
    _register(client, token, name="gpu2")
    task = create(client, member, prompt="x", target="external")
    with app.app_context():
        db.session.get(Run, task["latest_run_id"]).executor = "machine:gpu2"
        db.session.commit()
    listed = client.get(f"/api/v1/machines/{one['machine_id']}/runs", headers=member.headers)
    assert listed.get_json()["data"] == []


def test_only_admins_enroll(client, member):
    assert_problem(client.post("/api/v1/machine-tokens", headers=member.headers, json={}), 403)
    assert_problem(client.get("/api/v1/machine-tokens", headers=member.headers), 403)
    assert_problem(client.get("/api/v1/machines"), 401)


def test_heartbeats_written_together_renew_leases_and_say_stops_again(
    app, client, admin, member, project
):
    """One write for every machine a process heard from: figures kept, leases of the runs each
    holds renewed (not an offer's, not another machine's), stops asked for said again."""
    from app.machines import heartbeats

    token = _token(client, admin, uses=2)["token"]
    one = _register(client, token, name="one").get_json()
    _register(client, token, name="two")
    tasks = [create(client, member, prompt="x", target="external") for _ in range(3)]
    soon = utcnow() + timedelta(seconds=2)
    with app.app_context():
        for task, (status, executor) in zip(
            tasks,
            [("running", "machine:one"), ("assigned", "machine:one"), ("running", "machine:two")],
            strict=True,
        ):
            run = db.session.get(Run, task["latest_run_id"])
            run.status, run.executor, run.lease_expires_at = status, executor, soon
        db.session.get(Run, tasks[0]["latest_run_id"]).stop_requested_at = utcnow()
        db.session.commit()
        told: dict[str, list] = {}
        beat = heartbeats.Beat(
            one["machine_id"], "machine:one", {"free_slots": 1, "load": 0.5}, None, False,
            answer=lambda frames: told.setdefault("one", frames),
        )  # fmt: skip
        found = heartbeats.write([beat], lease_s=60)
        heartbeats.answer([beat], found, grace_s=7)
        assert told["one"] == [{"type": "stop", "run_id": tasks[0]["latest_run_id"], "grace_s": 7}]
        leases = {r.id: r.lease_expires_at for r in db.session.scalars(sa.select(Run)).all()}
        assert leases[tasks[0]["latest_run_id"]] > soon + timedelta(seconds=30)  # renewed
        assert leases[tasks[1]["latest_run_id"]] == soon  # an offer keeps its own
        assert leases[tasks[2]["latest_run_id"]] == soon  # another machine's
        machine = db.session.get(Machine, one["machine_id"])
        assert machine.heartbeat == {"free_slots": 1, "load": 0.5}
        assert machine.last_heartbeat_at is not None
        db.session.remove()


def test_attack_a_retired_machine_heartbeating_on_is_cut_off(app, client, admin, member):
    """Decommissioned while its connection lived on (the close told on Redis went missing): its
    next heartbeat writes nothing and closes the connection."""
    from app.machines import heartbeats

    reg = _register(client, _token(client, admin)["token"]).get_json()
    gone = client.delete(f"/api/v1/machines/{reg['machine_id']}", headers=admin.headers)
    assert gone.status_code == 200
    answers: list = []
    with app.app_context():
        beat = heartbeats.Beat(
            reg["machine_id"], "machine:gpu-1", {"free_slots": 2}, None, True,
            answer=answers.append,
        )  # fmt: skip
        heartbeats.answer([beat], heartbeats.write([beat], lease_s=60), grace_s=7)
        assert answers == [None]  # the connection is closed
        machine = db.session.get(Machine, reg["machine_id"])
        assert machine.last_heartbeat_at is None and machine.heartbeat == {}
        db.session.remove()
