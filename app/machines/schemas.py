import marshmallow as ma

from app.extensions import QuerySchema, Schema
from app.machines.models import MACHINE_STATES
from app.timeutil import Timestamp

NAME = ma.validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
    error="letters, digits, '.', '_' and '-' (1 to 100 characters)",
)
LABEL = ma.validate.Regexp(
    r"^[a-z0-9][a-z0-9._:-]{0,62}$",
    error="lowercase letters, digits, '.', '_', ':', '-' (1 to 63 characters)",
)


def _labels(**kwargs: object) -> ma.fields.List:
    return ma.fields.List(
        ma.fields.Str(validate=LABEL), validate=ma.validate.Length(max=32), **kwargs
    )


class MachineTokenCreateSchema(Schema):
    name = ma.fields.Str(
        load_default=None,
        allow_none=True,
        validate=NAME,
        metadata={"description": "the machine it enrolls (else the machine gives its name)"},
    )
    labels = _labels(load_default=list, metadata={"description": "labels it starts with"})
    expires_in_s = ma.fields.Int(
        load_default=None, allow_none=True, validate=ma.validate.Range(60, 365 * 86400)
    )
    uses = ma.fields.Int(load_default=1, validate=ma.validate.Range(1, 10_000))
    replace = ma.fields.Bool(
        load_default=False,
        metadata={"description": "a machine registering under a taken name replaces it"},
    )


class MachineTokenSchema(ma.Schema):
    id = ma.fields.Int()
    name = ma.fields.Str(allow_none=True)
    labels = ma.fields.List(ma.fields.Str())
    prefix = ma.fields.Str(metadata={"description": "first characters, to recognise the token"})
    uses = ma.fields.Int()
    used = ma.fields.Int()
    replace = ma.fields.Bool()
    created_at = Timestamp()
    expires_at = Timestamp(allow_none=True)
    revoked_at = Timestamp(allow_none=True)


class NewMachineTokenSchema(MachineTokenSchema):
    token = ma.fields.Str(metadata={"description": "`sbm_…`, shown once; store it now"})


class MachineTokenListSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(MachineTokenSchema), required=True)


class HardwareSchema(Schema):
    os = ma.fields.Str(validate=ma.validate.Length(max=64))
    arch = ma.fields.Str(validate=ma.validate.Length(max=64))
    cpus = ma.fields.Int(validate=ma.validate.Range(0, 100_000))
    memory_mb = ma.fields.Int(validate=ma.validate.Range(0, 1 << 40))


class RegisterSchema(Schema):
    enrollment_token = ma.fields.Str(
        required=True, load_only=True, validate=ma.validate.Length(1, 200)
    )
    name = ma.fields.Str(load_default=None, allow_none=True, validate=NAME)
    labels = _labels(load_default=list)
    agents = ma.fields.Dict(
        keys=ma.fields.Str(validate=ma.validate.Length(1, 64)),
        values=ma.fields.Str(validate=ma.validate.Length(max=200), allow_none=True),
        validate=ma.validate.Length(max=64),
        load_default=dict,
        metadata={"description": "agent name → version, for the agents installed"},
    )
    slots = ma.fields.Int(load_default=1, validate=ma.validate.Range(1, 256))
    hardware = ma.fields.Nested(HardwareSchema, load_default=dict)
    client_version = ma.fields.Str(
        load_default=None, allow_none=True, validate=ma.validate.Length(max=100)
    )


class RegisteredSchema(ma.Schema):
    machine_id = ma.fields.Int(required=True)
    name = ma.fields.Str(required=True)
    credential = ma.fields.Str(
        required=True, metadata={"description": "`sbk_…`, shown once: the machine's secret"}
    )
    ws_url = ma.fields.Str(required=True, metadata={"description": "the control channel"})


class RotateSchema(Schema):
    credential = ma.fields.Str(
        required=True,
        load_only=True,
        validate=ma.validate.Length(1, 200),
        metadata={"description": "the machine's current credential"},
    )


class NewCredentialSchema(ma.Schema):
    machine_id = ma.fields.Int(required=True)
    credential = ma.fields.Str(required=True, metadata={"description": "the new `sbk_…`"})


class MachineSchema(ma.Schema):
    id = ma.fields.Int()
    name = ma.fields.Str()
    state = ma.fields.Str(metadata={"enum": list(MACHINE_STATES)})
    labels = ma.fields.List(ma.fields.Str())
    slots = ma.fields.Int()
    agents = ma.fields.Dict(keys=ma.fields.Str(), values=ma.fields.Str(allow_none=True))
    hardware = ma.fields.Dict(keys=ma.fields.Str(), values=ma.fields.Raw())
    client_version = ma.fields.Str(allow_none=True)
    created_at = Timestamp()
    last_heartbeat_at = Timestamp(allow_none=True)
    heartbeat = ma.fields.Dict(
        keys=ma.fields.Str(),
        values=ma.fields.Raw(),
        metadata={"description": "the last heartbeat's figures (free slots, CPU, memory, disk)"},
    )
    decommissioned_at = Timestamp(allow_none=True)


class MachineListSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(MachineSchema), required=True)


class MachineQuerySchema(QuerySchema):
    state = ma.fields.Str(validate=ma.validate.OneOf(MACHINE_STATES))
    label = ma.fields.Str(validate=LABEL)


class MachineUpdateSchema(Schema):
    labels = _labels()
    slots = ma.fields.Int(validate=ma.validate.Range(1, 256))


class MachineCountsSchema(ma.Schema):
    online = ma.fields.Int(required=True)
    offline = ma.fields.Int(required=True)
    draining = ma.fields.Int(required=True)
    decommissioned = ma.fields.Int(required=True)
