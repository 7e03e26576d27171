"""The OpenAPI document generates a first-class client: `openapi-python-client` prints no
warning, names its functions after the operationIds, and the README's quick start runs through
the generated client (log in, create a project and a task, wait for it, read its log) against the
app and a real worker pool, on SQLite and PostgreSQL."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).parent
PACKAGE = "switchboard_client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory, app):
    """The client package, generated from the spec the app serves."""
    where = tmp_path_factory.mktemp("generated")
    spec = where / "openapi.json"
    spec.write_text(json.dumps(app.test_client().get("/api/v1/openapi.json").get_json()))
    run = subprocess.run(
        [
            str(BIN / "openapi-python-client"),
            "generate",
            "--path",
            str(spec),
            "--meta",
            "none",
            "--output-path",
            str(where / PACKAGE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(where)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    sys.path.insert(0, str(where))
    try:
        yield run.stdout + run.stderr, importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def test_generator_prints_no_warning_and_names_functions_by_operation(generated):
    output, package = generated
    assert "warning" not in output.lower(), output
    api = Path(package.__file__).parent / "api"
    functions = {p.stem for p in api.glob("*/*.py") if p.stem != "__init__"}
    assert {"login", "create_project", "create_task", "get_task", "get_run_log"} <= functions
    assert {"list_tasks", "list_runs", "cancel_task", "append_run_log"} <= functions
    assert not [f for f in functions if "api_v1" in f]


def test_readme_quick_start_through_the_generated_client(generated, app, admin, worker):
    _output, _package = generated
    login = importlib.import_module(f"{PACKAGE}.api.auth.login")
    create_project = importlib.import_module(f"{PACKAGE}.api.projects.create_project")
    create_task = importlib.import_module(f"{PACKAGE}.api.tasks.create_task")
    get_task = importlib.import_module(f"{PACKAGE}.api.tasks.get_task")
    get_run_log = importlib.import_module(f"{PACKAGE}.api.runs.get_run_log")
    models = importlib.import_module(f"{PACKAGE}.models")
    client_module = importlib.import_module(f"{PACKAGE}.client")

    transport = httpx.WSGITransport(app=app)
    anonymous = client_module.Client(
        base_url="http://testserver",
        raise_on_unexpected_status=True,
        httpx_args={"transport": transport},
    )
    tokens = login.sync(
        client=anonymous, body=models.Login(username=admin.username, password=admin.password)
    )
    assert isinstance(tokens, models.TokenPair), tokens
    wrong = login.sync(
        client=anonymous, body=models.Login(username=admin.username, password="not it at all")
    )
    assert isinstance(wrong, models.Problem) and wrong.status == 401  # typed, by status

    client = client_module.AuthenticatedClient(
        base_url="http://testserver",
        token=tokens.access_token,
        raise_on_unexpected_status=True,
        httpx_args={"transport": transport},
    )
    project = create_project.sync(
        client=client, body=models.ProjectCreate(key="gen", name="Generated")
    )
    assert isinstance(project, models.Project), project
    task = create_task.sync(
        client=client,
        body=models.TaskCreate(
            project="gen",
            title="hello",
            agent="shell",
            prompt="echo hello; echo done",
            priority=models.Priority.HIGH,
        ),
    )
    assert isinstance(task, models.Task), task
    assert task.priority == models.Priority.HIGH
    for _ in range(30):  # each call waits up to 10 s for a change: no polling loop of ours
        detail = get_task.sync(task.id, client=client, wait=10, status=task.status)
        assert isinstance(detail, models.TaskDetail), detail
        task = detail
        if detail.status in (models.TaskStatus.COMPLETED, models.TaskStatus.FAILED):
            break
    assert detail.status == models.TaskStatus.COMPLETED, detail
    log = get_run_log.sync(detail.latest_run_id, client=client)
    assert isinstance(log, models.LogPage), log
    assert log.text == "hello\ndone\n"
    missing = get_task.sync(999_999, client=client)
    assert isinstance(missing, models.Problem) and missing.status == 404
