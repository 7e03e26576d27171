"""Who is acting, from where, under which request id: what services need without Flask.

Request hooks fill it for HTTP requests; jobs and CLI commands set their own (`acting_as`), so
the audit service records the same fields wherever an action comes from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ActionContext:
    request_id: str | None = None
    ip: str | None = None
    user_id: int | None = None
    #: how the actor authenticated: "session", "pat:<id>", "system", "cli"
    via: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


_EMPTY = ActionContext()
_current: ContextVar[ActionContext] = ContextVar("switchboard_action", default=_EMPTY)


def current() -> ActionContext:
    return _current.get()


def set_current(ctx: ActionContext) -> None:
    _current.set(ctx)


def update(**changes: object) -> ActionContext:
    ctx = replace(_current.get(), **changes)  # type: ignore[arg-type]
    _current.set(ctx)
    return ctx


@contextlib.contextmanager
def acting_as(ctx: ActionContext) -> Iterator[ActionContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
