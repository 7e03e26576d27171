"""The database: the SQLAlchemy object and the rules every connection follows (SQLite's
pragmas, idle connections tested before use, writes noted for honest 503s), work that waits for
a commit, autocommit connections for the hand-written fast paths, and the database's failures
told apart from refusals."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import sqlalchemy as sa
import sqlalchemy.orm
from flask import g, has_request_context
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from app.live import pubsub

log = logging.getLogger(__name__)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class _SQLAlchemy(SQLAlchemy):
    def _teardown_session(self, exc: BaseException | None) -> None:
        remove_session()


#: Objects stay readable after commit without a reload query; code that needs the database's
#: current values (another process may have changed them) refreshes explicitly.
db = _SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})

_teardown_failures = 0


def remove_session() -> None:
    """End the current session, whatever its connection's state. When the database dropped the
    connection, the ROLLBACK that closing sends fails: at a request's teardown that would escape
    Flask after the answer was made (and the server would send its own HTML 500 instead), in a
    worker it would end the process. The session is dropped either way; a lost connection is
    logged in a line (the first, then every hundredth), anything else with its traceback."""
    global _teardown_failures
    try:
        db.session.remove()
    except Exception as exc:
        with contextlib.suppress(Exception):
            db.session.registry.clear()  # never hand the broken session out again
        _teardown_failures += 1
        if not database_unavailable(exc):
            log.exception("ending a database session failed")
        elif _teardown_failures == 1 or _teardown_failures % 100 == 0:
            log.warning(
                "ending a database session failed: the connection was lost (%d so far): %s",
                _teardown_failures,
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )


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
    with pubsub.batched():  # the transaction's notifications leave in one round trip
        for callback in callbacks:
            try:
                callback()
            except Exception:  # the data is committed; the maintenance sweep repairs what's missed
                log.exception("after-commit callback failed")


@sa.event.listens_for(sa.orm.Session, "after_rollback")
def _drop_after_commit(session: sa.orm.Session) -> None:
    session.info.pop("sb_after_commit", None)


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


def as_loaded(session: Any, entity: type, fields: dict[str, Any]) -> Any:
    """An instance of `entity` as a query would have loaded it from `fields` (every column by
    attribute name): persistent in `session`, nothing pending, no query. For rows a fast path
    read by hand or a process remembers (`auth.cache`)."""
    known = session.identity_map.get(identity_key(entity, fields["id"]))
    if known is not None:  # the session had it already: bring it up to date
        for key, value in fields.items():
            set_committed_value(known, key, value)
        return known
    # as the ORM's loading makes one: no constructor, whose per-attribute events cost 4x more
    instance = entity.__mapper__.class_manager.new_instance()  # type: ignore[attr-defined]
    instance.__dict__.update(fields)
    make_transient_to_detached(instance)
    session.add(instance)
    return instance
