from flask.views import MethodView

from app.auth.guard import current_principal, requires
from app.extensions import Blueprint
from app.notifications import service
from app.notifications.schemas import (
    NotificationPageSchema,
    NotificationQuerySchema,
    NotificationSchema,
    NotificationSettingsSchema,
    NotificationSettingsUpdateSchema,
    ReadAllSchema,
)

blp = Blueprint(
    "notifications",
    __name__,
    url_prefix="/api/v1",
    description="Notifications: what needs me (questions, reviews, my failed tasks), in-app, "
    "by email and in chat",
)


def _settings(user_id: int) -> dict:
    settings = service.settings_of(user_id)
    return {"channels": service.effective(settings), "chat_url": settings.chat_url}


@blp.route("/notifications")
class Notifications(MethodView):
    @requires("projects:read")
    @blp.arguments(NotificationQuerySchema, location="query")
    @blp.response(200, NotificationPageSchema)
    @blp.doc(operationId="listNotifications")
    def get(self, args):
        """My notifications, newest first (`?unread=true`: only those not read yet);
        `meta.unread` counts the unread ones."""
        user_id = current_principal().user.id
        page = service.inbox(
            user_id, unread=args["unread"], cursor=args.get("cursor"), limit=args["limit"]
        )
        body, status, headers = page.response()
        body["meta"]["unread"] = service.unread_count(user_id)
        return body, status, headers


@blp.route("/notifications/<int:notification_id>/read")
class NotificationRead(MethodView):
    @requires("projects:read")
    @blp.response(200, NotificationSchema)
    @blp.doc(operationId="readNotification")
    def post(self, notification_id):
        """Mark one of my notifications read."""
        return service.mark_read(current_principal().user.id, notification_id)


@blp.route("/notifications/read-all")
class NotificationsReadAll(MethodView):
    @requires("projects:read")
    @blp.response(200, ReadAllSchema)
    @blp.doc(operationId="readAllNotifications")
    def post(self):
        """Mark all my notifications read."""
        return {"read": service.mark_all_read(current_principal().user.id)}


@blp.route("/me/notification-settings")
class MyNotificationSettings(MethodView):
    @requires("account")
    @blp.response(200, NotificationSettingsSchema)
    @blp.doc(operationId="getNotificationSettings")
    def get(self):
        """Which kinds reach me how (in_app, email, chat), and my chat webhook."""
        return _settings(current_principal().user.id)

    @requires("account")
    @blp.arguments(NotificationSettingsUpdateSchema)
    @blp.response(200, NotificationSettingsSchema)
    @blp.doc(operationId="updateNotificationSettings")
    def put(self, data):
        """Change them: kinds and channels given are set, the others keep theirs; `chat_url`
        (checked like an outbound webhook's: no private address) or null."""
        user_id = current_principal().user.id
        service.update_settings(user_id, data)
        return _settings(user_id)
