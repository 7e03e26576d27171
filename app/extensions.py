"""Flask extension objects, created unbound and attached in `create_app()`: migrations,
WebSockets, and the API with the thin Blueprint and Schema classes every module uses, so the
whole API is customised in one place. The database is `app.database`, Redis and the queues
`app.queues`, rate limits `app.ratelimits`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flask_smorest
import marshmallow as ma
from flask import Flask
from flask_migrate import Migrate
from flask_sock import Sock

from app.database import db
from app.errors import ProblemSchema
from app.input_bounds import RequestParser

#: packaged with the app (package data), so `switchboard db upgrade` works after `pip install .`
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
migrate = Migrate()
sock = Sock()


class Api(flask_smorest.Api):
    """Our API: problem+json instead of flask-smorest's default error payload."""

    ERROR_SCHEMA = ProblemSchema

    def _register_responses(self) -> None:
        """Document every error response as application/problem+json."""
        self.DEFAULT_RESPONSE_CONTENT_TYPE = "application/problem+json"
        try:
            super()._register_responses()  # type: ignore[misc]
        finally:
            del self.DEFAULT_RESPONSE_CONTENT_TYPE

    def handle_http_exception(self, error):  # type: ignore[override]
        from app.errors import http_error

        return http_error(error)


class Blueprint(flask_smorest.Blueprint):
    """One place to customise every blueprint of the API."""

    ARGUMENTS_PARSER = RequestParser()

    def register_views_in_doc(self, api, app, spec, *, name, parameters):  # type: ignore[no-untyped-def]
        super().register_views_in_doc(
            api, app, _NamingOperations(spec), name=name, parameters=parameters
        )


class _NamingOperations:
    """The spec, for a blueprint writing its paths: each operation gets an `operationId` from
    its method and view class (`getTaskById`, `postTasks`), so generated clients have functions
    with names, not `post_api_v1_auth_login`."""

    def __init__(self, spec: Any) -> None:
        self._spec = spec

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._spec, attr)

    def path(self, *, rule: Any, operations: dict[str, Any], **kwargs: Any) -> Any:
        view = rule.endpoint.rsplit(".", 1)[-1]
        for method, operation in operations.items():
            operation.setdefault("operationId", method + view)
        return self._spec.path(rule=rule, operations=operations, **kwargs)


class Schema(ma.Schema):
    """Request bodies reject unknown fields, so a typo is a 422 and never silently ignored."""

    class Meta:
        unknown = ma.RAISE


class QuerySchema(ma.Schema):
    """Query strings ignore unknown parameters (caches, cache-busters, tracking tags)."""

    class Meta:
        unknown = ma.EXCLUDE


api = Api()


def init_extensions(app: Flask) -> None:
    db.init_app(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS), compare_type=True)
    sock.init_app(app)
