"""OpenAPI 3.1 settings for flask-smorest and the self-hosted Swagger UI.

The spec is generated from the blueprints and schemas, never written by hand. Swagger UI's assets
come from the swagger-ui-bundle package, so the interactive docs work without internet access.
"""

from __future__ import annotations

from typing import Any

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
