import marshmallow as ma

from app.extensions import QuerySchema, Schema
from app.input_bounds import MAX_BIGINT, MAX_ID, MIN_INT, Id
from app.pagination import PageQuerySchema, page_schema
from app.runs.models import RUN_STATUSES
from app.timeutil import Timestamp


class RunSchema(ma.Schema):
    id = ma.fields.Int()
    task_id = ma.fields.Int()
    project = ma.fields.Function(lambda obj: obj.project.key, metadata={"type": "string"})
    attempt = ma.fields.Int()
    status = ma.fields.Str(metadata={"enum": list(RUN_STATUSES)})
    agent = ma.fields.Str()
    executor = ma.fields.Str(allow_none=True)
    lease_expires_at = Timestamp(allow_none=True)
    queued_at = Timestamp()
    started_at = Timestamp(allow_none=True)
    finished_at = Timestamp(allow_none=True)
    stop_requested_at = Timestamp(allow_none=True)
    exit_code = ma.fields.Int(allow_none=True)
    error_summary = ma.fields.Str(allow_none=True)
    agent_version = ma.fields.Str(allow_none=True)
    session_id = ma.fields.Str(allow_none=True)
    model = ma.fields.Str(allow_none=True)
    cost_usd = ma.fields.Float(allow_none=True)
    input_tokens = ma.fields.Int(allow_none=True)
    output_tokens = ma.fields.Int(allow_none=True)
    branch = ma.fields.Str(allow_none=True)
    commit_sha = ma.fields.Str(allow_none=True)
    diff_stat = ma.fields.Str(allow_none=True)
    review = ma.fields.Str(
        allow_none=True,
        metadata={
            "enum": ["pending", "approving", "approved", "rejected", None],
            "description": "its change's review (null: nothing to review)",
        },
    )
    review_error = ma.fields.Str(allow_none=True)
    pull_request_url = ma.fields.Str(allow_none=True)
    log_size = ma.fields.Int()
    event_count = ma.fields.Int()


RunPageSchema = page_schema(RunSchema, "RunPage")


class RunQuerySchema(PageQuerySchema):
    project = ma.fields.Str()
    task = Id()
    status = ma.fields.Str(validate=ma.validate.OneOf(RUN_STATUSES))
    executor = ma.fields.Str(metadata={"description": "prefix, e.g. `pool:` or a name"})


class LogQuerySchema(QuerySchema):
    offset = ma.fields.Int(load_default=0, validate=ma.validate.Range(0, MAX_BIGINT))
    limit = ma.fields.Int(load_default=65536, validate=ma.validate.Range(1, 1024 * 1024))


class LogPageSchema(ma.Schema):
    offset = ma.fields.Int()
    next_offset = ma.fields.Int()
    size = ma.fields.Int(metadata={"description": "bytes stored so far"})
    text = ma.fields.Str(metadata={"description": "UTF-8; invalid bytes become U+FFFD"})
    complete = ma.fields.Bool(metadata={"description": "the run ended and this is the end"})


class EventSchema(ma.Schema):
    seq = ma.fields.Int()
    type = ma.fields.Str()
    data = ma.fields.Dict()
    created_at = Timestamp()


class EventReportSchema(Schema):
    type = ma.fields.Str(
        required=True,
        validate=ma.validate.Regexp(
            r"^[a-z][a-z0-9_.:-]{0,63}$", error="1-64 characters: a-z, 0-9, '_', '.', ':', '-'"
        ),
    )
    data = ma.fields.Dict(load_default=dict, metadata={"description": "a JSON object"})


class EventPageSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(EventSchema))
    meta = ma.fields.Dict()


class EventQuerySchema(QuerySchema):
    after = ma.fields.Int(
        load_default=None,
        validate=ma.validate.Range(0, MAX_ID),  # `seq` is an integer column
        metadata={"description": "last seq seen"},
    )
    type = ma.fields.Str()
    limit = ma.fields.Int(load_default=100, validate=ma.validate.Range(1, 1000))


class ExecutorSchema(Schema):
    executor = ma.fields.Str(required=True, validate=ma.validate.Length(1, 200))


class HeartbeatResponseSchema(ma.Schema):
    lease_expires_at = Timestamp()
    stop_requested = ma.fields.Bool()


class LogAppendSchema(Schema):
    executor = ma.fields.Str(required=True, validate=ma.validate.Length(1, 200))
    offset = ma.fields.Int(required=True, validate=ma.validate.Range(0, MAX_BIGINT))
    text = ma.fields.Str(
        required=True,
        validate=ma.validate.Length(max=1024 * 1024),
        metadata={"nul": True},  # stored as bytes, as an agent's output is
    )


class LogAppendResponseSchema(ma.Schema):
    size = ma.fields.Int()
    stored = ma.fields.Int(metadata={"description": "new bytes stored by this call"})


class CompleteSchema(Schema):
    executor = ma.fields.Str(required=True, validate=ma.validate.Length(1, 200))
    status = ma.fields.Str(
        required=True, validate=ma.validate.OneOf(("succeeded", "failed", "cancelled", "timed_out"))
    )
    exit_code = ma.fields.Int(
        load_default=None, allow_none=True, validate=ma.validate.Range(MIN_INT, MAX_ID)
    )
    summary = ma.fields.Str(
        load_default=None, allow_none=True, validate=ma.validate.Length(max=1000)
    )
