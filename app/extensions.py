"""Extension objects, created unbound and attached in `create_app()`.

Nothing here touches Redis or the database at import time: the Redis client and the RQ queues are
built lazily from the app's config the first time they are asked for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import flask_smorest
import marshmallow as ma
import redis
import sqlalchemy as sa
import sqlalchemy.orm
from flask import Flask, current_app, g, has_request_context
from flask_limiter import ApplicationLimit, Limiter
from flask_migrate import Migrate
from flask_sock import Sock
from flask_sqlalchemy import SQLAlchemy
from rq import Queue
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase

from app.errors import ProblemSchema
from app.storable import RequestParser

RUN_QUEUES = ("runs-urgent", "runs-high", "runs-default", "runs-low")
ALL_QUEUES = (*RUN_QUEUES, "events", "maintenance")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


#: Objects stay readable after commit without a reload query; code that needs the database's
#: current values (another process may have changed them) refreshes explicitly.
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})
migrate = Migrate()
sock = Sock()


@sa.event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """SQLite: enforce foreign keys and let readers work while one writer commits."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across crashes, not power loss
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()


#: a pooled connection idle longer than this is tested before use
PING_IDLE_SECONDS = 5.0


@sa.event.listens_for(Engine, "checkin")
def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["sb_checked_in"] = time.monotonic()


