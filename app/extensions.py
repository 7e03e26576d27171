"""Flask extension objects, created unbound and attached in `create_app()`: migrations,
WebSockets, and the API with the thin Blueprint and Schema classes every module uses, so the
whole API is customised in one place. The database is `app.database`, Redis and the queues
`app.queues`, rate limits `app.ratelimits`."""

from __future__ import annotations

import re
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
    #: no catch-all `default` response: every problem an operation may answer is documented by
    #: status (`openapi.ProblemResponses`), so a generated client raises on anything else
    DEFAULT_ERROR_RESPONSE_NAME = None

    def _register_responses(self) -> None:
        """Document every error response as application/problem+json."""
        self.DEFAULT_RESPONSE_CONTENT_TYPE = "application/problem+json"
        try:
            super()._register_responses()  # type: ignore[misc]
        finally:
            del self.DEFAULT_RESPONSE_CONTENT_TYPE

    def _register_pagination_header(self) -> None:
        """Not ours: lists page with cursors (`app.pagination`), not flask-smorest's pages."""

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
    """The spec, for a blueprint writing its paths: each operation gets an `operationId` in one
    convention (`operation_id`), so a generated client has functions with names."""

    def __init__(self, spec: Any) -> None:
        self._spec = spec

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._spec, attr)

    def path(self, *, rule: Any, operations: dict[str, Any], **kwargs: Any) -> Any:
        view = rule.endpoint.rsplit(".", 1)[-1]
        for method, operation in operations.items():
            operation.setdefault("operationId", operation_id(method, view))
        return self._spec.path(rule=rule, operations=operations, **kwargs)


#: views named for an item: `TaskById` is the task `{task_id}`
_ITEM = re.compile(r"By(Id|Key|Name)$")
_ITEM_VERBS = {"get": "get", "patch": "update", "put": "set", "delete": "delete"}


def operation_id(method: str, view: str) -> str:
    """`listTasks`, `createTask`, `getTask`, `updateTask`, `deleteTask`, `setSecret`; an action
    view is its verb then its object (`TaskCancel` → `cancelTask`). A view names its own with
    `@blp.doc(operationId=…)` where this reads badly."""
    noun = _ITEM.sub("", view)
    plural = noun.endswith("s") and not noun.endswith("ss")
    if method in ("patch", "put", "delete") or (method == "get" and noun != view):
        return _ITEM_VERBS[method] + noun
    if method == "get":
        return ("list" if plural else "get") + noun
    if plural:  # POST to a collection
        return "create" + (noun[:-3] + "y" if noun.endswith("ies") else noun[:-1])
    words = re.findall(r"[A-Z][a-z0-9]*", noun)
    return words[-1].lower() + "".join(words[:-1])


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
