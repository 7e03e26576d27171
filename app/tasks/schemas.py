import marshmallow as ma

from app.extensions import Schema
from app.input_bounds import Id
from app.pagination import PageQuerySchema, page_schema
from app.runs.schemas import RunSchema
from app.tasks import limits
from app.tasks.models import PRIORITIES, TASK_STATUSES
from app.timeutil import Timestamp


class LoopSchema(Schema):
    max_iterations = ma.fields.Int(
        required=True, validate=ma.validate.Range(1, limits.LOOP_ITERATIONS_MAX)
    )
    done_marker = ma.fields.Str(
        required=True,
        validate=ma.validate.Length(1, limits.DONE_MARKER_MAX),
        metadata={"description": "file (relative to the workspace) whose appearance ends the loop"},
    )


class TaskCreateSchema(Schema):
    project = ma.fields.Str(required=True, metadata={"description": "project key"})
    title = ma.fields.Str(required=True, validate=ma.validate.Length(1, limits.TITLE_MAX))
    prompt = ma.fields.Str(required=True, validate=ma.validate.Length(1, limits.PROMPT_MAX))
    agent = ma.fields.Str(
        load_default=None,
        allow_none=True,
        metadata={"description": "default: the project's default agent"},
    )
    target = ma.fields.Str(
        load_default="pool",
        validate=ma.validate.Length(1, 200),
        metadata={
            "description": "`pool` (the server's workers), `external` (claimed over REST), "
            "`machine:<name>` (that machine) or `labels:<a>,<b>` (any machine with all of them)"
        },
    )
    priority = ma.fields.Str(load_default="normal", validate=ma.validate.OneOf(PRIORITIES))
    depends_on = ma.fields.List(
        Id(), load_default=list, validate=ma.validate.Length(max=limits.DEPENDENCIES_MAX)
    )
    timeout_s = ma.fields.Int(
        load_default=None, allow_none=True, validate=ma.validate.Range(1, limits.TIMEOUT_MAX_S)
    )
    max_attempts = ma.fields.Int(load_default=1, validate=ma.validate.Range(1, limits.ATTEMPTS_MAX))
    loop = ma.fields.Nested(LoopSchema, load_default=None, allow_none=True)
    config = ma.fields.Dict(
        load_default=None,
        allow_none=True,
        metadata={"description": 'agent options, e.g. {"model": "...", "permission_mode": "..."}'},
    )
    tty = ma.fields.Bool(
        load_default=None,
        allow_none=True,
        metadata={
            "description": "run the agent in a pseudo-terminal that people can attach to "
            "(`POST /runs/{id}/terminal-token`); default: the agent's own setting"
        },
    )


class TaskUpdateSchema(Schema):
    title = ma.fields.Str(validate=ma.validate.Length(1, limits.TITLE_MAX))
    priority = ma.fields.Str(validate=ma.validate.OneOf(PRIORITIES))
    depends_on = ma.fields.List(Id(), validate=ma.validate.Length(max=limits.DEPENDENCIES_MAX))


class TaskSchema(ma.Schema):
    id = ma.fields.Int()
    project = ma.fields.Function(lambda obj: obj.project.key, metadata={"type": "string"})
    title = ma.fields.Str()
    prompt = ma.fields.Str()
    agent = ma.fields.Str()
    target = ma.fields.Str()
    priority = ma.fields.Str(metadata={"enum": list(PRIORITIES)})
    status = ma.fields.Str(metadata={"enum": list(TASK_STATUSES)})
    status_reason = ma.fields.Str(allow_none=True)
    queue_position = ma.fields.Int(
        allow_none=True,
        metadata={
            "description": "1-based place among the project's queued tasks; null unless queued"
        },
    )
    depends_on = ma.fields.List(ma.fields.Int())
    timeout_s = ma.fields.Int(allow_none=True)
    max_attempts = ma.fields.Int()
    attempts = ma.fields.Int()
    loop = ma.fields.Dict(allow_none=True)
    config = ma.fields.Dict(allow_none=True)
    tty = ma.fields.Bool(allow_none=True)
    source = ma.fields.Str()
    source_ref = ma.fields.Str(allow_none=True)
    creator_id = ma.fields.Int(allow_none=True)
    latest_run_id = ma.fields.Int(allow_none=True)
    created_at = Timestamp()
    updated_at = Timestamp()
    finished_at = Timestamp(allow_none=True)


class TaskDetailSchema(TaskSchema):
    runs = ma.fields.List(ma.fields.Nested(RunSchema))


TaskPageSchema = page_schema(TaskSchema, "TaskPage")


class TaskQuerySchema(PageQuerySchema):
    project = ma.fields.Str()
    status = ma.fields.Str(validate=ma.validate.OneOf(TASK_STATUSES))
    agent = ma.fields.Str()
    priority = ma.fields.Str(validate=ma.validate.OneOf(PRIORITIES))
    creator = Id(metadata={"description": "creator's user id"})


class ClaimSchema(Schema):
    executor = ma.fields.Str(
        required=True,
        validate=ma.validate.Length(1, 200),
        metadata={"description": "a stable name for the claiming executor"},
    )
