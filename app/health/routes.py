import shutil
from pathlib import Path

import sqlalchemy as sa
from flask import current_app
from flask.views import MethodView

from app import __version__
from app.auth.guard import public
from app.database import db
from app.errors import ServiceUnavailable
from app.extensions import Blueprint
from app.health.schemas import HealthSchema, ReadySchema, VersionSchema
from app.queues import get_redis

blp = Blueprint("health", __name__, url_prefix="/api/v1", description="Health and version")


@blp.route("/health")
class Health(MethodView):
    @public
    @blp.response(200, HealthSchema)
    def get(self):
        """Liveness: the process answers. Touches neither the database nor Redis."""
        return {"status": "ok"}


def _check(name: str, probe) -> str | None:  # type: ignore[no-untyped-def]
    try:
        probe()
        return None
    except Exception as exc:  # any failure means not ready; say which and why
        current_app.logger.warning("readiness: %s failed: %s", name, exc)
        return f"{name}: {type(exc).__name__}"


def _workspace_disk() -> dict[str, object]:
    """Free space where runs get their workspaces; a warning below the threshold (runs go on
    until the disk is full, and then fail saying so)."""
    root = Path(current_app.config["SWITCHBOARD_WORKSPACE_ROOT"])
    while not root.exists() and root != root.parent:
        root = root.parent
    free_mb = shutil.disk_usage(root).free // (1024 * 1024)
    low = free_mb < current_app.config["SWITCHBOARD_WORKSPACE_MIN_FREE_MB"]
    return {
        "status": "low" if low else "ok",
        "free_mb": free_mb,
        **({"warning": "the workspace disk is almost full"} if low else {}),
    }


@blp.route("/health/ready")
class Ready(MethodView):
    @public
    @blp.response(200, ReadySchema)
    def get(self):
        """Readiness: the database and Redis answer (503 naming what failed)."""
        failures = [
            f
            for f in (
                _check("database", lambda: db.session.execute(sa.text("SELECT 1"))),
                _check("redis", lambda: get_redis().ping()),
            )
            if f
        ]
        db.session.remove()
        workspace = _workspace_disk()
        if failures:
            raise ServiceUnavailable(
                "Not ready: " + "; ".join(failures),
                checks={f.split(":")[0]: "failed" for f in failures},
            )
        return {
            "status": "ready",
            "checks": {"database": "ok", "redis": "ok", "workspace": workspace},
        }


@blp.route("/version")
class Version(MethodView):
    @public
    @blp.response(200, VersionSchema)
    def get(self):
        """Server version and API version."""
        return {"version": __version__, "api": "v1"}
