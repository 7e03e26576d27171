"""The fast path for `POST /api/v1/tasks`: a WSGI middleware in front of Flask.

Task creation is the busiest write: scripts and CI send tasks by the thousand. For the plain case
(a JSON body that `TaskCreateSchema` accepts, an access token or a personal access token, no
`Idempotency-Key`) this answers before Flask with exactly what the Flask view would answer: the
same validation (the same schema), the same authentication and write limit (the same token check
and limiter storage), the same rows (`pg_fastpath.create`) and the same response body and headers.
Anything else, and every refusal, goes on to the Flask view unchanged (it gets the body that was
read), which stays the one place that formats problems and documents the endpoint.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jwt
import marshmallow as ma
from flask import Flask

from app import input_bounds
from app.agents.registry import known_agents
from app.auth import service as auth
from app.auth import throttle, tokens
from app.database import database_unavailable, remove_session
from app.errors import OUTCOME_UNKNOWN, PROBLEM_TYPE_BASE, DomainError
from app.ratelimits import hit_write_limit, principal_key
from app.request_hooks import rate_limit_headers, request_id
from app.tasks import pg_fastpath
from app.tasks.schemas import TaskCreateSchema, TaskSchema
from app.timeutil import Timestamp, rfc3339

PATH = "/api/v1/tasks"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class TaskIntake:
    def __init__(self, wsgi_app: WSGIApp, app: Flask) -> None:
        self.wsgi_app = wsgi_app
        self.app = app
        self.served = 0  # creations answered here (the tests check the path is taken)
        self._schemas = threading.local()
        self._supported: bool | None = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if (
            environ.get("REQUEST_METHOD") != "POST"
            or environ.get("PATH_INFO") != PATH
            or "HTTP_IDEMPOTENCY_KEY" in environ
        ):
            return self.wsgi_app(environ, start_response)
        token = _credential(environ)
        mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        limit = self.app.config.get("MAX_CONTENT_LENGTH") or 0
        if not token or mimetype != "application/json" or not 0 < length <= limit:
            return self.wsgi_app(environ, start_response)
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)  # the Flask view reads it again if need be
        if b"\\u0000" in body:  # a NUL, which the view's parser refuses (app/input_bounds.py)
            return self.wsgi_app(environ, start_response)
        rid = request_id(environ.get("HTTP_X_REQUEST_ID", ""))
        with self.app.app_context():
            try:
                answer = self._create(environ, token, body, rid)
            except (DomainError, pg_fastpath.NotWritten):
                answer = None  # the view answers refusals, and tries what failed unwritten
            except Exception as exc:
                # perhaps written (a connection lost after the write was sent): not the view,
                # which would create it again; the answer the view gives in that case
                if database_unavailable(exc):
                    self.app.logger.warning(
                        "outcome unknown on POST %s (rid=%s): the database was lost: %s",
                        PATH,
                        rid,
                        exc,
                    )
                    answer = _internal_error(self.app, rid, unknown=True)
                else:
                    self.app.logger.exception("unhandled error on POST %s (rid=%s)", PATH, rid)
                    answer = _internal_error(self.app, rid)
            finally:
                remove_session()
        if answer is None:
            return self.wsgi_app(environ, start_response)
        status, headers, payload = answer
        self.served += status.startswith("201")
        start_response(status, headers)
        return [payload]

    def _create(
        self, environ: dict[str, Any], token: str, body: bytes, rid: str
    ) -> tuple[str, list[tuple[str, str]], bytes] | None:
        if self._supported is None:
            self._supported = pg_fastpath.supported()
        if not self._supported:
            return None
        config = self.app.config
        user_id: int | None = None
        token_hash: str | None = None
        try:
            if token.startswith(tokens.PAT_PREFIX):
                token_hash = tokens.digest(token)
            else:
                claims = tokens.decode_access(config["SECRET_KEY"], token)
                user_id = int(claims["sub"])
                if claims.get("fam") and auth.login_ended(claims["fam"], user_id):
                    return None  # the view answers: 401
            data = self._schema().load(input_bounds.loads(body))
        except (jwt.InvalidTokenError, ValueError, ma.ValidationError):
            return None
        ip = environ.get("REMOTE_ADDR")
        limits: dict[str, str] = {}

        def admit(user_id: int) -> bool:
            """The write limit counts only a creation this path is about to make."""
            if not config.get("RATELIMIT_ENABLED"):
                return True
            window = hit_write_limit(principal_key(user_id))
            if window is not None:
                limits.update(rate_limit_headers(*window))
            return window is not None

        if config.get("RATELIMIT_ENABLED"):
            throttle.check(ip)
        caller = pg_fastpath.Caller(user_id=user_id, token_hash=token_hash, request_id=rid, ip=ip)
        task = pg_fastpath.create(caller, data, frozenset(known_agents()), admit)
        if task is None:
            return None
        payload = _json_bytes(self.app, _body(task))
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Location", f"{PATH}/{task['id']}"),
            *limits.items(),
            ("X-Request-ID", rid),
            ("Cache-Control", "no-store"),
        ]
        return "201 CREATED", headers, payload

    def _schema(self) -> TaskCreateSchema:
        """One per thread: a schema instance is not meant to be shared."""
        schema = getattr(self._schemas, "create", None)
        if schema is None:
            schema = self._schemas.create = TaskCreateSchema()
        return schema


def _internal_error(
    app: Flask, rid: str, *, unknown: bool = False
) -> tuple[str, list[tuple[str, str]], bytes]:
    """The problem `errors.unexpected_error` answers, for an error met before Flask (`unknown`:
    the database was lost after the write was sent)."""
    code = "outcome_unknown" if unknown else "internal_error"
    detail = (
        OUTCOME_UNKNOWN
        if unknown
        else "Something went wrong on our side. Quote the request id when reporting it."
    )
    payload = _json_bytes(
        app,
        {
            "type": PROBLEM_TYPE_BASE + code,
            "title": "Internal Server Error",
            "status": 500,
            "detail": detail,
            "instance": PATH,
            "code": code,
            "request_id": rid,
        },
    )
    headers = [
        ("Content-Type", "application/problem+json"),
        ("Content-Length", str(len(payload))),
        ("X-Request-ID", rid),
        ("Cache-Control", "no-store"),
    ]
    if unknown:
        headers.append(("Retry-After", "1"))
    return "500 INTERNAL SERVER ERROR", headers, payload


def _json_bytes(app: Flask, obj: Any) -> bytes:
    """What `app.json.response(obj)` would send, without building a response to read it from."""
    provider = app.json
    compact = getattr(provider, "compact", None)
    if (compact is None and app.debug) or compact is False:
        return provider.response(obj).get_data()
    return (provider.dumps(obj, separators=(",", ":")) + "\n").encode()


def _credential(environ: dict[str, Any]) -> str | None:
    """The bearer value or `X-API-Key`, as `auth.guard` reads them (None: let the view say)."""
    header = environ.get("HTTP_AUTHORIZATION", "")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() or None if scheme.lower() == "bearer" else None
    return environ.get("HTTP_X_API_KEY", "").strip() or None


#: what `TaskSchema` shows of a task, and which of it are times
FIELDS = tuple(TaskSchema._declared_fields)
TIMES = frozenset(n for n, f in TaskSchema._declared_fields.items() if isinstance(f, Timestamp))


def _body(task: dict[str, Any]) -> dict[str, Any]:
    """The created task as `TaskSchema` dumps it (the same fields and formats; the tests compare
    both), without the schema's per-field machinery on the hot path."""
    return {
        name: (rfc3339(task[name]) if task[name] is not None else None)
        if name in TIMES
        else task[name]
        for name in FIELDS
    }
