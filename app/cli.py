"""The app's commands: Flask's CLI for this app (`db upgrade`, …) plus users, release, the
API docs, and `tasks create` (a client of a running server). The `switchboard` command adds to
them the commands that start processes (`workers.cli`)."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from app.tasks.models import PRIORITIES, TASK_TERMINAL


def _create_app() -> Flask:
    """The app, or one line saying which setting to fix (a traceback buries it)."""
    from app import create_app
    from app.config import ConfigError

    try:
        return create_app()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(cls=FlaskGroup, create_app=_create_app)
def main() -> None:
    """Switchboard: a control plane for AI coding agents."""


def register_commands(app: Flask) -> None:
    app.cli.add_command(users)
    app.cli.add_command(release)


# -- users -------------------------------------------------------------------------------------


@click.group()
def users() -> None:
    """Manage user accounts."""


@users.command("create")
@click.argument("username")
@click.option("--email", default=None)
@click.option("--admin", is_flag=True, help="Give the user the admin role.")
@click.option(
    "--password",
    envvar="SWITCHBOARD_NEW_PASSWORD",
    default=None,
    help="Default: prompt (or generate with --generate-password).",
)
@click.option("--generate-password", is_flag=True, help="Generate one and print it once.")
@with_appcontext
def users_create(
    username: str, email: str | None, admin: bool, password: str | None, generate_password: bool
) -> None:
    """Create a user."""
    import secrets

    from app import context
    from app.errors import DomainError
    from app.users import service

    if generate_password:
        password = secrets.token_urlsafe(18)
    elif not password:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with context.acting_as(context.ActionContext(via="cli")):
        try:
            user = service.create_user(
                username, password or "", email=email, role="admin" if admin else "member"
            )
        except DomainError as exc:
            raise click.ClickException(f"{exc.detail} {getattr(exc, 'extra', '') or ''}") from exc
    click.echo(f"created {user.role} {user.username} (id {user.id})")
    if generate_password:
        click.echo(f"password (shown once): {password}")


@users.command("list")
@with_appcontext
def users_list() -> None:
    """List users."""
    import sqlalchemy as sa

    from app.database import db
    from app.users.models import User

    for user in db.session.scalars(sa.select(User).order_by(User.id)):
        state = "active" if user.is_active else "inactive"
        click.echo(f"{user.id}\t{user.username}\t{user.email or '-'}\t{user.role}\t{state}")


# -- release -----------------------------------------------------------------------------------


@click.command()
@with_appcontext
def release() -> None:
    """The release phase of every deploy (the Procfile's `release:`): upgrade the database,
    then create the first admin from SWITCHBOARD_ADMIN_* if no admin exists. Safe to repeat.

    In production it never makes up a password (a release log is no place for one): with no
    admin and no SWITCHBOARD_ADMIN_PASSWORD it fails, saying what to set."""
    import sqlalchemy as sa
    from flask_migrate import upgrade

    from app import context
    from app.database import db
    from app.users import service

    cfg = current_app.config
    try:
        upgrade()
        with context.acting_as(context.ActionContext(via="cli")):
            created = service.ensure_admin(
                cfg["SWITCHBOARD_ADMIN_USERNAME"] or "admin",
                cfg["SWITCHBOARD_ADMIN_PASSWORD"] or None,
                cfg["SWITCHBOARD_ADMIN_EMAIL"] or None,
                may_generate=cfg["SWITCHBOARD_ENV"] != "production",
            )
    except sa.exc.OperationalError as exc:
        where = db.engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise click.ClickException(
            f"cannot reach the database at {where} (DATABASE_URL): {reason}"
        ) from None
    except service.AdminPasswordMissing:
        raise click.ClickException(
            "no admin exists yet: set SWITCHBOARD_ADMIN_USERNAME and SWITCHBOARD_ADMIN_PASSWORD "
            "and release again (or run `switchboard users create NAME --admin`)"
        ) from None
    if created:
        user, generated = created
        click.echo(f"created admin user {user.username!r}")
        if generated:
            bar = "=" * 64
            click.echo(f"{bar}\n  admin password (shown once): {generated}\n{bar}")
    click.echo("release: database up to date")


@main.command("api-docs")
@with_appcontext
def api_docs() -> None:
    """Print docs/api.md, generated from the OpenAPI document."""
    from app.extensions import api
    from app.openapi import render_markdown

    click.echo(render_markdown(api.spec.to_dict()), nl=False)


# -- a client of a running server --------------------------------------------------------------


@main.group("secrets")
def secrets_group() -> None:
    """Project secrets' encryption keys."""


@secrets_group.command("new-key")
def secrets_new_key() -> None:
    """Print a new key for SWITCHBOARD_SECRETS_KEY (put it first; keep the old ones after it
    until `switchboard secrets rotate` has run)."""
    from app.config import fernet_key

    click.echo(fernet_key())


@secrets_group.command("rotate")
@with_appcontext
def secrets_rotate() -> None:
    """Re-encrypt every project secret with the first key of SWITCHBOARD_SECRETS_KEY."""
    from app.vault import service as vault

    click.echo(f"{vault.rotate()} secrets re-encrypted with the newest key")


@main.group("tasks")
def tasks_group() -> None:
    """Tasks on a running Switchboard, over its API: SWITCHBOARD_URL (default
    http://127.0.0.1:8000) and SWITCHBOARD_TOKEN (an access token or a personal access token)."""


@tasks_group.command("create")
@click.option("--project", required=True, help="Project key.")
@click.option("--prompt", required=True, help="What the agent is asked to do.")
@click.option("--title", default=None, help="Default: the prompt's first line.")
@click.option("--agent", default=None, help="Default: the project's default agent.")
@click.option("--priority", default=None, type=click.Choice(PRIORITIES))
@click.option("--wait", is_flag=True, help="Wait until the task has ended (long-poll).")
def tasks_create(
    project: str,
    prompt: str,
    title: str | None,
    agent: str | None,
    priority: str | None,
    wait: bool,
) -> None:
    """Create a task and print it (with --wait: once it has ended; exit 1 unless completed)."""
    body = {"project": project, "prompt": prompt, "title": title or prompt.splitlines()[0][:300]}
    body.update({k: v for k, v in (("agent", agent), ("priority", priority)) if v})
    task = _api("POST", "/api/v1/tasks", body)
    while wait and task["status"] not in TASK_TERMINAL:
        task = _api("GET", f"/api/v1/tasks/{task['id']}?wait=30&status={task['status']}")
    click.echo(json.dumps(task, indent=2))
    if wait and task["status"] != "completed":
        sys.exit(1)


@main.command("attach")
@click.argument("run_id", type=int)
@click.option("--control", is_flag=True, help="Take the keyboard (else watch).")
@click.option("--takeover", is_flag=True, help="With --control: take it from whoever has it.")
@click.option("--server", envvar="SWITCHBOARD_URL", default="http://127.0.0.1:8000")
@click.option(
    "--token", envvar="SWITCHBOARD_TOKEN", help="A personal access token (SWITCHBOARD_TOKEN)."
)
def attach(run_id: int, control: bool, takeover: bool, server: str, token: str | None) -> None:
    """Attach this terminal to a run's (a task with `tty`): watch it, or type into it with
    --control. Ctrl-] detaches and leaves the run running."""
    from app.terminals.client import AttachError
    from app.terminals.client import attach as attach_to

    if not token:
        raise click.UsageError("set SWITCHBOARD_TOKEN or --token (a personal access token)")
    try:
        status = attach_to(server, token, run_id, control or takeover, takeover)
    except AttachError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


@main.command("ask", context_settings={"ignore_unknown_options": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def ask(args: tuple[str, ...]) -> None:
    """For agents: ask a person and wait for the answer (`switchboard ask --help`)."""
    from app.questions.client import main as ask_main

    sys.exit(ask_main(["ask", *args]))


def _api(method: str, path: str, body: dict | None = None) -> dict:
    """One API call; a problem (or no server) ends the command with its detail."""
    base = os.environ.get("SWITCHBOARD_URL", "http://127.0.0.1:8000").rstrip("/")
    token = os.environ.get("SWITCHBOARD_TOKEN")
    if not token:
        raise click.UsageError("set SWITCHBOARD_TOKEN (an access token or a personal access token)")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        problem = json.loads(exc.read() or b"{}")
        raise click.ClickException(f"{exc.code}: {problem.get('detail') or exc.reason}") from None
    except OSError as exc:
        raise click.ClickException(f"cannot reach {base}: {exc}") from None
