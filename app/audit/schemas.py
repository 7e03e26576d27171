import marshmallow as ma

from app.input_bounds import Id
from app.pagination import PageQuerySchema, page_schema
from app.timeutil import Timestamp


class AuditLogSchema(ma.Schema):
    id = ma.fields.Int()
    created_at = Timestamp()
    actor_id = ma.fields.Int(allow_none=True)
    actor_name = ma.fields.Str(allow_none=True)
    via = ma.fields.Str(allow_none=True, metadata={"description": "session, pat:<id>, cli..."})
    action = ma.fields.Str()
    target_type = ma.fields.Str(allow_none=True)
    target_id = ma.fields.Str(allow_none=True)
    request_id = ma.fields.Str(allow_none=True)
    ip = ma.fields.Str(allow_none=True)
    payload = ma.fields.Dict(allow_none=True)


AuditLogPageSchema = page_schema(AuditLogSchema, "AuditLogPage")


class AuditQuerySchema(PageQuerySchema):
    actor_id = Id()
    action = ma.fields.Str(metadata={"description": "exact action, or a prefix ending in '.'"})
    target_type = ma.fields.Str()
    target_id = ma.fields.Str()
    since = Timestamp(metadata={"description": "from this time (inclusive)"})
    until = Timestamp(metadata={"description": "before this time"})
