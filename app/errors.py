"""Every error leaves the API as RFC 9457 problem+json.

Services raise `DomainError` subclasses and know nothing of HTTP; this module maps them, Werkzeug's
HTTP errors, flask-smorest/webargs validation errors and rate-limit refusals to one response shape:
`{type, title, status, detail, instance, code, request_id, errors?}`.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import marshmallow as ma
from flask import Flask, Response, current_app, g, jsonify, request
from flask_limiter.errors import RateLimitExceeded
from werkzeug.exceptions import HTTPException, InternalServerError

from app.input_bounds import NoSuchId

PROBLEM_TYPE_BASE = "https://switchboard.dev/problems/"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail, self.extra = detail, extra


class BadRequest(DomainError):
    status, code = 400, "bad_request"


class Unauthorized(DomainError):
    status, code = 401, "unauthorized"

    def __init__(self, detail: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        if code:
            self.code = code


class Forbidden(DomainError):
    status, code = 403, "forbidden"


class NotFound(DomainError):
    status, code = 404, "not_found"


class Conflict(DomainError):
    status, code = 409, "conflict"


class IdempotencyKeyReused(DomainError):
    """The same `Idempotency-Key` with a different request (as Stripe answers it)."""

    status, code = 422, "idempotency_key_reused"


class ValidationFailed(DomainError):
    """A request that parsed but breaks a domain rule; `errors` maps field -> messages."""

    status, code = 422, "validation_failed"

    def __init__(self, detail: str, errors: dict[str, list[str]] | None = None) -> None:
        super().__init__(detail, **({"errors": errors} if errors else {}))


class TooManyRequests(DomainError):
    status, code = 429, "too_many_requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = max(1, int(retry_after))


class ServiceUnavailable(DomainError):
    status, code = 503, "service_unavailable"

    def __init__(self, detail: str, retry_after: int | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.retry_after = retry_after


class ProblemSchema(ma.Schema):
    """RFC 9457 problem details, the shape of every error."""

    type = ma.fields.Str()
    title = ma.fields.Str()
    status = ma.fields.Int()
    detail = ma.fields.Str()
    instance = ma.fields.Str()
    code = ma.fields.Str(metadata={"description": "stable machine-readable error code"})
    request_id = ma.fields.Str(allow_none=True)
    errors = ma.fields.Dict(
        keys=ma.fields.Str(),
        values=ma.fields.List(ma.fields.Str()),
        metadata={"description": "field -> messages, on validation errors"},
    )
    # extension members (RFC 9457 §3.2) some problems carry
    executor = ma.fields.Str(
        allow_none=True,
        metadata={"description": "409 on a claimed task or run: the executor that holds it"},
    )
    expected_offset = ma.fields.Int(
        metadata={"description": "409 on a log append that leaves a gap: the offset to send"}
    )
    checks = ma.fields.Dict(
        keys=ma.fields.Str(),
        values=ma.fields.Str(),
        metadata={"description": "503 from /health/ready: each check and its state"},
    )
    review = ma.fields.Str(
        allow_none=True,
        metadata={"description": "409 on an approval or rejection: the run's review state"},
    )
    run_status = ma.fields.Str(
        metadata={"description": "409 on a question asked of a run that is not running"}
    )
    question_status = ma.fields.Str(
        metadata={"description": "409 on an answer: the question's state (answered, expired…)"}
    )
    answer = ma.fields.Str(
        allow_none=True, metadata={"description": "409 on an answer: the one kept"}
    )
    answered_by = ma.fields.Str(
        allow_none=True, metadata={"description": "409 on an answer: who gave the one kept"}
    )
    controller = ma.fields.Dict(
        allow_none=True,
        metadata={"description": "409 on a terminal attach: who holds the keyboard"},
    )


def problem(status: int, title: str, detail: str, code: str, **extra: Any) -> Response:
    body = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.path,
        "code": code,
        "request_id": g.get("request_id"),
        **extra,
    }
    resp = jsonify(body)
    resp.status_code = status
    resp.content_type = "application/problem+json"
    return resp


def flat_errors(messages: dict[Any, Any], prefix: str = "") -> dict[str, list[str]]:
    """marshmallow nests the errors of nested fields and list items; clients get one level,
    field path -> messages: `loop.done_marker`, `depends_on.0`."""
    flat: dict[str, list[str]] = {}
    for key, value in messages.items():
        name = prefix if key == "_schema" and prefix else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flat_errors(value, name))
        else:
            items = value if isinstance(value, list) else [value]
            flat.setdefault(name, []).extend(str(item) for item in items)
    return flat


def _snake(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "_")


def http_error(error: HTTPException) -> Response:
    if isinstance(error, RateLimitExceeded):
        return rate_limited(error)
    data = getattr(error, "data", None) or {}  # set by flask_smorest.abort and webargs
    extra: dict[str, Any] = {}
    messages = data.get("messages")
    status = error.code or 500
    if messages:
        # webargs: {location: {field: [msg]}}, or {location: [msg]} for an unreadable body
        errors: dict[str, list[str]] = {}
        for location, found in messages.items():
            errors.update(flat_errors(found) if isinstance(found, dict) else {location: found})
        extra["errors"] = errors
    detail = data.get("message") or error.description or error.name
    code = _snake(error.name)
    if status == 422:
        code = "validation_failed"
        detail = data.get("message") or "The request has invalid fields: " + ", ".join(
            sorted(extra.get("errors", {}))
        )
    elif status == 400 and messages and "json" in messages and "Invalid JSON" in str(messages):
        code, detail = "malformed_json", "The request body is not valid JSON."
    elif status == 413:
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        detail = f"The request body is larger than the limit of {limit} bytes."
    elif status == 404 and request.endpoint is None and not isinstance(error, NoSuchId):
        detail = f"No such endpoint: {request.method} {request.path}"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.path}"
    resp = problem(status, error.name, detail, code, **extra)
    if status == 405 and hasattr(error, "valid_methods") and error.valid_methods:
        resp.headers["Allow"] = ", ".join(error.valid_methods)
    return resp


def rate_limited(error: RateLimitExceeded) -> Response:
    """flask-limiter's after_request adds RateLimit-* and Retry-After to this response."""
    return problem(
        429,
        "Too Many Requests",
        f"Rate limit exceeded ({error.description}).",
        "too_many_requests",
    )


