import marshmallow as ma
from flask.views import MethodView

from app.activity import stream
from app.activity.service import latest_id
from app.auth.guard import current_principal, requires
from app.errors import Forbidden, ValidationFailed
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
        `run.status`, `question.*`, `review.*` (and machines' states, for admins). Ids are
        activity ids; resume with Last-Event-ID. Without one, the stream starts from now. My
        notifications come too, live, as `notification` events (without an id)."""
        key = args.get("project")

        def followed() -> list[int] | None:
            principal = current_principal()
            if key:
                return [projects.project_for(principal, key).id]
            return projects.visible_project_ids(principal)

        ids = followed()
        raw = last_event_id()
        if raw is not None and (not raw.isdigit() or len(raw) > 18):
            raise ValidationFailed("Bad Last-Event-ID.", {"last_event_id": ["not an id"]})
        after = int(raw) if raw is not None else latest_id()

        def still_allowed() -> None:
            now = followed()
            if now is None or (ids is not None and set(ids) <= set(now)):
                return
            # a project left the stream's sight: the client reconnects (Last-Event-ID) and
            # gets what it may see now
            raise Forbidden("Access to a project this stream follows has changed.")

        user_id = current_principal().user.id
        return sse(stream.follow(after, ids, user_id), still_allowed)
