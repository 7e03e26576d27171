import marshmallow as ma

from app.extensions import Schema
from app.input_bounds import Id
from app.pagination import PageQuerySchema, page_schema
from app.projects.models import PROJECT_ROLES, REVIEW_MODES
from app.timeutil import Timestamp

_cap = ma.validate.Range(1, 10_000)


class ProjectSchema(ma.Schema):
    id = ma.fields.Int()
    key = ma.fields.Str()
    name = ma.fields.Str()
    description = ma.fields.Str(allow_none=True)
    repo_url = ma.fields.Str(allow_none=True)
    default_branch = ma.fields.Str()
    workdir = ma.fields.Str(allow_none=True)
    default_agent = ma.fields.Str()
    max_concurrent_runs = ma.fields.Int(allow_none=True)
    review = ma.fields.Str(
        attribute="review_mode",
        metadata={"enum": list(REVIEW_MODES), "description": "changes wait for approval"},
    )
    review_role = ma.fields.Str(metadata={"enum": ["maintainer", "developer"]})
    agent_instructions = ma.fields.Str(
        attribute="instructions", metadata={"description": "what its agents are told"}
    )
    created_at = Timestamp()
    updated_at = Timestamp()
    archived_at = Timestamp(allow_none=True)


ProjectPageSchema = page_schema(ProjectSchema, "ProjectPage")


class ReviewSettingsSchema(Schema):
    """Review before push, and what agents are told, as a project is created or changed."""

    agent_instructions = ma.fields.Str(
        allow_none=True,
        validate=ma.validate.Length(max=20_000),
        metadata={
            "description": "what its agents are told of Switchboard (how to ask a person); "
            "null: the default, empty: nothing. Claude Code gets it appended to its system "
            "prompt"
        },
    )

    review = ma.fields.Str(
        allow_none=True,
        validate=ma.validate.OneOf(REVIEW_MODES),
        metadata={
            "description": "`required`: a run's change waits for approval before it is pushed "
            "(default for a project with a repository); `none`"
        },
    )
    review_role = ma.fields.Str(
        validate=ma.validate.OneOf(["maintainer", "developer"]),
        metadata={"description": "who may approve (with `git:push`); default maintainer"},
    )


class ProjectCreateSchema(ReviewSettingsSchema):
    key = ma.fields.Str(
        required=True,
        validate=ma.validate.Length(1, 64),
        metadata={"description": "slug: lowercase letters, digits, '-'"},
    )
    name = ma.fields.Str(required=True, validate=ma.validate.Length(1, 200))
    description = ma.fields.Str(load_default=None, allow_none=True)
    repo_url = ma.fields.Str(
        load_default=None, allow_none=True, validate=ma.validate.Length(1, 1000)
    )
    default_branch = ma.fields.Str(load_default="main", validate=ma.validate.Length(1, 200))
    workdir = ma.fields.Str(
        load_default=None, allow_none=True, validate=ma.validate.Length(1, 1000)
    )
    default_agent = ma.fields.Str(load_default="claude", validate=ma.validate.Length(1, 64))
    max_concurrent_runs = ma.fields.Int(load_default=None, allow_none=True, validate=_cap)


class ProjectUpdateSchema(ReviewSettingsSchema):
    name = ma.fields.Str(validate=ma.validate.Length(1, 200))
    description = ma.fields.Str(allow_none=True)
    repo_url = ma.fields.Str(allow_none=True, validate=ma.validate.Length(1, 1000))
    default_branch = ma.fields.Str(validate=ma.validate.Length(1, 200))
    workdir = ma.fields.Str(allow_none=True, validate=ma.validate.Length(1, 1000))
    default_agent = ma.fields.Str(validate=ma.validate.Length(1, 64))
    max_concurrent_runs = ma.fields.Int(allow_none=True, validate=_cap)


class ProjectQuerySchema(PageQuerySchema):
    archived = ma.fields.Bool(load_default=False)


class MemberSchema(ma.Schema):
    user_id = ma.fields.Int()
    username = ma.fields.Str()
    role = ma.fields.Str(metadata={"enum": list(PROJECT_ROLES)})
    created_at = Timestamp()


class MemberListSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(MemberSchema))


class MemberAddSchema(Schema):
    """Exactly one of `username`, `email`, `user_id`."""

    username = ma.fields.Str(validate=ma.validate.Length(1, 64))
    email = ma.fields.Str(validate=ma.validate.Length(3, 320))
    user_id = Id(
        metadata={"description": "a current member's (to change the role); any user's for an admin"}
    )
    role = ma.fields.Str(required=True, validate=ma.validate.OneOf(PROJECT_ROLES))

    @ma.validates_schema
    def _one_name(self, data, **_kwargs):  # type: ignore[no-untyped-def]
        given = [f for f in ("username", "email", "user_id") if data.get(f) is not None]
        if len(given) != 1:
            raise ma.ValidationError("exactly one of username, email, user_id", "username")


class ProjectStatsSchema(ma.Schema):
    tasks = ma.fields.Dict(keys=ma.fields.Str(), values=ma.fields.Int())
    tasks_total = ma.fields.Int()
    runs = ma.fields.Dict(keys=ma.fields.Str(), values=ma.fields.Int())
    runs_total = ma.fields.Int()
    log_bytes = ma.fields.Int()
