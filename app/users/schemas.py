import marshmallow as ma

from app.extensions import QuerySchema, Schema
from app.pagination import PageQuerySchema, page_schema
from app.timeutil import Timestamp
from app.users.models import ROLES


class UserSchema(ma.Schema):
    id = ma.fields.Int()
    username = ma.fields.Str()
    email = ma.fields.Str(allow_none=True)
    role = ma.fields.Str(metadata={"enum": list(ROLES)})
    active = ma.fields.Bool(attribute="is_active")
    git_name = ma.fields.Str(allow_none=True)
    git_email = ma.fields.Str(allow_none=True)
    totp_enabled = ma.fields.Bool()
    created_at = Timestamp()
    updated_at = Timestamp()
    last_login_at = Timestamp(allow_none=True)


class MeSchema(UserSchema):
    abilities = ma.fields.List(
        ma.fields.Str(),
        metadata={"description": "what the credential used for this request may do"},
    )


UserPageSchema = page_schema(UserSchema, "UserPage")

_name = ma.validate.Length(max=255)


class UserCreateSchema(Schema):
    username = ma.fields.Str(required=True, validate=ma.validate.Length(1, 64))
    password = ma.fields.Str(required=True, load_only=True)
    email = ma.fields.Email(load_default=None, allow_none=True)
    role = ma.fields.Str(load_default="member", validate=ma.validate.OneOf(ROLES))
    git_name = ma.fields.Str(load_default=None, allow_none=True, validate=_name)
    git_email = ma.fields.Email(load_default=None, allow_none=True)


class UserUpdateSchema(Schema):
    """Admin changes; only the fields sent are changed."""

    role = ma.fields.Str(validate=ma.validate.OneOf(ROLES))
    active = ma.fields.Bool()
    email = ma.fields.Email(allow_none=True)
    git_name = ma.fields.Str(allow_none=True, validate=_name)
    git_email = ma.fields.Email(allow_none=True)


class ProfileUpdateSchema(Schema):
    email = ma.fields.Email(allow_none=True)
    git_name = ma.fields.Str(allow_none=True, validate=_name)
    git_email = ma.fields.Email(allow_none=True)


class PasswordChangeSchema(Schema):
    current_password = ma.fields.Str(required=True, load_only=True)
    new_password = ma.fields.Str(required=True, load_only=True)


class TotpSetupSchema(ma.Schema):
    secret = ma.fields.Str(metadata={"description": "base32; enter it in an authenticator app"})
    otpauth_uri = ma.fields.Str(metadata={"description": "otpauth:// URI, for a QR code"})


class TotpCodeSchema(Schema):
    code = ma.fields.Str(required=True, load_only=True, validate=ma.validate.Length(1, 16))


class UserQuerySchema(PageQuerySchema, QuerySchema):
    role = ma.fields.Str(validate=ma.validate.OneOf(ROLES))
    active = ma.fields.Bool()
    q = ma.fields.Str(metadata={"description": "part of the username or email"})
