from flask.views import MethodView

from app.auth.guard import current_principal, requires
from app.extensions import Blueprint
from app.projects import service as projects
from app.vault import service
from app.vault.schemas import SecretListSchema, SecretSchema, SecretValueSchema
from app.view_marks import secret_body

blp = Blueprint(
    "vault",
    __name__,
    url_prefix="/api/v1/projects",
    description="Project secrets: environment variables for a project's agents, never shown",
)


def _secret(project, name):  # type: ignore[no-untyped-def]
    return next(s for s in service.list_secrets(project) if s["name"] == name)


@blp.route("/<key>/secrets")
class Secrets(MethodView):
    @requires("settings:read")
    @blp.response(200, SecretListSchema)
    def get(self, key):
        """The project's secrets: names, when and by whom they were set; never values
        (maintainer)."""
        project = projects.project_for(current_principal(), key, "maintainer")
        return {"data": service.list_secrets(project)}


@blp.route("/<key>/secrets/<name>")
class SecretByName(MethodView):
    @secret_body
    @requires("settings:write")
    @blp.arguments(SecretValueSchema)
    @blp.response(200, SecretSchema)
    @blp.alt_response(201, schema=SecretSchema, description="Created")
    def put(self, data, key, name):
        """Set a secret (maintainer): its agents get it as the environment variable `name`,
        and any output that shows the value is stored and streamed as `***`."""
        project = projects.project_for(current_principal(), key, "maintainer")
        created = service.set_secret(current_principal(), project, name, data["value"])
        return _secret(project, name), 201 if created else 200

    @requires("settings:write")
    @blp.response(204)
    def delete(self, key, name):
        """Remove a secret (maintainer)."""
        project = projects.project_for(current_principal(), key, "maintainer")
        service.delete_secret(project, name)
