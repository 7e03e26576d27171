from flask import jsonify, request, url_for
from flask.views import MethodView

from app.auth import throttle
from app.auth.guard import current_principal, public, requires
from app.errors import Unauthorized
from app.extensions import Blueprint
from app.pagination import PageQuerySchema
from app.projects import service as projects
from app.view_marks import webhook_receiver
from app.webhooks import receiving, rules, service, sources
from app.webhooks.models import WebhookEvent
from app.webhooks.schemas import (
    EventPageSchema,
    ReceiptSchema,
    RuleCreateSchema,
    RulePageSchema,
    RuleSchema,
    RuleUpdateSchema,
    SourceCreatedSchema,
    SourceCreateSchema,
    SourceGrantCreateSchema,
    SourceGrantListSchema,
    SourceGrantSchema,
    SourceListSchema,
    WebhookEventQuerySchema,
    WebhookEventSchema,
)

blp = Blueprint(
    "webhooks",
    __name__,
    url_prefix="/api/v1",
    description="Inbound webhooks: sources, received events and the rules that make tasks",
)


def _source(source, secret=None):  # type: ignore[no-untyped-def]
    body = {
        "id": source.id,
        "name": source.name,
        "kind": source.kind,
        "url": url_for("webhooks.Receiver", name=source.name, _external=True),
        "created_at": source.created_at,
    }
    if secret is not None:
        body["secret"] = secret
    return body


@blp.route("/webhook-sources")
class Sources(MethodView):
    @requires("admin")
    @blp.response(200, SourceListSchema)
    def get(self):
        """Webhook sources (admin); secrets are never shown again."""
        return {"data": [_source(s) for s in sources.list_sources()]}

    @requires("admin")
    @blp.arguments(SourceCreateSchema)
    @blp.response(201, SourceCreatedSchema)
    def post(self, data):
        """Add a source (admin): its URL, and its secret this once."""
        source, secret = sources.create_source(current_principal(), data)
        return (
            _source(source, secret),
            201,
            {"Location": f"/api/v1/webhook-sources/{source.name}"},
        )


@blp.route("/webhook-sources/<name>")
class SourceByName(MethodView):
    @requires("admin")
    @blp.response(204)
    def delete(self, name):
        """Remove a source (admin; 409 while rules use it). Its events are kept."""
        sources.delete_source(name)


def _grant(grant, key):  # type: ignore[no-untyped-def]
    return {"project": key, "granted_by": grant.granted_by, "created_at": grant.created_at}


@blp.route("/webhook-sources/<name>/projects")
class SourceProjects(MethodView):
    @requires("admin")
    @blp.response(200, SourceGrantListSchema)
    def get(self, name):
        """The projects the source is granted to (admin): only their maintainers may attach
        rules to it, and only their members see its deliveries."""
        source = sources.get_source(name)
        return {"data": [_grant(g, key) for g, key in sources.grants(source)]}

    @requires("admin")
    @blp.arguments(SourceGrantCreateSchema)
    @blp.response(201, SourceGrantSchema)
    @blp.alt_response(200, schema=SourceGrantSchema, description="It was granted already")
    @blp.doc(operationId="grantSourceToProject")
    def post(self, data, name):
        """Grant the source to a project (admin)."""
        source = sources.get_source(name)
        project = projects.get_project(data["project"])
        grant, new = sources.grant(current_principal(), source, project)
        return (
            _grant(grant, project.key),
            201 if new else 200,
            {"Location": f"/api/v1/webhook-sources/{name}/projects/{project.key}"},
        )


@blp.route("/webhook-sources/<name>/projects/<key>")
class SourceProject(MethodView):
    @requires("admin")
    @blp.response(204)
    @blp.doc(operationId="revokeSourceFromProject")
    def delete(self, name, key):
        """Take the source back from a project (admin): the project's rules on it stay, and
        match nothing until it is granted again."""
        sources.revoke(sources.get_source(name), projects.get_project(key))


@blp.route("/projects/<key>/webhook-sources")
class ProjectSources(MethodView):
    @requires("projects:read")
    @blp.response(200, SourceListSchema)
    def get(self, key):
        """The webhook sources granted to the project (viewer): those its rules may use."""
        project = projects.project_for(current_principal(), key)
        return {"data": [_source(s) for s in sources.granted_sources(project)]}


_RECEIVER_HEADERS = [
    {
        "in": "header",
        "name": name,
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }
    for name, description in (
        ("X-Hub-Signature-256", "github: `sha256=` HMAC-SHA256 of the raw body"),
        ("X-GitHub-Event", "github: event type"),
        ("X-GitHub-Delivery", "github: delivery id (a redelivery keeps it)"),
        ("X-Switchboard-Signature-256", "generic: `sha256=` HMAC-SHA256 of the raw body"),
        ("X-Switchboard-Event", "generic: event type"),
        ("X-Switchboard-Delivery", "generic: delivery id"),
    )
]


