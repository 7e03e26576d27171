"""Migrations build the schema the models describe, on an empty SQLite and PostgreSQL database."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import drop_postgres_database, fresh_postgres_database

SWITCHBOARD = [str(Path(sys.executable).parent / "switchboard")]


def _cli(args, database_url, tmp_path):
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "SWITCHBOARD_INSTANCE_PATH": str(tmp_path),
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "SWITCHBOARD_ENV": "development",
    }
    return subprocess.run(
        [*SWITCHBOARD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )


def _upgrade_check_roundtrip(url, tmp_path):
    up = _cli(["db", "upgrade"], url, tmp_path)
    assert up.returncode == 0, up.stderr
    tables = set(sa.inspect(sa.create_engine(url)).get_table_names())
    assert {"users", "refresh_tokens", "personal_access_tokens", "audit_logs"} <= tables
    check = _cli(["db", "check"], url, tmp_path)  # models == migrations, or it fails
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    down = _cli(["db", "downgrade", "base"], url, tmp_path)
    assert down.returncode == 0, down.stderr
    assert set(sa.inspect(sa.create_engine(url)).get_table_names()) <= {"alembic_version"}
    again = _cli(["db", "upgrade"], url, tmp_path)
    assert again.returncode == 0, again.stderr


def test_empty_sqlite(tmp_path):
    _upgrade_check_roundtrip(f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path)


@pytest.mark.postgres
def test_empty_postgresql(tmp_path):
    name = f"sb_migr_{uuid.uuid4().hex[:10]}"
    url = fresh_postgres_database(os.environ["DATABASE_URL"], name)
    try:
        _upgrade_check_roundtrip(url, tmp_path)
    finally:
        drop_postgres_database(os.environ["DATABASE_URL"], name)
