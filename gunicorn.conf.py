"""gunicorn settings; each one can be overridden from the environment.

Threaded workers (gthread): a long-lived stream or WebSocket holds one thread, so there are many
threads per process; no monkey-patching. Logs go to stdout.
"""

import multiprocessing
import os
import sys

from app.config import ConfigError, Settings


def _refuse_bad_settings() -> None:
    """One line naming the setting to fix, before gunicorn starts: a worker that cannot build
    the app would otherwise print a traceback each time gunicorn boots it."""
    try:
        Settings.from_env().resolve()
    except ConfigError as exc:
        sys.stderr.write(f"switchboard: {exc}\n")
        sys.exit(1)


_refuse_bad_settings()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


bind = os.environ.get("GUNICORN_BIND") or (
    f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
)
worker_class = "gthread"
workers = _env_int("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count()))
threads = _env_int("GUNICORN_THREADS", 16)
# every open stream is a connection: gunicorn stops accepting at this many per process
worker_connections = _env_int("GUNICORN_WORKER_CONNECTIONS", max(1000, 2 * threads))
timeout = _env_int("GUNICORN_TIMEOUT", 60)
# streams and long-polls end at SIGTERM (app.live.sse.stop_streams): what is left is requests
# in flight; platforms kill at 30 s
graceful_timeout = _env_int("GUNICORN_GRACEFUL_TIMEOUT", 15)
keepalive = _env_int("GUNICORN_KEEPALIVE", 5)
max_requests = _env_int("GUNICORN_MAX_REQUESTS", 10000)
max_requests_jitter = _env_int("GUNICORN_MAX_REQUESTS_JITTER", 1000)
preload_app = os.environ.get("GUNICORN_PRELOAD", "false").lower() in ("1", "true", "yes")
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-") or None  # empty: no access log
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
# The path without the query string: stream tokens travel in query strings and must not be logged.
access_log_format = os.environ.get(
    "GUNICORN_ACCESS_LOG_FORMAT",
    '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms rid=%({x-request-id}o)s',
)
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")
# gunicorn 27's control socket sits at one path per user; two servers on a host would collide.
control_socket_disable = not os.environ.get("GUNICORN_CONTROL_SOCKET")
if os.environ.get("GUNICORN_CONTROL_SOCKET"):
    control_socket = os.environ["GUNICORN_CONTROL_SOCKET"]


def post_worker_init(worker):  # type: ignore[no-untyped-def]
    """End streams on SIGTERM, make the dummy password hash, freeze start-up objects out of the
    collector's way, and start every gthread thread before serving. Left to start on demand,
    each thread is created by the worker's main loop, which must then win the GIL against
    hundreds of busy stream threads per start: with hundreds of clients arriving at once that
    main loop stalls past gunicorn's watchdog."""
    import gc
    import signal
    import threading

    from app.auth.passwords import dummy_hash
    from app.live.sse import on_stop_signal

    # SIGTERM: open streams are told to reconnect elsewhere, then gunicorn's own stop runs
    signal.signal(signal.SIGTERM, on_stop_signal(signal.getsignal(signal.SIGTERM)))
    signal.siginterrupt(signal.SIGTERM, False)

    dummy_hash()  # the first login of an unknown account must take as long as any other
    # the app built at start-up lives as long as the worker: full collections need not walk it
    gc.collect()
    gc.freeze()
    pool = getattr(worker, "tpool", None)
    count = worker.cfg.threads
    if pool is None or count <= 1:
        return
    barrier = threading.Barrier(count + 1, timeout=60)
    for _ in range(count):
        pool.submit(barrier.wait)
    barrier.wait()
