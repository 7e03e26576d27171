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
