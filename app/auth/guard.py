"""Authentication for every request, deny by default.

Every view needs a valid credential unless it is marked `@public`; abilities are checked with
`@requires(...)`. New modules are therefore protected without remembering to be.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from functools import wraps
from typing import Any, TypeVar

from flask import g, request

from app import context
from app.auth import service, throttle
from app.auth.service import Principal
from app.errors import Forbidden, Unauthorized
from app.view_marks import view_flag

F = TypeVar("F", bound=Callable[..., Any])

SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT or sbp_ token"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}
DEFAULT_SECURITY = [{"bearerAuth": []}, {"apiKey": []}]
#: endpoints of other libraries (the OpenAPI document and its UI) that are public by nature
PUBLIC_ENDPOINTS = frozenset(
    {"api-docs.openapi_json", "api-docs.openapi_swagger_ui", "docs_assets.docs_asset"}
)


def public(func: F) -> F:
    """No credential needed (health, login, webhooks...); documented as such in OpenAPI."""
    func._public = True  # type: ignore[attr-defined]
    apidoc = getattr(func, "_apidoc", {})
    apidoc.setdefault("manual_doc", {})["security"] = []
    func._apidoc = apidoc  # type: ignore[attr-defined]
    return func


def run_scoped(func: F) -> F:
    """A run's token (`sbr_…`) may call this too, for its own run and task only; every other
    endpoint refuses it (403). Documented in OpenAPI as `x-run-token`."""
    func._run_scoped = True  # type: ignore[attr-defined]
    apidoc = getattr(func, "_apidoc", {})
    apidoc.setdefault("manual_doc", {})["x-run-token"] = True
    func._apidoc = apidoc  # type: ignore[attr-defined]
    return func


def check_abilities(principal: Principal, abilities: tuple[str, ...]) -> None:
    """Forbidden unless `principal` holds every ability (and is an administrator for `admin`)."""
    missing = [a for a in abilities if not principal.can(a)]
    if missing:
        raise Forbidden("This needs the ability: " + ", ".join(missing))
    if "admin" in abilities and not principal.user.is_admin:
        raise Forbidden("This needs an administrator.")


def required_abilities() -> tuple[str, ...]:
    """What the current view required (a stream checks it again when access changes)."""
    return g.get("sb_required", ())


def requires(*abilities: str) -> Callable[[F], F]:
    """The principal must hold every ability (a session holds its role's; a token its own)."""

    def decorator(func: F) -> F:
        @wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check_abilities(current_principal(), abilities)
            g.sb_required = abilities
            return func(*args, **kwargs)

        apidoc = deepcopy(getattr(func, "_apidoc", {}))
        apidoc.setdefault("manual_doc", {})["x-abilities"] = list(abilities)
        wrapper._apidoc = apidoc  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


def _is_public() -> bool:
    if request.endpoint in PUBLIC_ENDPOINTS:
        return True
    public = view_flag("_public")
    return public is None or public  # 404/405 are answered as such, not as 401


def _is_stream() -> bool:
    return bool(view_flag("_stream"))


def _credential() -> str | None:
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("Use 'Authorization: Bearer <token>'.", code="invalid_token")
        return value.strip()
    return request.headers.get("X-API-Key", "").strip() or None


def authenticate_request() -> None:
    """before_request: resolve the principal, or refuse with 401 (429 after repeated failures)."""
    g.principal = None
    if request.method == "OPTIONS" or _is_public():
        return
    credential = _credential()
    ip = context.current().ip
    stream_token = request.args.get("stream_token") if _is_stream() else None
    if credential is None and not stream_token:
        raise Unauthorized("This endpoint needs a credential.", code="unauthenticated")
    throttle.check(ip)
    try:
        if credential is None:
            principal = service.authenticate_stream(stream_token or "", request.path)
        else:
            principal = service.authenticate(credential)
    except Unauthorized:
        throttle.failed(ip)
        raise
    g.principal = principal
    context.update(user_id=principal.user.id, via=principal.via)
    if principal.kind == "run" and not view_flag("_run_scoped"):
        raise Forbidden("A run token may only read its own run and task and report on its run.")


def current_principal() -> Principal:
    principal = g.get("principal")
    if principal is None:
        raise Unauthorized("This endpoint needs a credential.", code="unauthenticated")
    return principal
