"""Who may attach to a run's terminal, and who holds its keyboard.

Watching needs read access to the run's project; typing (`control`) needs the `runs:control`
ability and the developer role. One controller at a time: the claim is a Redis key holding the
controlling socket (with an expiry its socket keeps renewing, so the keyboard of a web process
that died comes free); a take-over replaces it and every socket attached hears so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from app.agents.registry import known_agents
from app.audit import service as audit
from app.auth.service import Principal
from app.database import db
from app.errors import Conflict, Forbidden, ValidationFailed
from app.queues import get_redis
from app.runs import service as runs
from app.runs.models import RUN_TERMINAL, Run
from app.tasks.models import Task
from app.terminals import relay

MODES = ("view", "control")
#: (role in the project, ability) each mode needs
NEEDS = {"view": ("viewer", "projects:read"), "control": ("developer", "runs:control")}
#: a controller's claim lasts this long unless its socket renews it
CLAIM_TTL_S = 30


def attachable(principal: Principal, run_id: int, mode: str) -> Run:
    """The run, if `principal` may attach to its terminal in `mode`; else the error to answer."""
    if mode not in MODES:
        raise ValidationFailed("Bad mode.", {"mode": ["view or control"]})
    role, ability = NEEDS[mode]
    if principal.kind == "run":
        raise Forbidden("A run's token cannot attach to a terminal.")
    if not principal.can(ability):
        raise Forbidden(f"Attaching to {mode} needs the '{ability}' ability.")
    run = runs.run_for(principal, run_id, role)
    if not has_terminal(run):
        raise Conflict(f"Run {run_id} has no terminal: its task did not ask for one (`tty`).")
    if mode == "control" and run.status in RUN_TERMINAL:
        raise Conflict(f"Run {run_id} has ended ({run.status}); there is nothing to control.")
    return run


def has_terminal(run: Run) -> bool:
    asked = db.session.scalar(sa.select(Task.tty).where(Task.id == run.task_id))
    return in_terminal(run.agent, asked)


def in_terminal(agent_name: str, asked: bool | None) -> bool:
    """Whether a run of `agent_name` for a task that asked `tty` gets a terminal (this server's
    registry decides, for the pool and for machines alike)."""
    agent = known_agents().get(agent_name)
    return agent is not None and agent.in_terminal(asked)


# -- the keyboard ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A socket holding (or asking for) the keyboard."""

    conn: str
    user_id: int
    username: str

    def dump(self) -> str:
        return json.dumps({"conn": self.conn, "user_id": self.user_id, "username": self.username})

    def public(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "username": self.username}


def _holder(raw: bytes | None) -> Holder | None:
    if raw is None:
        return None
    try:
        return Holder(**json.loads(raw))
    except (ValueError, TypeError):
        return None


def controller(run_id: int) -> Holder | None:
    return _holder(get_redis().get(relay.controller_key(run_id)))


def take_control(run_id: int, holder: Holder, takeover: bool) -> Holder | None:
    """Claim the keyboard for `holder`; the one it was taken from (take-over). Conflict when
    someone holds it and this is not a take-over."""
    key = relay.controller_key(run_id)
    client = get_redis()
    if takeover:
        previous = _holder(client.set(key, holder.dump(), ex=CLAIM_TTL_S, get=True))
    else:
        if not client.set(key, holder.dump(), ex=CLAIM_TTL_S, nx=True):
            current = controller(run_id)
            who = current.username if current else "someone"
            raise Conflict(
                f"{who} controls this terminal; attach with `takeover=1` to take it over, "
                "or attach to view.",
                controller=current.public() if current else None,
            )
        previous = None
    _said(run_id, holder, "takeover" if previous else "take", previous)
    return previous


#: renew or give back a claim, only while it is still this socket's
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('expire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def keep_control(run_id: int, holder: Holder) -> bool:
    """Renew the claim; False when it is no longer this socket's."""
    key = relay.controller_key(run_id)
    return bool(get_redis().eval(_RENEW, 1, key, holder.dump(), CLAIM_TTL_S))


def release(run_id: int, holder: Holder) -> bool:
    """Hand the keyboard back (if this socket still holds it)."""
    released = bool(get_redis().eval(_RELEASE, 1, relay.controller_key(run_id), holder.dump()))
    if released:
        _said(run_id, holder, "release", None)
    return released


def _said(run_id: int, holder: Holder, action: str, previous: Holder | None) -> None:
    """The audit log and the run's events keep who holds the keyboard; then everyone attached
    hears it."""
    data: dict[str, Any] = {"action": action, "user": holder.username}
    if previous is not None:
        data["previous"] = previous.username
    audit.record_now(
        f"terminal.{action}",
        target_type="run",
        target_id=run_id,
        payload=data,
        actor_id=holder.user_id,
        actor_name=holder.username,
    )
    relay.put(run_id, relay.NOTE, {"type": "terminal_control", "data": data})
    relay.tell(
        run_id,
        {
            "type": "control",
            "action": action,
            "controller": None if action == "release" else {**holder.public(), "conn": holder.conn},
            "by": holder.username,
        },
    )


def resize(run_id: int, holder: Holder, cols: int, rows: int) -> bool:
    """Ask the run's executor for a new size (it tells everyone when it is done)."""
    if not relay.put(run_id, relay.RESIZE, {"cols": cols, "rows": rows, "by": holder.username}):
        return False
    audit.record_now(
        "terminal.resize",
        target_type="run",
        target_id=run_id,
        payload={"cols": cols, "rows": rows},
        actor_id=holder.user_id,
        actor_name=holder.username,
    )
    return True
