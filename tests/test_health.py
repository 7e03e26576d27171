"""Liveness, readiness (database and Redis) and version."""

import redis
from helpers import assert_problem

from app import __version__


def test_health_needs_nothing(client):
    resp = client.get("/api/v1/health")
    assert resp.status_code == 200 and resp.get_json() == {"status": "ok"}


def test_ready_checks_database_and_redis(client):
    resp = client.get("/api/v1/health/ready")
    assert resp.status_code == 200
    checks = resp.get_json()["checks"]
    assert checks["database"] == "ok" and checks["redis"] == "ok"
    assert checks["workspace"]["status"] == "ok"  # free space: test_isolation covers it


def test_ready_503_names_redis_when_it_is_down(client, app):
    real = app.extensions.get("switchboard_redis")
    # a real client to a port where nothing listens
    app.extensions["switchboard_redis"] = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.5
    )
    try:
        body = assert_problem(client.get("/api/v1/health/ready"), 503, "service_unavailable")
        assert body["checks"] == {"redis": "failed"}
        assert "redis" in body["detail"]
    finally:
        if real is None:
            app.extensions.pop("switchboard_redis")
        else:
            app.extensions["switchboard_redis"] = real


def test_version(client):
    body = client.get("/api/v1/version").get_json()
    assert body == {"version": __version__, "api": "v1"}
