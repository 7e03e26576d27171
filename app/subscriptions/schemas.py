import marshmallow as ma

from app.extensions import Schema
from app.pagination import page_schema
from app.subscriptions.models import DELIVERY_STATES, EVENTS
from app.timeutil import Timestamp

_events = ma.fields.List(
    ma.fields.Str(validate=ma.validate.OneOf([*EVENTS, "*"])),
    validate=ma.validate.Length(1, len(EVENTS) + 1),
    metadata={"description": f"one or more of {', '.join(EVENTS)}, or `*` for all"},
)


class SubscriptionCreateSchema(Schema):
    url = ma.fields.Url(
        required=True,
        schemes={"http", "https"},
        require_tld=False,
        validate=ma.validate.Length(max=2000),
    )
    events = _events
    secret = ma.fields.Str(
        load_default=None,
        validate=ma.validate.Length(8, 500),
        metadata={"description": "signs each delivery; generated (and shown once) when omitted"},
    )
    project = ma.fields.Str(
        load_default=None,
        allow_none=True,
        metadata={"description": "only this project's events (default: all projects)"},
    )
    description = ma.fields.Str(load_default=None, allow_none=True)
    active = ma.fields.Bool(load_default=True)

    @ma.validates_schema
    def _events_required(self, data, **_kwargs):  # type: ignore[no-untyped-def]
        if "events" not in data:
            raise ma.ValidationError("Missing data for required field.", "events")


class SubscriptionUpdateSchema(Schema):
    url = ma.fields.Url(
        schemes={"http", "https"}, require_tld=False, validate=ma.validate.Length(max=2000)
    )
    events = _events
    secret = ma.fields.Str(validate=ma.validate.Length(8, 500))
    project = ma.fields.Str(allow_none=True)
    description = ma.fields.Str(allow_none=True)
    active = ma.fields.Bool()


class SubscriptionSchema(ma.Schema):
    id = ma.fields.Int()
    url = ma.fields.Str()
    events = ma.fields.List(ma.fields.Str())
    project = ma.fields.Str(allow_none=True)
    description = ma.fields.Str(allow_none=True)
    active = ma.fields.Bool()
    created_at = Timestamp()
    updated_at = Timestamp()


class SubscriptionCreatedSchema(SubscriptionSchema):
    secret = ma.fields.Str(metadata={"description": "shown this once"})


SubscriptionPageSchema = page_schema(SubscriptionSchema, "SubscriptionPage")


class AttemptSchema(ma.Schema):
    number = ma.fields.Int()
    status_code = ma.fields.Int(allow_none=True)
    error = ma.fields.Str(allow_none=True)
    duration_ms = ma.fields.Int()
    at = Timestamp()


class DeliverySchema(ma.Schema):
    id = ma.fields.Int()
    subscription_id = ma.fields.Int()
    delivery = ma.fields.Str(attribute="guid", metadata={"description": "X-Switchboard-Delivery"})
    event = ma.fields.Str()
    state = ma.fields.Str(metadata={"enum": list(DELIVERY_STATES)})
    attempts = ma.fields.Int(metadata={"description": "since created or last redelivered"})
    next_attempt_at = Timestamp(allow_none=True)
    last_status = ma.fields.Int(allow_none=True)
    last_error = ma.fields.Str(allow_none=True)
    created_at = Timestamp()
    delivered_at = Timestamp(allow_none=True)
    body = ma.fields.Dict()
    history = ma.fields.List(
        ma.fields.Nested(AttemptSchema), metadata={"description": "every attempt"}
    )


DeliveryPageSchema = page_schema(DeliverySchema, "DeliveryPage")
