"""Pooled PostgreSQL connections that died while idle (a database restart, a proxy's idle
timeout) are replaced before use, without a ping on every request."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.skipif(
    not os.environ.get("DATABASE_URL", "").startswith("postgres"),
    reason="needs DATABASE_URL pointing at PostgreSQL (CI's second pass)",
)


def test_a_connection_killed_while_idle_is_replaced(app, client, admin, monkeypatch):
    from app import extensions
    from app.extensions import db

    assert client.get("/api/v1/me", headers=admin.headers).status_code == 200
    with app.app_context():
        pids = {row[0] for row in db.session.execute(sa.text("SELECT pg_backend_pid()"))}
        db.session.remove()
        database = db.engine.url.database
        # what a restart does to every pooled connection of this test's database
        with sa.create_engine(
            db.engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT"
        ).connect() as admin_conn:
            killed = admin_conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            ).scalar()
    assert killed >= len(pids) >= 1
    monkeypatch.setattr(extensions, "PING_IDLE_SECONDS", 0.0)  # every pooled one counts as idle
    for _ in range(3):
        assert client.get("/api/v1/me", headers=admin.headers).status_code == 200


def test_a_kept_connection_is_reused_and_replaced_when_it_died_idle(app):
    """A worker keeps one connection for its hand-written statements (`KeptConnection`): the
    same connection serves use after use without the pool; an error inside a transaction
    discards it; and one whose server side died while it sat idle is replaced, not used."""
    import psycopg

    from app import extensions
    from app.extensions import db

    def backend(kept: extensions.KeptConnection) -> int:
        with kept.use() as driver:
            return driver.execute("SELECT pg_backend_pid()").fetchone()[0]

    with app.app_context():
        kept = extensions.KeptConnection()
        first = backend(kept)
        checked_out = db.engine.pool.checkedout()
        assert backend(kept) == first and db.engine.pool.checkedout() == checked_out

        with pytest.raises(psycopg.errors.DivisionByZero), kept.use() as driver:
            driver.execute("BEGIN")
            driver.execute("SELECT 1 / 0")
        second = backend(kept)
        assert second != first  # the spoiled one was discarded

        # the pool's other idle connections are taken, so it hands out the kept one next
        others = [db.engine.raw_connection() for _ in range(db.engine.pool.checkedin())]
        url = db.engine.url.set(drivername="postgresql")
        with psycopg.connect(url.render_as_string(hide_password=False), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (second,))
        # it sat idle: back to the pool, which tests it before handing it out again
        kept.used_at -= extensions.PING_IDLE_SECONDS + 1
        third = backend(kept)
        assert third not in (first, second)
        kept.release()
        for conn in others:
            conn.close()
