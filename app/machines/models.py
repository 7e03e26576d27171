"""Machines: hosts of a team's own that connect out to Switchboard and run agents.

An admin makes an enrollment token (`sbm_…`, a number of uses, an expiry); a machine trades it
for its own credential (`sbk_…`, rotatable) when it registers. Only digests are stored.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from app.database import db
from app.timeutil import UTCDateTime, utcnow

ENROLL_PREFIX = "sbm_"
CREDENTIAL_PREFIX = "sbk_"
MACHINE_STATES = ("online", "offline", "draining", "decommissioned")
#: seconds between a machine's heartbeats (told to it in `welcome`)
HEARTBEAT_S = 5
#: a machine is online while its last heartbeat is at most this many intervals old
ONLINE_INTERVALS = 3


class MachineToken(db.Model):
    """An enrollment token: registers up to `uses` machines until it expires or is revoked."""

    __tablename__ = "machine_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    #: a name for the machine it enrolls (a token for one machine), else the machine names itself
    name: Mapped[str | None] = mapped_column(sa.String(100))
    #: labels every machine it enrolls starts with
    labels: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    #: the first characters of the token, to recognise it in a list
    prefix: Mapped[str] = mapped_column(sa.String(16))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    uses: Mapped[int] = mapped_column(default=1)
    used: Mapped[int] = mapped_column(default=0)
    #: a machine registering under a name already taken replaces that machine
    replace: Mapped[bool] = mapped_column(default=False)
    created_by: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Machine(db.Model):
    __tablename__ = "machines"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100), unique=True)
    labels: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    #: runs it takes at once
    slots: Mapped[int] = mapped_column(default=1)
    #: agent name → version, as the machine reported them
    agents: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    #: os, arch, cpus, memory_mb
    hardware: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    credential_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    client_version: Mapped[str | None] = mapped_column(sa.String(100))
    enrolled_with: Mapped[int | None] = mapped_column(
        sa.ForeignKey("machine_tokens.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    #: the last heartbeat and its figures (free slots, CPU, memory, disk, load)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)
    #: the connection serving it now (its id), if one does: a closed one takes the machine
    #: offline at once, unless a newer connection of it took over
    connection: Mapped[str | None] = mapped_column(sa.String(32))
    #: an admin's choice: finish the runs it has, take no new ones
    draining: Mapped[bool] = mapped_column(default=False)
    decommissioned_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


def executor_name(machine: Machine) -> str:
    """What a run on this machine records as its executor."""
    return f"machine:{machine.name}"


def state(machine: Machine, now: datetime) -> str:
    """The one rule for a machine's state: derived when asked, never a flag that goes stale.
    Online: connected (its connection closed takes it offline at once) and heard from lately
    (a host that vanished without closing is offline after three missed heartbeats)."""
    if machine.decommissioned_at is not None:
        return "decommissioned"
    if machine.draining:
        return "draining"
    beat = machine.last_heartbeat_at
    recent = beat is not None and now - beat <= timedelta(seconds=HEARTBEAT_S * ONLINE_INTERVALS)
    return "online" if machine.connection is not None and recent else "offline"
