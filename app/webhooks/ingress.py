"""The fast path for webhook deliveries: a WSGI middleware in front of Flask.

A busy GitHub organisation sends thousands of deliveries a minute, and the receiver's work is
small (verify, insert, acknowledge), so Flask's per-request pipeline (routing, hooks, rate
limiter, response schemas) was most of its cost. This middleware takes only the plain success
path of `POST /api/v1/webhooks/<name>` (a JSON body within the size limit that `receive`
accepts) and answers it directly with the same body, status and headers as the Flask view.
Everything else, including every error, goes on to the Flask view unchanged, which stays the one
place that formats problems, counts bad signatures and documents the endpoint: the middleware
hands it the body it read, so nothing is lost and nothing is decided twice.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask
from werkzeug.datastructures import EnvironHeaders

from app.database import database_unavailable, db, remove_session
from app.errors import DomainError
from app.request_hooks import request_id
from app.webhooks import receiving

PREFIX = "/api/v1/webhooks/"
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WebhookIngress:
    def __init__(self, wsgi_app: WSGIApp, app: Flask) -> None:
        self.wsgi_app = wsgi_app
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST" or not path.startswith(PREFIX):
            return self.wsgi_app(environ, start_response)
        name = path[len(PREFIX) :]
        mimetype = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        limit = self.app.config["SWITCHBOARD_WEBHOOK_MAX_BODY_BYTES"]
        if not name or "/" in name or mimetype != "application/json" or not 0 < length <= limit:
            return self.wsgi_app(environ, start_response)
        body = environ["wsgi.input"].read(length)
        environ["wsgi.input"] = io.BytesIO(body)  # the Flask view reads it again if need be
        headers = EnvironHeaders(environ)
        with self.app.app_context():
            try:
                receipt = receiving.receive(
                    name, body, headers, mimetype, environ.get("REMOTE_ADDR")
                )
            except DomainError:
                return self.wsgi_app(environ, start_response)  # the view answers errors
            except Exception as exc:
                # the view tries again and answers what still fails (a 503 while the database
                # is away): storing a delivery twice keeps one (its delivery id is unique)
                if not database_unavailable(exc):
                    self.app.logger.exception("webhook fast path failed; the view answers")
                with contextlib.suppress(Exception):
                    db.session.rollback()
                return self.wsgi_app(environ, start_response)
            finally:
                remove_session()
        rid = request_id(headers.get("X-Request-ID", ""))
        payload = (
            json.dumps(
                {
                    "id": receipt.id,
                    "delivery_id": receipt.delivery_id,
                    "event": receipt.event,
                    "state": receipt.state,
                    "duplicate": receipt.duplicate,
                },
                separators=(",", ":"),
            )
            + "\n"
        ).encode()
        status = "200 OK" if receipt.duplicate or receipt.ping else "202 ACCEPTED"
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(payload))),
                ("X-Request-ID", rid),
                ("Cache-Control", "no-store"),
            ],
        )
        return [payload]
