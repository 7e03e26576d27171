"""Switchboard's control plane: `create_app()` builds the Flask app from settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the package imports nothing else: `app.agents` serves the machine client
    from flask import Flask

__version__ = "0.1.0"

#: every resource module, registered in this order
MODULES = (
    "health",
    "auth",
    "users",
    "audit",
    "projects",
    "vault",
    "tasks",
    "runs",
    "activity",
    "webhooks",
    "subscriptions",
    "machines",
    "terminals",
    "questions",
    "reviews",
    "notifications",
)
#: modules that listen on the event bus (`app.events`): each has `listeners.connect()`
LISTENING = ("tasks", "webhooks", "subscriptions", "machines", "questions", "notifications")


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app. `config` overrides settings by their Settings name (e.g. `DATABASE_URL`)."""
    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from app import ratelimits, request_hooks
    from app.config import Settings
    from app.errors import register_error_handlers
    from app.extensions import api, init_extensions
    from app.input_bounds import register_converters
    from app.logs import configure_logging
    from app.openapi import (
        ProblemResponses,
        SharedEnums,
        openapi_config,
        register_docs_assets,
        shared_enums,
    )

    settings = Settings.from_env()
    for key, value in (config or {}).items():
        setattr(settings, key, value)
    settings.resolve()

    app = Flask(__name__, instance_path=settings.INSTANCE_PATH, static_folder=None)
    register_converters(app)
    app.config.update(settings.flask_config())
    app.config.update(openapi_config())
    configure_logging(app)
    from app.tasks.ingress import TaskIntake
    from app.webhooks.ingress import WebhookIngress

    # the two busiest writes answer their plain success case before Flask (see each module)
    app.wsgi_app = TaskIntake(app.wsgi_app, app)  # type: ignore[method-assign]
    app.wsgi_app = WebhookIngress(app.wsgi_app, app)  # type: ignore[method-assign]
    if settings.TRUSTED_PROXIES:
        n = settings.TRUSTED_PROXIES
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)  # type: ignore

    # Request hooks come before the extensions' so the rate limiter sees the principal.
    request_hooks.register(app)
    init_extensions(app)
    ratelimits.init_app(app)
    plugins = [SharedEnums(shared_enums()), ProblemResponses()]
    api.init_app(app, spec_kwargs={"extra_plugins": plugins})
    register_error_handlers(app)
    register_docs_assets(app)

    import importlib

    for name in MODULES:
        module = importlib.import_module(f"app.{name}.routes")
        api.register_blueprint(module.blp)
        if hasattr(module, "ws_blp"):  # WebSocket routes: outside the OpenAPI document
            app.register_blueprint(module.ws_blp)
    for name in LISTENING:
        importlib.import_module(f"app.{name}.listeners").connect()

    from app.cli import register_commands

    register_commands(app)
    return app
