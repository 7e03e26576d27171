"""Per-request plumbing every module relies on: request ids, body checks, authentication, the
action context for services, and the catch-all audit entry for mutating requests."""

from __future__ import annotations

import re
import time
import uuid

from flask import Flask, Response, current_app, g, request

from app import context, input_bounds, view_marks
from app.audit import service as audit
from app.audit.redact import REDACTED
from app.auth.guard import authenticate_request
from app.database import database_unavailable, db
from app.errors import BadRequest, DomainError
from app.ratelimits import limiter

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPES = ("application/json",)
#: request bodies larger than this are not copied into the catch-all audit entry
AUDIT_BODY_LIMIT = 64 * 1024


class UnsupportedMediaType(DomainError):
    status, code = 415, "unsupported_media_type"


class PayloadTooLarge(DomainError):
    status, code = 413, "payload_too_large"


def _begin() -> None:
    g.request_id = request_id(request.headers.get("X-Request-ID", ""))
    context.set_current(context.ActionContext(request_id=g.request_id, ip=request.remote_addr))
    audit.begin_scope()


def _check_body() -> None:
    if request.method not in MUTATING:
        return
    receiver = view_marks.is_webhook_receiver()
    if receiver:
        request.max_content_length = current_app.config["SWITCHBOARD_WEBHOOK_MAX_BODY_BYTES"]
    length = request.content_length
    limit = request.max_content_length
    if length is not None and limit is not None and length > limit:
        raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if chunked and length is None and limit is not None:
        # a chunked body has no length to compare: read one byte past the limit (Werkzeug
        # stops at the limit without a word, and the rest would be taken for the whole body)
        request.max_content_length = limit + 1
        if len(request.get_data(cache=True)) > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    has_body = bool(length) or chunked
    if not has_body or receiver:
        return
    if request.mimetype not in JSON_TYPES and not request.mimetype.endswith("+json"):
        raise UnsupportedMediaType(
            f"Send JSON ('Content-Type: application/json'), not {request.mimetype or 'nothing'}."
        )
    refused = g.body_refused = input_bounds.json_refusal(request.get_data(cache=True))
    if refused:
        raise BadRequest(f"The body is not accepted: {refused}.")


def _audit_mutation(response: Response) -> Response:
    """Every mutating API request leaves a trace, unless its service already wrote a richer one."""
    if (
        request.method not in MUTATING
        or not request.path.startswith("/api/v1/")
        or audit.recorded_in_scope()
        or view_marks.is_webhook_receiver()
        or response.status_code in (401, 404, 405, 413, 415, 429)
    ):
        return response
    try:
        if response.status_code >= 400:
            db.session.rollback()
        body: object = None
        if view_marks.has_secret_body():
            body = REDACTED
        elif (request.content_length or 0) <= AUDIT_BODY_LIMIT and not g.get("body_refused"):
            body = request.get_json(silent=True)
        audit.record_now(
            f"http.{request.method.lower()}",
            target_type="endpoint",
            target_id=request.path[:64],
            payload={"status": response.status_code, "body": body},
        )
    except Exception as exc:  # the response is already decided; never turn it into a 500 here
        if database_unavailable(exc):
            current_app.logger.warning("could not write the request audit entry: %s", exc)
        else:
            current_app.logger.exception("could not write the request audit entry")
        db.session.rollback()
    return response


def _rate_limit_headers(response: Response) -> Response:
    """IETF RateLimit-* headers for the tightest limit this request touched."""
    current = limiter.current_limit if current_app.config.get("RATELIMIT_ENABLED") else None
    if current is not None:
        headers = rate_limit_headers(current.limit.amount, current.remaining, current.reset_at)
        response.headers.extend(headers)
        if response.status_code == 429:
            response.headers.setdefault("Retry-After", str(max(1, int(headers["RateLimit-Reset"]))))
    return response


def rate_limit_headers(limit: int, remaining: int, reset_at: float) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(limit),
        "RateLimit-Remaining": str(remaining),
        "RateLimit-Reset": str(max(0, int(reset_at - time.time()))),
    }


def request_id(incoming: str) -> str:
    """The caller's X-Request-ID if it is sane, else a new one."""
    return incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex


def _finish(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def _end(_exc: BaseException | None) -> None:
    """Forget the request's actor: the thread may run non-request code next."""
    context.set_current(context.ActionContext())


def register(app: Flask) -> None:
    app.before_request(_begin)
    app.before_request(_check_body)
    app.before_request(authenticate_request)
    app.after_request(_audit_mutation)
    app.after_request(_rate_limit_headers)
    app.after_request(_finish)
    app.teardown_request(_end)
