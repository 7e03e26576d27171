"""A hosted Redis over TLS (`rediss://`) whose certificate is self-signed, as Heroku Redis's is:
with `SWITCHBOARD_REDIS_TLS_VERIFY=false` or the provider's CA in `SWITCHBOARD_REDIS_CA_FILE`,
every Redis client of the app connects (queues, the streams' hub, the rate limiter); without
either, the certificate is refused."""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import free_port, wait_for

REDIS_SERVER = shutil.which("redis-server")


def _self_signed(where: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = where / "redis.crt", where / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_redis(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("needs a redis-server built with TLS (Debian's; CI has it)")
    cert, key = _self_signed(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port", "0",
            "--tls-port", str(port),
            "--bind", "127.0.0.1",
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no",
            "--save", "",
            "--appendonly", "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0"

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url, ssl_cert_reqs="none").ping())
        except redis.RedisError:
            return False

    try:
        wait_for(answers, timeout=10)
        yield url, cert
    finally:
        proc.kill()
        proc.wait()


def _app(tmp_path, url, **settings):
    from app import create_app

    return create_app(
        {
            "ENV": "testing",
            "SECRET_KEY": "test-secret-key-that-is-long-enough-for-hs256",
            "DATABASE_URL": f"sqlite:///{tmp_path / 'tls.db'}",
            "INSTANCE_PATH": str(tmp_path),
            "REDIS_URL": url,
            **settings,
        }
    )


@pytest.mark.parametrize("how", ["no verification", "the provider's CA"])
def test_rediss_with_a_self_signed_certificate_connects_every_client(tmp_path, tls_redis, how):
    from flask_migrate import upgrade

    from app.live.hub import hub
    from app.queues import get_redis

    url, cert = tls_redis
    settings = (
        {"REDIS_TLS_VERIFY": False} if how == "no verification" else {"REDIS_CA_FILE": str(cert)}
    )
    app = _app(tmp_path, url, **settings)
    with app.app_context():
        upgrade()
        assert get_redis().ping()
        sub = hub().subscribe(["sb:tls-check"])  # the hub's own connection, over TLS
        get_redis().publish("sb:tls-check", b"")
        sub.close()
    ready = app.test_client().get("/api/v1/health/ready")  # rate limiter + readiness on Redis
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["redis"] == "ok"


def test_rediss_refuses_an_unverified_certificate_by_default(tmp_path, tls_redis):
    from app.queues import get_redis

    url, _cert = tls_redis
    app = _app(tmp_path, url)
    with app.app_context(), pytest.raises(redis.ConnectionError, match="certificate verify"):
        get_redis().ping()


def test_a_missing_ca_file_is_a_one_line_start_up_error(tmp_path):
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="SWITCHBOARD_REDIS_CA_FILE"):
        _app(tmp_path, "rediss://127.0.0.1:6380/0", REDIS_CA_FILE=str(tmp_path / "nope.pem"))