@sa.event.listens_for(Engine, "checkout")
def _ping_idle_connection(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    """Pessimistic disconnect handling for idle connections only (a database restart, a proxy's
    idle timeout): a busy server does not pay a ping per request as with `pool_pre_ping`. A
    dead connection raises DisconnectionError, and the pool retries with a fresh one."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        return
    idle_since = record.info.get("sb_checked_in")
    if idle_since is None or time.monotonic() - idle_since < PING_IDLE_SECONDS:
        return
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
        dbapi_connection.rollback()
    except Exception as exc:
        raise sa.exc.DisconnectionError(str(exc)) from exc


@sa.event.listens_for(Engine, "commit")
def _note_commit(_conn: Any) -> None:
    """A COMMIT goes out: the request's writes may be kept from here on (see `write_sent`)."""
    if has_request_context():
        g.sb_write_sent = True


def write_sent() -> bool:
    """Whether this request may have written anything: a COMMIT went out, or a hand-written
    statement on an autocommit connection. When the database then fails, the request cannot
    say that nothing changed."""
    return bool(g.get("sb_write_sent"))


def delete_in_batches(ids: sa.Select[Any], *columns: Any, batch: int = 1000) -> int:
    """Delete the rows whose ids `ids` selects, `batch` at a time, each batch its own
    transaction (a large backlog never holds one long one). `columns` name what goes for those
    ids, children first: e.g. `EventMatch.event_id, WebhookEvent.id`."""
    deleted = 0
    while True:
        found = list(db.session.scalars(ids.limit(batch)))
        if not found:
            return deleted
        for column in columns:
            db.session.execute(sa.delete(column.class_).where(column.in_(found)))
        db.session.commit()
        deleted += len(found)


def after_commit(callback: Callable[[], None]) -> None:
    """Run `callback` once the current transaction commits (dropped if it rolls back).

    For side effects that must not be seen before the data they refer to: enqueueing a job for a
    run row that a worker could otherwise look up before it exists.
    """
    db.session.info.setdefault("sb_after_commit", []).append(callback)


@sa.event.listens_for(sa.orm.Session, "after_commit")
def _run_after_commit(session: sa.orm.Session) -> None:
    callbacks = session.info.pop("sb_after_commit", [])
    if not callbacks:
        return
    from app.runs import live

    with live.batched():  # the transaction's notifications leave in one round trip
        for callback in callbacks:
            try:
                callback()
            except Exception:  # the data is committed; the maintenance sweep repairs what's missed
                import logging

                logging.getLogger(__name__).exception("after-commit callback failed")


@sa.event.listens_for(sa.orm.Session, "after_rollback")
def _drop_after_commit(session: sa.orm.Session) -> None:
    session.info.pop("sb_after_commit", None)


class Api(flask_smorest.Api):
    """Our API: problem+json instead of flask-smorest's default error payload."""

    ERROR_SCHEMA = ProblemSchema

    def _register_responses(self) -> None:
        """Document every error response as application/problem+json."""
        self.DEFAULT_RESPONSE_CONTENT_TYPE = "application/problem+json"
        try:
            super()._register_responses()  # type: ignore[misc]
        finally:
            del self.DEFAULT_RESPONSE_CONTENT_TYPE

    def handle_http_exception(self, error):  # type: ignore[override]
        from app.errors import http_error

        return http_error(error)


class Blueprint(flask_smorest.Blueprint):
    """One place to customise every blueprint of the API."""

    ARGUMENTS_PARSER = RequestParser()


class Schema(ma.Schema):
    """Request bodies reject unknown fields, so a typo is a 422 and never silently ignored."""

    class Meta:
        unknown = ma.RAISE


class QuerySchema(ma.Schema):
    """Query strings ignore unknown parameters (caches, cache-busters, tracking tags)."""

    class Meta:
        unknown = ma.EXCLUDE


api = Api()


def _principal_key() -> str:
    from app.auth.guard import rate_limit_key

    return rate_limit_key()


def _read_limit() -> str:
    return current_app.config["SWITCHBOARD_RATE_LIMIT_READ"]


def _write_limit() -> str:
    return current_app.config["SWITCHBOARD_RATE_LIMIT_WRITE"]


def _exempt_from_limits() -> bool:
    from app.requests import is_webhook_receiver

    return is_webhook_receiver()


RATE_LIMIT_PREFIX = "sb-rl"
limiter = Limiter(
    _principal_key,
    application_limits=[
        ApplicationLimit(
            _read_limit, scope="read", methods=["GET", "HEAD"], exempt_when=_exempt_from_limits
        ),
        ApplicationLimit(
            _write_limit,
            scope="write",
            methods=["POST", "PUT", "PATCH", "DELETE"],
            exempt_when=_exempt_from_limits,
        ),
    ],
    # RateLimit-* headers are written by app.requests (IETF names, reset in seconds)
    headers_enabled=False,
    strategy="moving-window",
    in_memory_fallback_enabled=True,
    swallow_errors=True,
    key_prefix=RATE_LIMIT_PREFIX,
)


def hit_write_limit(principal_key: str) -> tuple[int, int, int] | None:
    """Count one write against `principal_key`'s write limit exactly as the limiter's application
    limit does (same storage keys), for a path that answers before Flask: (limit, remaining,
    reset_at), or None when the limit is used up (the Flask view then answers the 429)."""
    from limits import parse

    item = parse(_write_limit())
    args = (RATE_LIMIT_PREFIX, principal_key, "write")
    if not limiter.limiter.hit(item, *args):
        return None
    reset, remaining = limiter.limiter.get_window_stats(item, *args)
    return item.amount, remaining, int(reset + 1)


def limiter_storage_uri(redis_url: str) -> str:
    """The `limits` library spells a Unix socket `redis+unix://`."""
    if redis_url.startswith("unix://"):
        return "redis+unix://" + redis_url[len("unix://") :]
    return redis_url


class KeptConnection:
    """One pooled connection that a single-threaded process (a worker) keeps in autocommit mode
    for its hand-written statements, instead of a pool checkout, an autocommit switch and a
    check-in around each one (a tenth of a worker's CPU for a short run). After
    `PING_IDLE_SECONDS` unused it goes back to the pool and the next use checks one out, which
    the pool tests as it tests any idle connection."""

    def __init__(self) -> None:
        self.conn: Any = None
        self.used_at = 0.0

    @contextlib.contextmanager
    def use(self) -> Iterator[Any]:
        from psycopg.pq import TransactionStatus

        if self.conn is not None and time.monotonic() - self.used_at > PING_IDLE_SECONDS:
            self.release()
        if self.conn is None:
            self.conn = db.engine.raw_connection()
            self.conn.driver_connection.autocommit = True
        driver = self.conn.driver_connection
        try:
            yield driver
        except BaseException:
            if driver.info.transaction_status != TransactionStatus.IDLE:
                conn, self.conn = self.conn, None
                _discard(conn, driver)
            raise
        finally:
            self.used_at = time.monotonic()

    def release(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.driver_connection.autocommit = False
            info = conn.info
            conn.close()
            info["sb_checked_in"] = self.used_at  # idle since its last use: the pool tests it


_kept: ContextVar[KeptConnection | None] = ContextVar("sb_kept_connection", default=None)


def keep_autocommit_connection() -> KeptConnection:
    """From now on in this thread, `autocommit()` hands out one kept connection (see
    `KeptConnection`). For single-threaded processes only."""
    kept = KeptConnection()
    _kept.set(kept)
    return kept


@contextlib.contextmanager
def autocommit() -> Iterator[Any]:
    """A pooled connection's psycopg connection in autocommit mode, for the hand-written hot
    paths (PostgreSQL): each statement is its own transaction, without BEGIN and COMMIT round
    trips, or the caller sends its own. A connection that an error left inside a transaction
    (or broken) is discarded, not put back."""
    from psycopg.pq import TransactionStatus

    kept = _kept.get()
    if kept is not None:
        with kept.use() as driver:
            yield driver
        return
    conn = db.engine.raw_connection()
    if has_request_context():
        g.sb_write_sent = True  # from here on, each statement commits itself
    driver = conn.driver_connection
    driver.autocommit = True
    try:
        yield driver
    except BaseException:
        if driver.info.transaction_status != TransactionStatus.IDLE:
            _discard(conn, driver)
            raise
        driver.autocommit = False
        conn.close()
        raise
    driver.autocommit = False
    conn.close()


def _discard(conn: Any, driver: Any) -> None:
    """Not put back: a connection an error left inside a transaction, or broken. A broken one
    says the server may have gone (a restart kills every connection): the pool's others go too,
    as SQLAlchemy does when its own statements meet a disconnect, so the next checkout, the
    view's included, gets a working one instead of the next dead one."""
    broken = driver.broken
    conn.invalidate()
    if broken:
        db.engine.dispose()  # idle ones closed now, those in use when they come back


def database_unavailable(exc: BaseException) -> bool:
    """The database could not be reached or dropped the connection (a restart, a failover, a
    lock it gave up waiting for): worth trying again shortly, unlike an error in what was
    asked. A commit cut off in flight may have been kept: what is tried again must be safe to
    repeat."""
    import sqlite3

    import psycopg

    orig = getattr(exc, "orig", None) or exc
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(orig, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    if isinstance(orig, sqlite3.OperationalError):
        return "locked" in str(orig) or "busy" in str(orig)
    return False


def lock_rows(column: Any, *where: Any) -> None:
    """Lock the rows `where` selects until the transaction ends, so that a count or check made
    next cannot be made at the same moment by another request: PostgreSQL, FOR UPDATE; SQLite,
    which has no row locks, the database's write lock, taken by a write that changes nothing
    (`column` set to itself)."""
    if on_postgresql():
        db.session.execute(sa.select(column).where(*where).with_for_update()).all()
    else:
        db.session.execute(
            sa.update(column.class_).where(*where).values({column.key: column}),
            execution_options={"synchronize_session": False},
        )


def on_postgresql() -> bool:
    """The paths written for PostgreSQL alone (data-modifying WITH, row locks) ask this."""
    return db.engine.dialect.name == "postgresql"


def get_redis() -> redis.Redis:
    """The app's Redis client (one connection pool per process)."""
    client = current_app.extensions.get("switchboard_redis")
    if client is None:
        client = redis.Redis.from_url(
            current_app.config["SWITCHBOARD_REDIS_URL"],
            socket_connect_timeout=5,
            socket_timeout=30,
            health_check_interval=30,
        )
        current_app.extensions["switchboard_redis"] = client
    return client


def get_queue(name: str) -> Queue:
    queues: dict[str, Queue] = current_app.extensions.setdefault("switchboard_queues", {})
    if name not in queues:
        if name not in ALL_QUEUES:
            raise KeyError(f"unknown queue {name!r}")
        queues[name] = Queue(name, connection=get_redis())
    return queues[name]


def init_extensions(app: Flask) -> None:
    db.init_app(app)
    migrate.init_app(app, db, directory=str(_migrations_dir()), compare_type=True)
    app.config.setdefault(
        "RATELIMIT_STORAGE_URI", limiter_storage_uri(app.config["SWITCHBOARD_REDIS_URL"])
    )
    app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {"socket_connect_timeout": 2})
    limiter.init_app(app)
    sock.init_app(app)


def _migrations_dir():
    from app.config import PROJECT_ROOT

    return PROJECT_ROOT / "migrations"
