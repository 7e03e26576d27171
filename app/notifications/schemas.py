import marshmallow as ma

from app.extensions import Schema
from app.notifications.models import CHANNELS, KINDS
from app.pagination import PageMetaSchema, PageQuerySchema
from app.timeutil import Timestamp


class NotificationSchema(ma.Schema):
    id = ma.fields.Int()
    kind = ma.fields.Str(metadata={"enum": list(KINDS)})
    title = ma.fields.Str()
    body = ma.fields.Str()
    link = ma.fields.Str(allow_none=True, metadata={"description": "the API path it is about"})
    data = ma.fields.Dict()
    created_at = Timestamp()
    read_at = Timestamp(allow_none=True)
    emailed_at = Timestamp(allow_none=True)
    chatted_at = Timestamp(allow_none=True)


class NotificationMetaSchema(PageMetaSchema):
    unread = ma.fields.Int(metadata={"description": "my unread notifications, all pages"})


class NotificationPageSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(NotificationSchema), required=True)
    meta = ma.fields.Nested(NotificationMetaSchema, required=True)


class NotificationQuerySchema(PageQuerySchema):
    unread = ma.fields.Bool(load_default=False, metadata={"description": "unread ones only"})


class ReadAllSchema(ma.Schema):
    read = ma.fields.Int(metadata={"description": "how many were marked read"})


class UnreadSchema(ma.Schema):
    unread = ma.fields.Int()


class NotificationSettingsSchema(ma.Schema):
    channels = ma.fields.Dict(
        metadata={"description": "per kind, per channel (in_app, email, chat): on or off"}
    )
    chat_url = ma.fields.Str(allow_none=True)


class NotificationSettingsUpdateSchema(Schema):
    channels = ma.fields.Dict(
        keys=ma.fields.Str(validate=ma.validate.OneOf(KINDS)),
        values=ma.fields.Dict(
            keys=ma.fields.Str(validate=ma.validate.OneOf(CHANNELS)), values=ma.fields.Bool()
        ),
        metadata={"description": 'e.g. {"question": {"email": false}}; the rest keep defaults'},
    )
    chat_url = ma.fields.Str(
        allow_none=True,
        validate=ma.validate.Length(max=2000),
        metadata={"description": 'a Slack-compatible incoming webhook: {"text": …} is posted'},
    )
