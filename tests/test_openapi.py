"""The generated OpenAPI document is valid 3.1, complete, and served with interactive docs."""

import re

from openapi_spec_validator import validate


def test_spec_is_valid_openapi_31(client):
    resp = client.get("/api/v1/openapi.json")
    assert resp.status_code == 200
    spec = resp.get_json()
    assert spec["openapi"].startswith("3.1")
    validate(spec)


def test_spec_lists_every_route(client, app):
    spec = client.get("/api/v1/openapi.json").get_json()
    documented = {
        (path, method.upper())
        for path, ops in spec["paths"].items()
        for method in ops
        if method in ("get", "post", "put", "patch", "delete")
    }
    skip = {"/api/v1/openapi.json", "/api/v1/docs"}
    missing = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/") or rule.rule in skip:
            continue
        if rule.rule.startswith(("/api/v1/docs/", "/api/v1/_test/")):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if (path, method) not in documented:
                missing.append((path, method))
    assert missing == []
    assert len(documented) >= 20


def test_every_operation_has_a_unique_operation_id(client):
    """Generated clients name their functions after it (`getTaskById`, not
    `get_api_v1_tasks_task_id`); a duplicate would make two functions one."""
    spec = client.get("/api/v1/openapi.json").get_json()
    ids = [
        op.get("operationId")
        for ops in spec["paths"].values()
        for method, op in ops.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert None not in ids
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    by_path = spec["paths"]["/api/v1/tasks/{task_id}"]
    assert by_path["get"]["operationId"] == "getTaskById"


def test_security_is_documented(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert set(spec["components"]["securitySchemes"]) == {"bearerAuth", "apiKey"}
    assert spec["paths"]["/api/v1/health"]["get"]["security"] == []
    assert spec["paths"]["/api/v1/auth/login"]["post"]["security"] == []
    assert "security" not in spec["paths"]["/api/v1/users"]["get"]  # the global default
    assert spec["security"]


def test_errors_are_documented_as_problems(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    assert "Problem" in spec["components"]["schemas"]
    error = spec["components"]["responses"]["UNPROCESSABLE_ENTITY"]
    assert error["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"
    }
    login = spec["paths"]["/api/v1/auth/login"]["post"]["responses"]
    assert login["422"] == {"$ref": "#/components/responses/UNPROCESSABLE_ENTITY"}


def test_interactive_docs_are_served_offline(client):
    page = client.get("/api/v1/docs")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "/api/v1/docs/assets/swagger-ui-bundle.js" in html
    assert "/api/v1/openapi.json" in html
    asset = client.get("/api/v1/docs/assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.get_data()) > 100_000


def test_docs_api_md_is_up_to_date(app):
    from pathlib import Path

    from app.extensions import api
    from app.openapi import render_markdown

    with app.app_context():
        expected = render_markdown(api.spec.to_dict())
    current = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    assert current == expected, "regenerate: .venv/bin/switchboard api-docs > docs/api.md"
