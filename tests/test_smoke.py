def test_health(client):
    r = client.get("/api/v1/health")
    assert r.status_code == 200 and r.get_json() == {"status": "ok"}


def test_login(client, admin):
    r = client.get("/api/v1/me", headers=admin.headers)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["username"] == "root"
