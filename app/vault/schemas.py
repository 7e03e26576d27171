import marshmallow as ma

from app.extensions import Schema
from app.timeutil import Timestamp


class SecretUserSchema(ma.Schema):
    id = ma.fields.Int()
    username = ma.fields.Str(allow_none=True)


class SecretSchema(ma.Schema):
    """A secret as the API shows it: never its value."""

    name = ma.fields.Str()
    created_at = Timestamp()
    updated_at = Timestamp()
    updated_by = ma.fields.Nested(SecretUserSchema, allow_none=True)


class SecretListSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(SecretSchema))


class SecretValueSchema(Schema):
    value = ma.fields.Str(
        required=True,
        metadata={"description": "the value (at most 64 KB); stored encrypted, never shown"},
    )