def domain_error(error: DomainError) -> Response:
    resp = problem(
        error.status, HTTPStatus(error.status).phrase, error.detail, error.code, **error.extra
    )
    if isinstance(error, TooManyRequests | ServiceUnavailable) and error.retry_after:
        resp.headers["Retry-After"] = str(error.retry_after)
    elif error.status == 401:
        resp.headers["WWW-Authenticate"] = f'Bearer realm="switchboard", error="{error.code}"'
    return resp


#: the answer when the database was lost after a write was sent: it may have been kept
OUTCOME_UNKNOWN = (
    "The database connection was lost after this request's change was sent: it may have been "
    "made. Look before sending it again, or send it again with the same Idempotency-Key."
)


def unexpected_error(error: Exception) -> Response:
    from app.database import database_unavailable, write_sent

    if isinstance(error, HTTPException):
        return http_error(error)
    away = (
        "The database" if database_unavailable(error) else "Redis" if _redis_away(error) else None
    )
    if away and (request.method in SAFE_METHODS or not write_sent()):
        # a restart or failover: nothing was written, so the client may simply send it again
        current_app.logger.warning(
            "%s unavailable on %s %s: %s", away, request.method, request.path, error
        )
        resp = problem(
            503,
            "Service Unavailable",
            f"{away} is unavailable; nothing was changed. Try again shortly.",
            "service_unavailable",
        )
        resp.headers["Retry-After"] = "1"
        return resp
    if away == "The database":  # and a write was sent: neither "nothing changed" nor a bug
        current_app.logger.warning(
            "outcome unknown on %s %s: the database was lost after a write: %s",
            request.method,
            request.path,
            error,
        )
        resp = problem(500, "Internal Server Error", OUTCOME_UNKNOWN, "outcome_unknown")
        resp.headers["Retry-After"] = "1"
        return resp
    if _lost_a_race(error):
        # a check passed, then the database refused the write: a request at the same moment
        # made the same name or removed what this one refers to
        current_app.logger.warning("conflict on %s %s: %s", request.method, request.path, error)
        return problem(
            409,
            "Conflict",
            "A change made at the same moment conflicts with this one; nothing was changed.",
            "conflict",
        )
    current_app.logger.exception("unhandled error on %s %s", request.method, request.path)
    resp = problem(
        500,
        "Internal Server Error",
        "Something went wrong on our side. Quote the request id when reporting it.",
        "internal_error",
    )
    return resp


def _redis_away(error: Exception) -> bool:
    """Redis could not be reached (a restart): what needs it (a live stream) can be asked for
    again shortly."""
    import redis

    return isinstance(error, redis.ConnectionError | redis.TimeoutError)


def _lost_a_race(error: Exception) -> bool:
    """A unique or foreign-key violation: what the service checked before writing changed
    in between (its own checks answer the same 409 when nothing races)."""
    import sqlite3

    import psycopg
    import sqlalchemy as sa

    if not isinstance(error, sa.exc.IntegrityError):
        return False
    orig = error.orig
    if isinstance(orig, psycopg.errors.UniqueViolation | psycopg.errors.ForeignKeyViolation):
        return True
    return isinstance(orig, sqlite3.IntegrityError) and (
        "UNIQUE constraint failed" in str(orig) or "FOREIGN KEY constraint failed" in str(orig)
    )


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(DomainError, domain_error)
    app.register_error_handler(Exception, unexpected_error)


# Exposed for OpenAPI docs (flask-smorest's ERROR_SCHEMA).
__all__ = [
    "BadRequest",
    "Conflict",
    "DomainError",
    "Forbidden",
    "InternalServerError",
    "NotFound",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "ValidationFailed",
    "problem",
]
