"""Logs go to stdout (12-factor), one line per record, each tagged with its request id."""

from __future__ import annotations

import logging
import sys

from flask import Flask

from app import context

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = context.current().request_id or "-"
        return True


def configure_logging(app: Flask) -> None:
    level = app.config["SWITCHBOARD_LOG_LEVEL"]
    root = logging.getLogger("app")
    if not any(getattr(h, "_switchboard", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(RequestIdFilter())
        handler._switchboard = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = True
    root.setLevel(level)
    app.logger.setLevel(level)
