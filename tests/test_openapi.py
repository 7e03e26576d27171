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
    # WebSockets: docs/machines.md describes the machines' channel, docs/usage.md terminals
    skip = {
        "/api/v1/openapi.json",
        "/api/v1/docs",
        "/api/v1/machines/connect",
        "/api/v1/runs/<int:run_id>/terminal",
    }
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


def _operations(spec):
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield path, method, op


def test_every_operation_has_a_unique_operation_id_in_one_convention(client):
    """Generated clients name their functions after it (`create_task`, not
    `post_api_v1_tasks`); a duplicate would make two functions one."""
    spec = client.get("/api/v1/openapi.json").get_json()
    ids = {(path, method): op.get("operationId") for path, method, op in _operations(spec)}
    assert None not in ids.values()
    assert len(ids) == len(set(ids.values()))
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)*", i) for i in ids.values())
    assert ids[("/api/v1/tasks", "post")] == "createTask"
    assert ids[("/api/v1/tasks", "get")] == "listTasks"
    assert ids[("/api/v1/tasks/{task_id}", "get")] == "getTask"
    assert ids[("/api/v1/tasks/{task_id}", "patch")] == "updateTask"
    assert ids[("/api/v1/tasks/{task_id}/cancel", "post")] == "cancelTask"
    assert ids[("/api/v1/runs", "get")] == "listRuns"
    assert ids[("/api/v1/runs/{run_id}/log", "get")] == "getRunLog"
    assert ids[("/api/v1/runs/{run_id}/log", "post")] == "appendRunLog"
    assert ids[("/api/v1/subscriptions/{subscription_id}/deliveries", "get")] == (
        "listSubscriptionDeliveries"
    )
    assert ids[("/api/v1/projects/{key}/secrets/{name}", "put")] == "setSecret"
    # a list is `list…`, a create `create…`: a GET never creates, a POST never lists
    for (_path, method), name in ids.items():
        assert not (method == "get" and name.startswith(("create", "delete", "update")))
        assert not (method != "get" and name.startswith(("list", "get")))


def test_problems_are_documented_by_status(client):
    """A typed client raises on what is not documented: each problem an operation answers is
    there by status, and there is no catch-all `default`."""
    spec = client.get("/api/v1/openapi.json").get_json()
    for path, method, op in _operations(spec):
        responses = op["responses"]
        assert "default" not in responses, (path, method)
        if op.get("security") != []:
            assert {"401", "403", "429", "503"} <= set(responses), (path, method)
        if "{" in path:
            assert "404" in responses, (path, method)
        if method != "get":
            assert {"400", "413", "422"} <= set(responses), (path, method)
    assert spec["components"]["responses"]["NOT_FOUND"]["content"] == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
    }
    # liveness needs nothing but the process
    assert set(spec["paths"]["/api/v1/health"]["get"]["responses"]) == {"200", "429"}


def test_bodies_and_types_a_client_generator_needs(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    for path, name in (("/health", "Health"), ("/health/ready", "Ready"), ("/version", "Version")):
        content = spec["paths"][f"/api/v1{path}"]["get"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    cursor = next(
        p for p in spec["paths"]["/api/v1/tasks"]["get"]["parameters"] if p["name"] == "cursor"
    )
    assert cursor["schema"]["type"] == "string"
    branch = schemas["Conditions"]["properties"]["branch"]
    assert {s["type"] for s in branch["anyOf"]} == {"string", "array"}
    # an enum used in many places is one named schema; a nullable one is that or null
    assert schemas["Priority"]["enum"] == ["low", "normal", "high", "urgent"]
    assert schemas["TaskTemplate"]["properties"]["priority"]["anyOf"] == [
        {"$ref": "#/components/schemas/Priority"},
        {"type": "null"},
    ]
    assert schemas["Task"]["properties"]["priority"]["$ref"] == "#/components/schemas/Priority"
    text = str(spec)
    assert "'enum': ['low', 'normal', 'high', 'urgent']" in text  # only in Priority itself
    assert text.count("'enum': ['low', 'normal', 'high', 'urgent']") == 1
    # every schema is used somewhere
    unused = [name for name in schemas if f"#/components/schemas/{name}'" not in text]
    assert unused == []


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
