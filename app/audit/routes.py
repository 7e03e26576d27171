from flask.views import MethodView

from app.audit import service
from app.audit.schemas import AuditLogPageSchema, AuditQuerySchema
from app.auth.guard import requires
from app.extensions import Blueprint

blp = Blueprint("audit", __name__, url_prefix="/api/v1", description="Audit trail")


@blp.route("/audit-logs")
class AuditLogs(MethodView):
    @requires("admin")
    @blp.arguments(AuditQuerySchema, location="query")
    @blp.response(200, AuditLogPageSchema)
    def get(self, args):
        """Audit entries, newest first (admin)."""
        limit = args.pop("limit")
        cursor = args.pop("cursor", None)
        return service.list_entries(cursor=cursor, limit=limit, **args).response()
