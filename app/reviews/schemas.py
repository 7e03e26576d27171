import marshmallow as ma

from app.extensions import QuerySchema, Schema


class DiffQuerySchema(QuerySchema):
    path = ma.fields.Str(
        validate=ma.validate.Length(1, 4096), metadata={"description": "one file's part only"}
    )


class DiffSchema(ma.Schema):
    run_id = ma.fields.Int()
    branch = ma.fields.Str()
    base_commit = ma.fields.Str()
    head_commit = ma.fields.Str()
    path = ma.fields.Str(allow_none=True)
    diff = ma.fields.Str(metadata={"description": "unified diff against the base commit"})
    truncated = ma.fields.Bool(metadata={"description": "the diff was cut at 1 MiB"})


class ChangedFileSchema(ma.Schema):
    path = ma.fields.Str()
    status = ma.fields.Str(metadata={"enum": ["added", "modified", "deleted", "renamed"]})
    additions = ma.fields.Int()
    deletions = ma.fields.Int()
    binary = ma.fields.Bool()


class ChangedFilesSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(ChangedFileSchema))


class PullRequestSchema(Schema):
    title = ma.fields.Str(load_default=None, validate=ma.validate.Length(1, 300))
    draft = ma.fields.Bool(load_default=False)


class ApproveSchema(Schema):
    comment = ma.fields.Str(load_default=None, validate=ma.validate.Length(max=10_000))
    push = ma.fields.Bool(
        load_default=True, metadata={"description": "push the run's branch to the remote"}
    )
    pull_request = ma.fields.Nested(
        PullRequestSchema,
        load_default=None,
        allow_none=True,
        metadata={"description": "open a pull request after the push (GitHub remotes)"},
    )


class RejectSchema(Schema):
    comment = ma.fields.Str(required=True, validate=ma.validate.Length(1, 10_000))
    retry = ma.fields.Bool(
        load_default=False,
        metadata={"description": "start another attempt with the comment as feedback"},
    )
