import marshmallow as ma

from app.extensions import Schema
from app.pagination import PageQuerySchema, page_schema
from app.tasks import limits
from app.tasks.models import PRIORITIES
from app.timeutil import Timestamp
from app.webhooks.models import EVENT_STATES, SOURCE_KINDS

_name = ma.validate.Regexp(
    r"^[a-z0-9][a-z0-9_-]{0,63}$", error="lowercase letters, digits, '-' and '_' (64 at most)"
)


class SourceCreateSchema(Schema):
    name = ma.fields.Str(required=True, validate=_name)
    kind = ma.fields.Str(required=True, validate=ma.validate.OneOf(SOURCE_KINDS))
    secret = ma.fields.Str(
        load_default=None,
        validate=ma.validate.Length(8, 500),
        metadata={"description": "HMAC secret; generated (and shown once) when omitted"},
    )


class SourceSchema(ma.Schema):
    id = ma.fields.Int()
    name = ma.fields.Str()
    kind = ma.fields.Str()
    url = ma.fields.Str(metadata={"description": "where the sender delivers"})
    created_at = Timestamp()


class SourceCreatedSchema(SourceSchema):
    secret = ma.fields.Str(metadata={"description": "shown this once"})


class SourceListSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(SourceSchema))


class SourceGrantCreateSchema(Schema):
    project = ma.fields.Str(
        required=True, validate=ma.validate.Length(1, 64), metadata={"description": "project key"}
    )


class SourceGrantSchema(ma.Schema):
    project = ma.fields.Str()
    granted_by = ma.fields.Int(allow_none=True, metadata={"description": "user id"})
    created_at = Timestamp()


class SourceGrantListSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(SourceGrantSchema))


class ReceiptSchema(ma.Schema):
    id = ma.fields.Int()
    delivery_id = ma.fields.Str()
    event = ma.fields.Str()
    state = ma.fields.Str()
    duplicate = ma.fields.Bool()


class WebhookEventQuerySchema(PageQuerySchema):
    state = ma.fields.Str(validate=ma.validate.OneOf(EVENT_STATES))
    source = ma.fields.Str()
    project = ma.fields.Str(metadata={"description": "events that made tasks in this project"})
    type = ma.fields.Str(metadata={"description": "event type, e.g. `issues`"})


class WebhookEventSummarySchema(ma.Schema):
    id = ma.fields.Int()
    source = ma.fields.Str(attribute="source_name")
    delivery_id = ma.fields.Str()
    type = ma.fields.Str(attribute="event_type")
    action = ma.fields.Str(allow_none=True)
    state = ma.fields.Str(metadata={"enum": list(EVENT_STATES)})
    error = ma.fields.Str(allow_none=True)
    received_at = Timestamp()
    processed_at = Timestamp(allow_none=True)


EventPageSchema = page_schema(WebhookEventSummarySchema, "WebhookEventPage")


class WebhookEventMatchSchema(ma.Schema):
    rule_id = ma.fields.Int(allow_none=True)
    project = ma.fields.Str()
    task_id = ma.fields.Int(allow_none=True)
    created_at = Timestamp()


class WebhookEventSchema(WebhookEventSummarySchema):
    headers = ma.fields.Dict(keys=ma.fields.Str(), values=ma.fields.Str())
    payload = ma.fields.Raw()
    remote_addr = ma.fields.Str(allow_none=True)
    matches = ma.fields.List(ma.fields.Nested(WebhookEventMatchSchema))
    tasks = ma.fields.List(ma.fields.Int(), metadata={"description": "ids of the tasks created"})


def _globs(description: str) -> ma.fields.Raw:
    """A glob or a list of globs (checked by `ConditionsSchema._globs`)."""
    glob = {"type": "string", "minLength": 1, "maxLength": 200}
    one_of = [glob, {"type": "array", "items": glob}]
    return ma.fields.Raw(metadata={"description": description, "anyOf": one_of})


