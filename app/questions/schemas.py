import marshmallow as ma

from app.extensions import Schema
from app.input_bounds import Id
from app.live.waiting import WaitQuerySchema
from app.pagination import PageQuerySchema, page_schema
from app.questions.models import KINDS, STATUSES
from app.questions.service import ANSWER_MAX, OPTION_MAX, OPTIONS_MAX
from app.timeutil import Timestamp


class QuestionAskSchema(Schema):
    kind = ma.fields.Str(load_default="confirm", validate=ma.validate.OneOf(KINDS))
    prompt = ma.fields.Str(required=True, validate=ma.validate.Length(1, 4000))
    options = ma.fields.List(
        ma.fields.Str(validate=ma.validate.Length(1, OPTION_MAX)),
        load_default=None,
        validate=ma.validate.Length(max=OPTIONS_MAX),
        metadata={"description": "a `choice`'s options"},
    )
    default = ma.fields.Str(
        load_default=None,
        allow_none=True,
        validate=ma.validate.Length(max=ANSWER_MAX),
        metadata={"description": "what an expired question answers"},
    )
    timeout_s = ma.fields.Int(
        load_default=None,
        allow_none=True,
        validate=ma.validate.Range(1, 7 * 24 * 3600),
        metadata={"description": "seconds until it expires (default: never)"},
    )


class QuestionSchema(ma.Schema):
    id = ma.fields.Int()
    run_id = ma.fields.Int()
    task_id = ma.fields.Int()
    project = ma.fields.Function(lambda q: q.project.key, metadata={"type": "string"})
    kind = ma.fields.Str(metadata={"enum": list(KINDS)})
    prompt = ma.fields.Str()
    options = ma.fields.List(ma.fields.Str(), allow_none=True)
    default = ma.fields.Str(allow_none=True)
    timeout_s = ma.fields.Int(allow_none=True)
    expires_at = Timestamp(allow_none=True)
    status = ma.fields.Str(metadata={"enum": list(STATUSES)})
    answer = ma.fields.Str(allow_none=True)
    answered_by = ma.fields.Str(attribute="answered_by_name", allow_none=True)
    answered_at = Timestamp(allow_none=True)
    created_at = Timestamp()


QuestionPageSchema = page_schema(QuestionSchema, "QuestionPage")


class QuestionQuerySchema(PageQuerySchema):
    status = ma.fields.Str(validate=ma.validate.OneOf(STATUSES))
    project = ma.fields.Str()
    run = Id()


class QuestionWaitSchema(WaitQuerySchema):
    pass


class AnswerSchema(Schema):
    answer = ma.fields.Raw(
        required=True,
        metadata={"type": "string", "description": "`yes`/`no`, one of the options, or text"},
    )
