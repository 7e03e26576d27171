import marshmallow as ma

from app.auth.abilities import ABILITIES
from app.extensions import Schema
from app.pagination import page_schema
from app.timeutil import Timestamp


class LoginSchema(Schema):
    username = ma.fields.Str(
        validate=ma.validate.Length(1, 255), metadata={"description": "username or email"}
    )
    email = ma.fields.Email(metadata={"description": "alternative to `username`"})
    password = ma.fields.Str(required=True, validate=ma.validate.Length(1, 1024), load_only=True)
    totp_code = ma.fields.Str(
        load_default=None, allow_none=True, load_only=True, validate=ma.validate.Length(max=16)
    )

    @ma.validates_schema
    def _one_identifier(self, data: dict, **_kwargs: object) -> None:
        if not data.get("username") and not data.get("email"):
            raise ma.ValidationError("username or email is required", "username")


class TokenPairSchema(ma.Schema):
    access_token = ma.fields.Str(required=True)
    refresh_token = ma.fields.Str(required=True)
    token_type = ma.fields.Str(required=True, metadata={"example": "Bearer"})
    expires_in = ma.fields.Int(required=True, metadata={"description": "access token seconds"})


class RefreshSchema(Schema):
    refresh_token = ma.fields.Str(
        required=True, validate=ma.validate.Length(1, 200), load_only=True
    )


class TokenCreateSchema(Schema):
    label = ma.fields.Str(required=True, validate=ma.validate.Length(1, 100))
    abilities = ma.fields.List(
        ma.fields.Str(validate=ma.validate.OneOf(ABILITIES)),
        required=True,
        validate=ma.validate.Length(min=1),
    )
    expires_at = Timestamp(load_default=None, allow_none=True)


class TokenSchema(ma.Schema):
    id = ma.fields.Int(dump_only=True)
    label = ma.fields.Str()
    prefix = ma.fields.Str(metadata={"description": "first characters, to recognise the token"})
    abilities = ma.fields.List(ma.fields.Str())
    created_at = Timestamp()
    expires_at = Timestamp(allow_none=True)
    last_used_at = Timestamp(allow_none=True)
    revoked_at = Timestamp(allow_none=True)


class NewTokenSchema(TokenSchema):
    token = ma.fields.Str(metadata={"description": "shown once; store it now"})


TokenPageSchema = page_schema(TokenSchema, "TokenPage")


class StreamTokenRequestSchema(Schema):
    path = ma.fields.Str(
        required=True,
        validate=ma.validate.Length(1, 500),
        metadata={"description": "path prefix the token opens, e.g. /api/v1/runs/5/stream"},
    )


class StreamTokenSchema(ma.Schema):
    token = ma.fields.Str()
    expires_in = ma.fields.Int()
    path = ma.fields.Str()
