"""Machines: enrollment tokens, registration, credentials, and what an admin does to a machine.

A machine's state is derived when asked (`state`), never stored as a flag that goes stale: it is
`decommissioned` once an admin retired it, `draining` while an admin has it finish its runs and
take no more, `online` while its heartbeats arrive, else `offline`.
"""

from __future__ import annotations

import hmac
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from app.activity import service as activity
from app.audit import service as audit
from app.auth.service import Principal
from app.auth.tokens import digest, new_opaque
from app.database import db
from app.errors import Conflict, NotFound, Unauthorized
from app.live import pubsub
from app.machines import models, scheduling
from app.machines.models import (
    CREDENTIAL_PREFIX,
    ENROLL_PREFIX,
    Machine,
    MachineToken,
    executor_name,
)
from app.runs import sweep
from app.timeutil import utcnow


def state(machine: Machine, now: datetime | None = None) -> str:
    return models.state(machine, now or utcnow())


# -- enrollment tokens -------------------------------------------------------------------------


def create_token(principal: Principal, data: dict[str, Any]) -> tuple[MachineToken, str]:
    """The token, shown this once."""
    token = new_opaque(ENROLL_PREFIX)
    expires_in = data.get("expires_in_s")
    row = MachineToken(
        name=data.get("name"),
        labels=sorted(set(data.get("labels") or [])),
        prefix=token[:12],
        token_hash=digest(token),
        uses=data.get("uses") or 1,
        replace=bool(data.get("replace")),
        created_by=principal.user.id,
        expires_at=utcnow() + timedelta(seconds=expires_in) if expires_in else None,
    )
    db.session.add(row)
    db.session.flush()
    audit.record(
        "machine_token.create",
        target_type="machine_token",
        target_id=row.id,
        payload={"name": row.name, "labels": row.labels, "uses": row.uses},
    )
    db.session.commit()
    return row, token


def list_tokens() -> list[MachineToken]:
    return list(db.session.scalars(sa.select(MachineToken).order_by(MachineToken.id.desc())))


def revoke_token(token_id: int) -> None:
    row = db.session.get(MachineToken, token_id)
    if row is None:
        raise NotFound(f"No enrollment token {token_id}.")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        audit.record("machine_token.revoke", target_type="machine_token", target_id=row.id)
    db.session.commit()


