import marshmallow as ma

from app.extensions import Schema
from app.terminals.service import MODES
from app.timeutil import Timestamp


class TerminalTokenRequestSchema(Schema):
    mode = ma.fields.Str(
        load_default="view",
        validate=ma.validate.OneOf(MODES),
        metadata={"description": "`view` (watch) or `control` (type; developer, `runs:control`)"},
    )


class TerminalTokenSchema(ma.Schema):
    token = ma.fields.Str(
        metadata={"description": "for `?token=` on `WS /api/v1/runs/{id}/terminal`; works once"}
    )
    mode = ma.fields.Str(metadata={"enum": list(MODES)})
    expires_at = Timestamp()
    url = ma.fields.Str(metadata={"description": "the socket to attach to, token included"})
