import marshmallow as ma
from flask.views import MethodView

from app.activity import stream
from app.activity.service import latest_id
from app.auth.guard import current_principal, requires
from app.errors import ValidationFailed
from app.extensions import Blueprint, QuerySchema
from app.live.sse import last_event_id, sse, stream_view
from app.projects import service as projects

blp = Blueprint("activity", __name__, url_prefix="/api/v1", description="Activity feed")


class FeedQuerySchema(QuerySchema):
    project = ma.fields.Str(metadata={"description": "only this project (key)"})


@blp.route("/stream")
class ActivityStream(MethodView):
    @stream_view
    @requires("projects:read")
    @blp.arguments(FeedQuerySchema, location="query")
    def get(self, args):
        """Everything happening in the projects I can see: `task.created`, `task.status`,
        `run.status` (more kinds as modules land). Ids are activity ids; resume with
        Last-Event-ID. Without one, the stream starts from now."""
        principal = current_principal()
        ids = projects.visible_project_ids(principal)
        if args.get("project"):
            ids = [projects.project_for(principal, args["project"]).id]
        raw = last_event_id()
        if raw is not None and (not raw.isdigit() or len(raw) > 18):
            raise ValidationFailed("Bad Last-Event-ID.", {"last_event_id": ["not an id"]})
        after = int(raw) if raw is not None else latest_id()
        return sse(stream.follow(after, ids), principal.user.id)