@blp.route("/webhooks/<name>")
class Receiver(MethodView):
    @webhook_receiver
    @public
    @blp.response(202, ReceiptSchema)
    @blp.alt_response(200, schema=ReceiptSchema, description="A redelivery (`duplicate`) or ping")
    @blp.doc(
        parameters=_RECEIVER_HEADERS,
        requestBody={
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "properties": {"payload": {"type": "string"}}}
                },
            },
        },
    )
    @blp.doc(operationId="receiveWebhook")
    def post(self, name):
        """Take a delivery: verify its signature, store it once, acknowledge at once (matching
        runs on the `events` queue). No credential: the signature is the authentication."""
        ip = request.remote_addr
        try:
            receipt = receiving.receive(
                name, request.get_data(), request.headers, request.mimetype, ip
            )
        except Unauthorized:
            # counted after the fact: an HMAC cannot be guessed, so a valid delivery never pays
            # a lookup, while a sender of bad signatures is refused (429) once over the limit
            throttle.failed(ip)
            throttle.check(ip)
            raise
        body = {
            "id": receipt.id,
            "delivery_id": receipt.delivery_id,
            "event": receipt.event,
            "state": receipt.state,
            "duplicate": receipt.duplicate,
        }
        # already JSON: skip the schema round trip on the hottest path (documented above)
        return jsonify(body), 200 if receipt.duplicate or receipt.ping else 202


def event_view(event):  # type: ignore[no-untyped-def]
    """The event as the caller may see it: only their projects' matches, tasks and errors."""
    principal = current_principal()
    ids = projects.visible_project_ids(principal)  # once, for the matches and the error
    matches = service.event_matches(ids, event.id)
    keys = projects.project_keys({m.project_id for m in matches})
    # a copy: the event itself is never changed for a reader
    fields = {c.key: getattr(event, c.key) for c in WebhookEvent.__mapper__.column_attrs}
    fields["matches"] = [
        {
            "rule_id": m.rule_id,
            "project": keys.get(m.project_id),
            "task_id": m.task_id,
            "created_at": m.created_at,
        }
        for m in matches
    ]
    fields["tasks"] = [m.task_id for m in matches if m.task_id is not None]
    fields["error"] = service.error_for(ids, event, matches)
    return fields


@blp.route("/events")
class Events(MethodView):
    @requires("projects:read")
    @blp.arguments(WebhookEventQuerySchema, location="query")
    @blp.response(200, EventPageSchema)
    def get(self, args):
        """Received webhook events, newest first: all for admins, else those that made tasks in
        my projects."""
        return service.list_events(
            current_principal(),
            state=args.get("state"),
            source=args.get("source"),
            project=args.get("project"),
            type=args.get("type"),
            cursor=args.get("cursor"),
            limit=args["limit"],
        ).response()


@blp.route("/events/<int:event_id>")
class EventById(MethodView):
    @requires("projects:read")
    @blp.response(200, WebhookEventSchema)
    def get(self, event_id):
        """One event: headers (no secrets), payload, matched rules, tasks created, error."""
        return event_view(service.event_for(current_principal(), event_id))


@blp.route("/events/<int:event_id>/replay")
class EventReplay(MethodView):
    @requires("admin")
    @blp.response(200, WebhookEventSchema)
    def post(self, event_id):
        """Match the event again (admin): rules that already made a task make none."""
        event = service.event_for(current_principal(), event_id)
        return event_view(service.replay(event))


def rule_view(rule):  # type: ignore[no-untyped-def]
    return {
        "id": rule.id,
        "project": projects.project_keys({rule.project_id})[rule.project_id],
        "name": rule.name,
        "source": sources.source_names().get(rule.source_id),
        "event": rule.event,
        "actions": rule.actions,
        "conditions": rule.conditions,
        "task": rule.task,
        "enabled": rule.enabled,
        "source_granted": sources.is_granted(rule.source_id, rule.project_id),
        "author_id": rule.author_id,
        "created_at": rule.created_at,
        "updated_at": rule.updated_at,
    }


@blp.route("/projects/<key>/rules")
class ProjectRules(MethodView):
    @requires("projects:read")
    @blp.arguments(PageQuerySchema, location="query")
    @blp.response(200, RulePageSchema)
    def get(self, args, key):
        """The project's webhook rules (viewer), oldest first."""
        project = projects.project_for(current_principal(), key)
        page = rules.list_rules(project, cursor=args.get("cursor"), limit=args["limit"])
        page.items = [rule_view(r) for r in page.items]
        return page.response()

    @requires("projects:write")
    @blp.arguments(RuleCreateSchema)
    @blp.response(201, RuleSchema)
    def post(self, data, key):
        """Add a rule (maintainer): tasks it makes are created on my behalf."""
        project = projects.project_for(current_principal(), key, "maintainer")
        rule = rules.create_rule(current_principal(), project, data)
        return rule_view(rule), 201, {"Location": f"/api/v1/rules/{rule.id}"}


@blp.route("/rules/<int:rule_id>")
class RuleById(MethodView):
    @requires("projects:read")
    @blp.response(200, RuleSchema)
    def get(self, rule_id):
        """One rule (viewer)."""
        return rule_view(rules.rule_for(current_principal(), rule_id))

    @requires("projects:write")
    @blp.arguments(RuleUpdateSchema)
    @blp.response(200, RuleSchema)
    def patch(self, data, rule_id):
        """Change a rule (maintainer); I become the author of the tasks it makes."""
        rule = rules.rule_for(current_principal(), rule_id, "maintainer")
        return rule_view(rules.update_rule(current_principal(), rule, data))

    @requires("projects:write")
    @blp.response(204)
    def delete(self, rule_id):
        """Delete a rule (maintainer); events it matched keep their record."""
        rules.delete_rule(rules.rule_for(current_principal(), rule_id, "maintainer"))
