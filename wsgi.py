"""WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`."""

import sys

from app import create_app
from app.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:  # one line saying what to set, not a traceback per worker
    sys.stderr.write(f"switchboard: {exc}\n")
    sys.exit(4)  # gunicorn's "App failed to load": the master stops instead of respawning
