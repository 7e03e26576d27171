"""Security issue, item 11: schemathesis generates requests for every operation of the OpenAPI
document — valid and invalid bodies, queries, path values — and sends each with a member's and
with a viewer's token. No answer may be a 500, and every answer must match what the document
says (status codes, content types, response schemas). A bounded number of examples per operation
keeps CI inside its budget; the seed is fixed, so a failure replays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from helpers import account
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

#: examples per operation and token (81 operations: about 1,600 requests, ~30 s)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10"))
#: what cannot be answered by a test client that reads the whole body: streams never end
STREAMS = r"(/stream$)|(^/api/v1/stream$)"


def _document() -> dict:
    """The OpenAPI document, from an application built in a subprocess (the suite's own app is a
    fixture, and pytest needs the operations when it collects)."""
    code = (
        "import json, sys, tempfile\n"
        "from app import create_app\n"
        "from app.extensions import api\n"
        "with tempfile.TemporaryDirectory() as d:\n"
        "    app = create_app({'ENV': 'testing', 'SECRET_KEY': 'x' * 40, 'DATABASE_URL': "
        "'sqlite://', 'REDIS_URL': 'redis://127.0.0.1:1/0', 'INSTANCE_PATH': d})\n"
        "    with app.app_context():\n"
        "        json.dump(api.spec.to_dict(), sys.stdout)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        check=True,
        cwd=Path(__file__).parent.parent,
        timeout=60,
    )
    return json.loads(out.stdout)


schema = schemathesis.openapi.from_dict(_document()).exclude(path_regex=STREAMS)


@pytest.fixture(scope="module")
def tokens(app) -> Iterator[dict[str, dict[str, str]]]:
    """Once for the module: a member (maintainer of `demo`, which has a task) and a viewer of
    `demo`. Logins are not throttled here (the fuzzer fails many on purpose, from one address);
    what the fuzzer changes stays (state that drifts is more to try, never a reason for a 500)."""
    from conftest import _clean

    _clean(app)
    limits = {
        "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_IP": "100000/minute",
        "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_USER": "100000/minute",
    }
    saved = {k: app.config[k] for k in limits}
    app.config.update(limits)
    with app.test_client() as client:
        member = account(app, client, "alice")
        viewer = account(app, client, "vera")
        client.post(
            "/api/v1/projects",
            headers=member.headers,
            json={"key": "demo", "name": "Demo", "default_agent": "shell"},
        )
        client.post(
            "/api/v1/projects/demo/members",
            headers=member.headers,
            json={"username": "vera", "role": "viewer"},
        )
        client.post(
            "/api/v1/tasks",
            headers=member.headers,
            json={"project": "demo", "title": "seed", "prompt": "p", "target": "external"},
        )
    yield {"member": member.headers, "viewer": viewer.headers}
    app.config.update(saved)


@schema.parametrize()
@hypothesis.settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
def test_attack_fuzzed_api_no_500_and_no_schema_violation(case, app, tokens):
    if case.query and "wait" in case.query:
        case.query["wait"] = 0  # a long poll would only wait; what it answers is the same
    for headers in tokens.values():
        case.call_and_validate(
            app=app,
            headers=headers,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
            ],
        )
