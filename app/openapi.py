"""OpenAPI 3.1 settings for flask-smorest and the self-hosted Swagger UI.

The spec is generated from the blueprints and schemas, never written by hand. Swagger UI's assets
come from the swagger-ui-bundle package, so the interactive docs work without internet access.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from apispec import APISpec, BasePlugin
from flask import Blueprint, Flask, send_from_directory

from app import __version__
from app.auth.guard import DEFAULT_SECURITY, SECURITY_SCHEMES

ASSETS_PREFIX = "/api/v1/docs/assets"


def openapi_config() -> dict[str, Any]:
    return {
        "API_TITLE": "Switchboard",
        "API_VERSION": __version__,
        "OPENAPI_VERSION": "3.1.0",
        "OPENAPI_URL_PREFIX": "/api/v1",
        "OPENAPI_JSON_PATH": "openapi.json",
        "OPENAPI_SWAGGER_UI_PATH": "docs",
        "OPENAPI_SWAGGER_UI_URL": ASSETS_PREFIX + "/",
        "OPENAPI_SWAGGER_UI_CONFIG": {"persistAuthorization": True},
        "API_SPEC_OPTIONS": {
            "info": {
                "description": "Switchboard: a self-hosted control plane for AI coding agents. "
                "Errors are application/problem+json; lists use cursor pagination.",
            },
            "security": DEFAULT_SECURITY,
            "components": {"securitySchemes": SECURITY_SCHEMES},
        },
    }


def shared_enums() -> dict[str, tuple[str, ...]]:
    """The enums the API uses in more than one place, by the name a client knows them by."""
    from app.projects.models import PROJECT_ROLES
    from app.runs.models import RUN_STATUSES
    from app.subscriptions.models import EVENTS
    from app.tasks.models import PRIORITIES, TASK_STATUSES
    from app.users.models import ROLES
    from app.webhooks.models import EVENT_STATES

    return {
        "Priority": PRIORITIES,
        "TaskStatus": TASK_STATUSES,
        "RunStatus": RUN_STATUSES,
        "Role": ROLES,
        "ProjectRole": PROJECT_ROLES,
        "WebhookEventState": EVENT_STATES,
        "SubscriptionEventType": (*EVENTS, "*"),
    }


class SharedEnums(BasePlugin):
    """An enum used in many places is declared once, as a named schema, and referred to: a
    generated client then has one `Priority` (not one per field, and three for a nullable
    one). Runs after the marshmallow plugin, on what it made of each schema and parameter."""

    def __init__(self, enums: dict[str, tuple[str, ...]]) -> None:
        self.enums = enums
        self.by_values = {frozenset(values): name for name, values in enums.items()}

    def init_spec(self, spec: APISpec) -> None:
        for name, values in self.enums.items():
            spec.components.schema(name, {"type": "string", "enum": list(values)})

    def _shared(self, prop: dict[str, Any]) -> dict[str, Any]:
        if prop.get("type") == "array" and isinstance(prop.get("items"), dict):
            return {**prop, "items": self._shared(prop["items"])}
        enum = prop.get("enum")
        name = self.by_values.get(frozenset(v for v in enum if v is not None)) if enum else None
        if name is None:
            return prop
        ref = {"$ref": f"#/components/schemas/{name}"}
        kept = {k: v for k, v in prop.items() if k in ("description", "default")}
        if None in enum or "null" in (prop.get("type") or ()):
            return {"anyOf": [ref, {"type": "null"}], **kept}
        return {**ref, **kept}

    def schema_helper(self, name: str, definition: dict, **kwargs: Any) -> dict | None:
        properties = definition.get("properties")
        if not properties:
            return None
        return {"properties": {k: self._shared(v) for k, v in properties.items()}}

    def operation_helper(
        self, path: str | None = None, operations: dict | None = None, **kwargs: Any
    ) -> None:
        for operation in (operations or {}).values():
            for parameter in operation.get("parameters", ()):
                if isinstance(parameter, dict) and isinstance(parameter.get("schema"), dict):
                    parameter["schema"] = self._shared(parameter["schema"])


#: rate limits (429) and the database or Redis away (503) apply to every operation but these
_NOT_LIMITED = {"receiveWebhook"}
_ALWAYS_UP = {"getHealth", "getVersion"}


def problem_statuses(path: str, method: str, operation: dict[str, Any]) -> list[int]:
    """The problem+json statuses an operation may answer, by what it is: authenticated (401,
    403), addressing a resource by path or by a `project` filter (404), writing (400 and 413
    for the body, 409 conflicts with the resource's state, 422), rate limited (429), needing
    the database (503)."""
    statuses = []
    op_id = operation.get("operationId", "")
    params = {p.get("name") for p in operation.get("parameters", ()) if isinstance(p, dict)}
    if operation.get("security") != []:
        statuses += [401, 403]
        if method != "get":
            statuses += [409, 422]
    elif method != "get":  # a public write checks a credential of its own (password, signature)
        statuses += [401, 422]
    if method != "get":
        statuses += [400, 413]
    if "{" in path or "project" in params:
        statuses.append(404)
    if op_id not in _NOT_LIMITED:
        statuses.append(429)
    if op_id not in _ALWAYS_UP:
        statuses.append(503)
    return sorted(set(statuses))


class ProblemResponses(BasePlugin):
    """Every problem an operation may answer is documented by its status (`problem_statuses`),
    as problem+json: a generated client gets typed errors, and raises on anything else."""

    def operation_helper(
        self, path: str | None = None, operations: dict | None = None, **kwargs: Any
    ) -> None:
        for method, operation in (operations or {}).items():
            responses = operation.setdefault("responses", {})
            for status in problem_statuses(path or "", method, operation):
                responses.setdefault(str(status), HTTPStatus(status).name)


def register_docs_assets(app: Flask) -> None:
    import swagger_ui_bundle

    assets = Blueprint("docs_assets", __name__)

    @assets.route(ASSETS_PREFIX + "/<path:filename>")
    def docs_asset(filename: str):  # type: ignore[no-untyped-def]
        return send_from_directory(swagger_ui_bundle.swagger_ui_path, filename, max_age=86400)

    app.register_blueprint(assets)


def render_markdown(spec: dict[str, Any]) -> str:
    """docs/api.md: every endpoint from the generated spec, grouped by tag (kept in sync by a
    test, so the document cannot drift from the code)."""
    lines = [
        "# API reference",
        "",
        "Generated from the OpenAPI document by `switchboard api-docs > docs/api.md`; do not edit.",
        "The live, interactive version is served at `/api/v1/docs` and the machine-readable one",
        "at `/api/v1/openapi.json`. Conventions (auth, errors, pagination, rate limits) are in",
        "[usage.md](usage.md).",
        "",
    ]
    by_tag: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            tag = (op.get("tags") or ["other"])[0]
            by_tag.setdefault(tag, []).append((method.upper(), path, op))
    descriptions = {t["name"]: t.get("description", "") for t in spec.get("tags", [])}
    for tag, ops in by_tag.items():
        lines += [f"## {tag}", ""]
        if descriptions.get(tag):
            lines += [descriptions[tag], ""]
        lines += ["| method | path | what | auth |", "|---|---|---|---|"]
        for method, path, op in ops:
            auth = "public" if op.get("security") == [] else "token"
            if op.get("x-abilities"):
                auth += " + " + ", ".join(op["x-abilities"])
            summary = " ".join((op.get("summary") or op.get("description") or "").split())
            summary = summary.replace("|", "\\|")  # one table row, whatever the docstring's lines
            lines.append(f"| {method} | `{path}` | {summary} | {auth} |")
        lines.append("")
    return "\n".join(lines)