def token_usable(row: MachineToken, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return (
        row.revoked_at is None
        and row.used < row.uses
        and (row.expires_at is None or row.expires_at > now)
    )


# -- registration and credentials --------------------------------------------------------------

_UNUSABLE = "The enrollment token is unknown, used up, expired or revoked."


def register(data: dict[str, Any]) -> tuple[Machine, str]:
    """Trade an enrollment token for a machine and its credential (shown this once). One use of
    the token is taken by a conditional update: two machines racing for its last use cannot both
    win."""
    enrollment = data["enrollment_token"]
    row = (
        db.session.scalar(
            sa.select(MachineToken).where(MachineToken.token_hash == digest(enrollment))
        )
        if enrollment.startswith(ENROLL_PREFIX)
        else None
    )
    now = utcnow()
    if row is None or not token_usable(row, now):
        raise Unauthorized(_UNUSABLE)
    name = row.name or data.get("name")
    if not name:
        raise Conflict("This enrollment token names no machine: give `name`.")
    existing = db.session.scalar(sa.select(Machine).where(Machine.name == name))
    if existing is not None and existing.decommissioned_at is None and not row.replace:
        raise Conflict(f"A machine named {name!r} is registered; decommission it first.")
    taken = db.session.execute(
        sa.update(MachineToken)
        .where(
            MachineToken.id == row.id,
            MachineToken.used < MachineToken.uses,
            MachineToken.revoked_at.is_(None),
        )
        .values(used=MachineToken.used + 1)
        .execution_options(synchronize_session=False)
    ).rowcount
    if taken != 1:
        db.session.rollback()
        raise Unauthorized(_UNUSABLE)
    credential = new_opaque(CREDENTIAL_PREFIX)
    facts = {
        "labels": sorted(set(row.labels) | set(data.get("labels") or [])),
        "slots": data.get("slots") or 1,
        "agents": data.get("agents") or {},
        "hardware": data.get("hardware") or {},
        "client_version": data.get("client_version"),
        "credential_hash": digest(credential),
        "enrolled_with": row.id,
    }
    if existing is not None:  # replaced (or a retired name reused): the same row, a new life
        pubsub.to_machine(existing.id, {"close": "replaced by a new registration"})
        for key, value in facts.items():
            setattr(existing, key, value)
        existing.draining = False
        existing.decommissioned_at = None
        existing.last_heartbeat_at = None
        existing.heartbeat = {}
        existing.created_at = now
        machine = existing
    else:
        machine = Machine(name=name, **facts)
        db.session.add(machine)
    db.session.flush()
    audit.record(
        "machine.register",
        target_type="machine",
        target_id=machine.id,
        payload={"name": name, "labels": machine.labels, "token_id": row.id},
    )
    db.session.commit()
    return machine, credential


def authenticate(machine_id: int, credential: str) -> Machine:
    """The machine a credential belongs to; 401 for anything else (a retired machine's
    credential included), saying no more than that."""
    machine = db.session.get(Machine, machine_id)
    if (
        machine is None
        or machine.decommissioned_at is not None
        or not credential.startswith(CREDENTIAL_PREFIX)
        or not hmac.compare_digest(machine.credential_hash, digest(credential))
    ):
        raise Unauthorized("Unknown machine or wrong credential.")
    return machine


def rotate_credential(machine_id: int, credential: str) -> tuple[Machine, str]:
    machine = authenticate(machine_id, credential)
    fresh = new_opaque(CREDENTIAL_PREFIX)
    machine.credential_hash = digest(fresh)
    audit.record("machine.rotate_credential", target_type="machine", target_id=machine.id)
    db.session.commit()
    return machine, fresh


def connected(machine: Machine, connection: str, client_version: str | None) -> None:
    """A connection of the machine authenticated: it is online (said in the activity feed when
    it was not), and that connection is its own now (in the caller's transaction)."""
    was = state(machine)
    machine.client_version = client_version or machine.client_version
    machine.last_heartbeat_at = utcnow()
    machine.connection = connection
    if was != state(machine):
        _said(machine, "machine.online")


def disconnected(machine_id: int, connection: str) -> None:
    """Its connection closed: offline now (not after three missed heartbeats), unless a newer
    connection of it took over meanwhile. Its runs keep their leases: it may be back at once."""
    gone = db.session.execute(
        sa.update(Machine)
        .where(Machine.id == machine_id, Machine.connection == connection)
        .values(connection=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    machine = db.session.get(Machine, machine_id) if gone else None
    if machine is not None and machine.decommissioned_at is None and not machine.draining:
        _said(machine, "machine.offline")
    db.session.commit()


def _said(machine: Machine, kind: str) -> None:
    """A machine's change of state, in the activity feed (an installation's, of no project:
    admins see it) and so to the subscriptions that ask for it."""
    activity.record(
        None, kind, {"machine_id": machine.id, "name": machine.name, "labels": machine.labels}
    )


# -- what admins and users see and do ----------------------------------------------------------


def get_machine(machine_id: int) -> Machine:
    machine = db.session.get(Machine, machine_id)
    if machine is None:
        raise NotFound(f"No machine {machine_id}.")
    return machine


def list_machines(state_filter: str | None = None, label: str | None = None) -> list[Machine]:
    now = utcnow()
    machines = db.session.scalars(sa.select(Machine).order_by(Machine.name))
    return [
        m
        for m in machines
        if (state_filter is None or state(m, now) == state_filter)
        and (label is None or label in m.labels)
    ]


def counts() -> dict[str, int]:
    """Machines by state (the unauthenticated health view: counts only)."""
    now = utcnow()
    by_state = {"online": 0, "offline": 0, "draining": 0, "decommissioned": 0}
    for machine in db.session.scalars(sa.select(Machine)):
        by_state[state(machine, now)] += 1
    return by_state


def update(machine: Machine, data: dict[str, Any]) -> Machine:
    _not_retired(machine)
    if "labels" in data:
        machine.labels = sorted(set(data["labels"]))
    if "slots" in data:
        machine.slots = data["slots"]
    audit.record("machine.update", target_type="machine", target_id=machine.id, payload=data)
    db.session.commit()
    scheduling.schedule_now(explain=True)  # more slots, or labels that runs wait for
    return machine


def set_draining(machine: Machine, draining: bool) -> Machine:
    _not_retired(machine)
    if machine.draining != draining:
        machine.draining = draining
        action = "machine.drain" if draining else "machine.undrain"
        audit.record(action, target_type="machine", target_id=machine.id)
        _said(machine, "machine.draining" if draining else f"machine.{state(machine)}")
    db.session.commit()
    pubsub.to_machine(machine.id, {"frame": {"type": "drain" if draining else "undrain"}})
    if not draining:
        scheduling.schedule_now()
    return machine


def decommission(machine: Machine) -> Machine:
    """Retire a machine: its credential stops working at once and its active runs are queued
    again as new attempts (on any eligible executor)."""
    if machine.decommissioned_at is not None:
        return machine
    machine.decommissioned_at = utcnow()
    machine.credential_hash = digest(new_opaque(CREDENTIAL_PREFIX))  # nothing can match it
    audit.record("machine.decommission", target_type="machine", target_id=machine.id)
    _said(machine, "machine.decommissioned")
    db.session.commit()
    pubsub.to_machine(machine.id, {"close": "decommissioned"})
    sweep.executor_gone(executor_name(machine), f"machine {machine.name} was decommissioned")
    db.session.commit()
    return machine


def _not_retired(machine: Machine) -> None:
    if machine.decommissioned_at is not None:
        raise Conflict(f"Machine {machine.name!r} is decommissioned.")
