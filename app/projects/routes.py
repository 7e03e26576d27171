from flask.views import MethodView

from app.auth.guard import current_principal, requires
from app.extensions import Blueprint
from app.projects import service
from app.projects.schemas import (
    MemberAddSchema,
    MemberListSchema,
    MemberSchema,
    ProjectCreateSchema,
    ProjectPageSchema,
    ProjectQuerySchema,
    ProjectSchema,
    ProjectStatsSchema,
    ProjectUpdateSchema,
)
from app.users.service import get_user

blp = Blueprint(
    "projects", __name__, url_prefix="/api/v1/projects", description="Projects and their members"
)


@blp.route("")
class Projects(MethodView):
    @requires("projects:read")
    @blp.arguments(ProjectQuerySchema, location="query")
    @blp.response(200, ProjectPageSchema)
    def get(self, args):
        """Projects I am a member of (all of them for admins)."""
        return service.list_projects(
            current_principal(),
            archived=args["archived"],
            cursor=args.get("cursor"),
            limit=args["limit"],
        ).response()

    @requires("projects:write")
    @blp.arguments(ProjectCreateSchema)
    @blp.response(201, ProjectSchema)
    def post(self, data):
        """Create a project; its creator becomes its maintainer."""
        project = service.create_project(current_principal(), data)
        return project, 201, {"Location": f"/api/v1/projects/{project.key}"}


@blp.route("/<key>")
class ProjectByKey(MethodView):
    @requires("projects:read")
    @blp.response(200, ProjectSchema)
    def get(self, key):
        """One project (viewer)."""
        return service.project_for(current_principal(), key)

    @requires("projects:write")
    @blp.arguments(ProjectUpdateSchema)
    @blp.response(200, ProjectSchema)
    def patch(self, data, key):
        """Change a project (maintainer)."""
        project = service.project_for(current_principal(), key, "maintainer")
        return service.update_project(project, data)

    @requires("projects:write")
    @blp.response(204)
    def delete(self, key):
        """Archive a project (maintainer; 409 while runs are active)."""
        service.archive_project(service.project_for(current_principal(), key, "maintainer"))


@blp.route("/<key>/stats")
class ProjectStats(MethodView):
    @requires("projects:read")
    @blp.response(200, ProjectStatsSchema)
    @blp.doc(operationId="getProjectStats")
    def get(self, key):
        """Tasks and runs by status, and log bytes stored (viewer)."""
        return service.stats(service.project_for(current_principal(), key))


def _member(member, user):  # type: ignore[no-untyped-def]
    return {
        "user_id": member.user_id,
        "username": user.username,
        "role": member.role,
        "created_at": member.created_at,
    }


@blp.route("/<key>/members")
class Members(MethodView):
    @requires("projects:read")
    @blp.response(200, MemberListSchema)
    def get(self, key):
        """Members and their roles (viewer)."""
        project = service.project_for(current_principal(), key)
        return {"data": [_member(m, u) for m, u in service.list_members(project)]}

    @requires("projects:write")
    @blp.arguments(MemberAddSchema)
    @blp.response(201, MemberSchema)
    def post(self, data, key):
        """Add a member by `username` or `email`, or change a member's role (by `user_id` too)
        (maintainer)."""
        principal = current_principal()
        project = service.project_for(principal, key, "maintainer")
        user_id = service.member_named(principal, project, data)
        member = service.set_member(project, user_id, data["role"])
        return (
            _member(member, get_user(member.user_id)),
            201,
            {"Location": f"/api/v1/projects/{key}/members/{member.user_id}"},
        )


@blp.route("/<key>/members/<int:user_id>")
class Member(MethodView):
    @requires("projects:read")
    @blp.response(200, MemberSchema)
    def get(self, key, user_id):
        """One member's role (viewer)."""
        project = service.project_for(current_principal(), key)
        member, user = service.get_member(project, user_id)
        return _member(member, user)

    @requires("projects:write")
    @blp.response(204)
    def delete(self, key, user_id):
        """Remove a member (maintainer)."""
        service.remove_member(service.project_for(current_principal(), key, "maintainer"), user_id)
