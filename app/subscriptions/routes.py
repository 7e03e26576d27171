from flask.views import MethodView

from app.auth.guard import current_principal, requires
from app.extensions import Blueprint
from app.pagination import PageQuerySchema
from app.projects import service as projects
from app.subscriptions import deliveries, service
from app.subscriptions.schemas import (
    DeliveryPageSchema,
    DeliverySchema,
    SubscriptionCreatedSchema,
    SubscriptionCreateSchema,
    SubscriptionPageSchema,
    SubscriptionSchema,
    SubscriptionUpdateSchema,
)
from app.view_marks import secret_body

blp = Blueprint(
    "subscriptions",
    __name__,
    url_prefix="/api/v1",
    description="Outbound webhooks: signed events with retries (admin)",
)


def subscription_view(subscription, secret=None):  # type: ignore[no-untyped-def]
    keys = projects.project_keys({subscription.project_id} - {None})
    body = {
        "id": subscription.id,
        "url": subscription.url,
        "events": subscription.events,
        "project": keys.get(subscription.project_id),
        "description": subscription.description,
        "active": subscription.active,
        "created_at": subscription.created_at,
        "updated_at": subscription.updated_at,
    }
    if secret is not None:
        body["secret"] = secret
    return body


def with_history(sent):  # type: ignore[no-untyped-def]
    history = deliveries.attempts_of([d.id for d in sent])
    for delivery in sent:
        delivery.history = history[delivery.id]
    return sent


@blp.route("/subscriptions")
class Subscriptions(MethodView):
    @requires("admin")
    @blp.arguments(PageQuerySchema, location="query")
    @blp.response(200, SubscriptionPageSchema)
    def get(self, args):
        """Subscriptions (admin)."""
        page = service.list_subscriptions(args.get("cursor"), args["limit"])
        page.items = [subscription_view(s) for s in page.items]
        return page.response()

    @secret_body  # a webhook URL's path or query is often its secret
    @requires("admin")
    @blp.arguments(SubscriptionCreateSchema)
    @blp.response(201, SubscriptionCreatedSchema)
    def post(self, data):
        """Subscribe a URL to events (admin); the secret is shown this once. Loopback and private
        addresses are refused unless allowed in configuration."""
        subscription, secret = service.create(current_principal(), data)
        return (
            subscription_view(subscription, secret),
            201,
            {"Location": f"/api/v1/subscriptions/{subscription.id}"},
        )


@blp.route("/subscriptions/<int:subscription_id>")
class SubscriptionById(MethodView):
    @requires("admin")
    @blp.response(200, SubscriptionSchema)
    def get(self, subscription_id):
        """One subscription (admin)."""
        return subscription_view(service.get(subscription_id))

    @secret_body
    @requires("admin")
    @blp.arguments(SubscriptionUpdateSchema)
    @blp.response(200, SubscriptionSchema)
    def patch(self, data, subscription_id):
        """Change a subscription (admin): URL, events, secret, project, active."""
        return subscription_view(service.update(service.get(subscription_id), data))

    @requires("admin")
    @blp.response(204)
    def delete(self, subscription_id):
        """Delete a subscription and its deliveries (admin)."""
        service.delete(service.get(subscription_id))


@blp.route("/subscriptions/<int:subscription_id>/deliveries")
class SubscriptionDeliveries(MethodView):
    @requires("admin")
    @blp.arguments(PageQuerySchema, location="query")
    @blp.response(200, DeliveryPageSchema)
    def get(self, args, subscription_id):
        """Deliveries of a subscription, newest first, each with its attempts (admin)."""
        subscription = service.get(subscription_id)
        page = deliveries.list_deliveries(subscription, args.get("cursor"), args["limit"])
        page.items = with_history(page.items)
        return page.response()


@blp.route("/deliveries/<int:delivery_id>")
class DeliveryById(MethodView):
    @requires("admin")
    @blp.response(200, DeliverySchema)
    def get(self, delivery_id):
        """One delivery with its attempts (admin)."""
        return with_history([deliveries.get_delivery(delivery_id)])[0]


@blp.route("/deliveries/<int:delivery_id>/redeliver")
class DeliveryRedeliver(MethodView):
    @requires("admin")
    @blp.response(202, DeliverySchema)
    def post(self, delivery_id):
        """Send a dead (or delivered) delivery again, with a fresh retry schedule (admin; 409
        while it is still being tried)."""
        return with_history([deliveries.redeliver(deliveries.get_delivery(delivery_id))])[0]
