"""The machine control channel's frames: JSON text frames, each `{"type": …, …}`, checked here
by one marshmallow schema per type. Flask-free: the machine client builds and reads the same
frames. docs/machines.md describes the protocol; this module is its definition."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import marshmallow as ma

#: the largest frame either side sends (a log frame carries at most `LOG_CHUNK` bytes)
MAX_FRAME_BYTES = 1024 * 1024
LOG_CHUNK = 256 * 1024
FINISHED_STATUSES = ("succeeded", "failed", "cancelled", "timed_out")
#: facts about a run the machine learned from its agent's output
FACTS = ("cost_usd", "input_tokens", "output_tokens", "session_id", "model", "agent_version")
#: WebSocket close codes the server uses
CLOSE_POLICY = 1008  # an unknown or malformed frame, or a failed auth
CLOSE_TOO_BIG = 1009
CLOSE_RESTART = 1012  # the server is restarting: reconnect
CLOSE_REPLACED = 4000  # another connection of the same machine took over


class FrameError(ValueError):
    """A frame the other side must not have sent: said in an `error` frame, then closed."""


class _Frame(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    type = ma.fields.Str(required=True)


def _run_id() -> ma.fields.Int:
    return ma.fields.Int(required=True, strict=True, validate=ma.validate.Range(1, 2**62))


class ResumeSchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    run_id = _run_id()
    #: its agent has a terminal: the server relays people's keys to it again
    tty = ma.fields.Bool(load_default=False)


class AuthSchema(_Frame):
    machine_id = ma.fields.Int(required=True, strict=True, validate=ma.validate.Range(1, 2**62))
    credential = ma.fields.Str(required=True, validate=ma.validate.Length(1, 200))
    client_version = ma.fields.Str(load_default=None, validate=ma.validate.Length(max=100))
    #: runs the machine still holds (after a reconnect): the server answers what it stored
    resume = ma.fields.List(
        ma.fields.Nested(ResumeSchema), load_default=list, validate=ma.validate.Length(max=1024)
    )


class HeartbeatSchema(_Frame):
    free_slots = ma.fields.Int(load_default=None, validate=ma.validate.Range(0, 256))
    agents = ma.fields.Dict(
        keys=ma.fields.Str(validate=ma.validate.Length(1, 64)),
        values=ma.fields.Str(validate=ma.validate.Length(max=200), allow_none=True),
        validate=ma.validate.Length(max=64),
        load_default=None,
    )
    cpu_pct = ma.fields.Float(load_default=None, validate=ma.validate.Range(0, 100_000))
    mem_used_mb = ma.fields.Int(load_default=None, validate=ma.validate.Range(0, 1 << 40))
    disk_free_mb = ma.fields.Int(load_default=None, validate=ma.validate.Range(0, 1 << 40))
    load = ma.fields.Float(load_default=None, validate=ma.validate.Range(0, 1_000_000))


class AcceptSchema(_Frame):
    run_id = _run_id()


class RejectSchema(_Frame):
    run_id = _run_id()
    reason = ma.fields.Str(load_default="", validate=ma.validate.Length(max=500))


class StartedSchema(_Frame):
    run_id = _run_id()
    pid = ma.fields.Int(load_default=None, validate=ma.validate.Range(0, 2**31))
    agent_version = ma.fields.Str(load_default=None, validate=ma.validate.Length(max=200))
    #: its agent runs in a terminal (the assignment said `tty`): people's keys come as `pty_*`
    tty = ma.fields.Bool(load_default=False)


class LogSchema(_Frame):
    run_id = _run_id()
    offset = ma.fields.Int(required=True, strict=True, validate=ma.validate.Range(0, 2**62))
    text = ma.fields.Str(validate=ma.validate.Length(max=LOG_CHUNK))
    data = ma.fields.Str(
        validate=ma.validate.Length(max=LOG_CHUNK * 4 // 3 + 4),
        metadata={"description": "base64: output that is not whole UTF-8"},
    )

    @ma.validates_schema
    def _one_payload(self, data: dict[str, Any], **_kwargs: Any) -> None:
        if ("text" in data) == ("data" in data):
            raise ma.ValidationError("exactly one of text and data")


class EventBodySchema(ma.Schema):
    class Meta:
        unknown = ma.RAISE

    type = ma.fields.Str(required=True, validate=ma.validate.Length(1, 64))
    data = ma.fields.Dict(load_default=dict)


class EventSchema(_Frame):
    run_id = _run_id()
    seq = ma.fields.Int(required=True, strict=True, validate=ma.validate.Range(1, 2**31))
    event = ma.fields.Nested(EventBodySchema, required=True)


class FactsSchema(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE

    cost_usd = ma.fields.Float(allow_none=True, validate=ma.validate.Range(0, 1e9))
    input_tokens = ma.fields.Int(allow_none=True, validate=ma.validate.Range(0, 2**62))
    output_tokens = ma.fields.Int(allow_none=True, validate=ma.validate.Range(0, 2**62))
    session_id = ma.fields.Str(allow_none=True, validate=ma.validate.Length(max=200))
    model = ma.fields.Str(allow_none=True, validate=ma.validate.Length(max=200))
    agent_version = ma.fields.Str(allow_none=True, validate=ma.validate.Length(max=200))


class FinishedSchema(_Frame):
    run_id = _run_id()
    status = ma.fields.Str(required=True, validate=ma.validate.OneOf(FINISHED_STATUSES))
    exit_code = ma.fields.Int(load_default=None, validate=ma.validate.Range(-(2**31), 2**31))
    #: the log's length when the run ended: the server takes the end once it holds all of it
    log_size = ma.fields.Int(required=True, strict=True, validate=ma.validate.Range(0, 2**62))
    event_count = ma.fields.Int(load_default=0, validate=ma.validate.Range(0, 2**31))
    summary = ma.fields.Str(load_default=None, validate=ma.validate.Length(max=1000))
    branch = ma.fields.Str(load_default=None, validate=ma.validate.Length(max=300))
    commit_sha = ma.fields.Str(load_default=None, validate=ma.validate.Length(max=64))
    diff_stat = ma.fields.Str(load_default=None, validate=ma.validate.Length(max=100_000))
    facts = ma.fields.Nested(FactsSchema, load_default=dict)


#: what a machine may send, by type (`auth` only first)
FROM_MACHINE: dict[str, type[ma.Schema]] = {
    "auth": AuthSchema,
    "heartbeat": HeartbeatSchema,
    "accept": AcceptSchema,
    "reject": RejectSchema,
    "started": StartedSchema,
    "log": LogSchema,
    "event": EventSchema,
    "finished": FinishedSchema,
}
_SCHEMAS = {name: schema() for name, schema in FROM_MACHINE.items()}


def parse(raw: str | bytes) -> dict[str, Any]:
    """A machine's frame, checked; `FrameError` saying what is wrong otherwise."""
    if isinstance(raw, bytes):
        raise FrameError("frames are JSON text, not binary")
    if len(raw) > MAX_FRAME_BYTES:
        raise FrameError("frame too large")
    try:
        frame = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FrameError(f"not JSON: {exc}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise FrameError("a frame is an object with a `type`")
    schema = _SCHEMAS.get(frame["type"])
    if schema is None:
        raise FrameError(f"unknown frame type {frame['type'][:64]!r}")
    try:
        return schema.load(frame)
    except ma.ValidationError as exc:
        raise FrameError(f"{frame['type']}: {exc.messages}") from None


def log_bytes(frame: dict[str, Any]) -> bytes:
    """A `log` frame's output."""
    if "text" in frame:
        return frame["text"].encode()
    try:
        return base64.b64decode(frame["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameError(f"log: data is not base64 ({exc})") from None


def dump(frame: dict[str, Any]) -> str:
    """A frame as sent (`{"type": …, …}`)."""
    return json.dumps(frame, separators=(",", ":"), default=str)