class ConditionsSchema(Schema):
    repository = _globs("glob or list of globs on `owner/repo`")
    label = _globs("glob or list of globs")
    command = ma.fields.Str(
        validate=ma.validate.Length(1, 100),
        metadata={"description": "e.g. `/agent`: a comment line starting with it"},
    )
    branch = _globs("glob or list of globs")
    ignore_bots = ma.fields.Bool(metadata={"description": "default true"})

    @ma.validates_schema
    def _globs(self, data, **_kwargs):  # type: ignore[no-untyped-def]
        for field in ("repository", "label", "branch"):
            value = data.get(field)
            if value is None:
                continue
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(
                isinstance(i, str) and 0 < len(i) <= 200 for i in items
            ):
                raise ma.ValidationError("a string or a list of strings", field)


class TaskTemplateSchema(Schema):
    title = ma.fields.Str(
        required=True,
        validate=ma.validate.Length(1, 2000),
        metadata={"description": "Jinja2 template, e.g. `Fix: {{ issue.title }}`"},
    )
    prompt = ma.fields.Str(required=True, validate=ma.validate.Length(1, limits.PROMPT_MAX))
    agent = ma.fields.Str(load_default=None, allow_none=True)
    target = ma.fields.Str(load_default=None, allow_none=True)
    priority = ma.fields.Str(
        load_default=None, allow_none=True, validate=ma.validate.OneOf(PRIORITIES)
    )
    timeout_s = ma.fields.Int(
        load_default=None, allow_none=True, validate=ma.validate.Range(1, limits.TIMEOUT_MAX_S)
    )
    max_attempts = ma.fields.Int(
        load_default=None, allow_none=True, validate=ma.validate.Range(1, limits.ATTEMPTS_MAX)
    )


class RuleTaskSchema(ma.Schema):
    title = ma.fields.Str()
    prompt = ma.fields.Str()
    agent = ma.fields.Str()
    target = ma.fields.Str()
    priority = ma.fields.Str()
    timeout_s = ma.fields.Int()
    max_attempts = ma.fields.Int()


class RuleCreateSchema(Schema):
    name = ma.fields.Str(required=True, validate=ma.validate.Length(1, 200))
    source = ma.fields.Str(required=True, metadata={"description": "webhook source name"})
    event = ma.fields.Str(
        required=True,
        validate=ma.validate.Length(1, 100),
        metadata={"description": "event type (`issues`, `issue_comment`, ...) or `*`"},
    )
    actions = ma.fields.List(
        ma.fields.Str(validate=ma.validate.Length(1, 100)),
        load_default=list,
        metadata={"description": "empty: any action"},
    )
    conditions = ma.fields.Nested(ConditionsSchema, load_default=dict)
    task = ma.fields.Nested(TaskTemplateSchema, required=True)
    enabled = ma.fields.Bool(load_default=True)


class RuleUpdateSchema(Schema):
    name = ma.fields.Str(validate=ma.validate.Length(1, 200))
    source = ma.fields.Str()
    event = ma.fields.Str(validate=ma.validate.Length(1, 100))
    actions = ma.fields.List(ma.fields.Str(validate=ma.validate.Length(1, 100)))
    conditions = ma.fields.Nested(ConditionsSchema)
    task = ma.fields.Nested(TaskTemplateSchema)
    enabled = ma.fields.Bool()


class RuleSchema(ma.Schema):
    id = ma.fields.Int()
    project = ma.fields.Str()
    name = ma.fields.Str()
    source = ma.fields.Str()
    event = ma.fields.Str()
    actions = ma.fields.List(ma.fields.Str())
    conditions = ma.fields.Dict()
    task = ma.fields.Nested(RuleTaskSchema)
    enabled = ma.fields.Bool()
    source_granted = ma.fields.Bool(
        metadata={
            "description": "false: the source was taken back from the project, and the "
            "rule matches nothing until an administrator grants it again"
        }
    )
    author_id = ma.fields.Int(allow_none=True)
    created_at = Timestamp()
    updated_at = Timestamp()


RulePageSchema = page_schema(RuleSchema, "RulePage")
