"""Settings from the environment, and the refusals that keep production safe."""

import pytest

from app.config import ConfigError, Settings, normalise_database_url


def test_production_refuses_to_start_without_a_secret_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHBOARD_ENV", "production")
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    settings = Settings.from_env()
    settings.INSTANCE_PATH = str(tmp_path)
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        settings.resolve()
    assert not (tmp_path / "secret_key").exists()


def test_production_refuses_a_short_secret_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SWITCHBOARD_ENV", "production")
    monkeypatch.setenv("SECRET_KEY", "short")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError):
        Settings.from_env().resolve()


def test_dev_secret_key_is_generated_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.delenv("SWITCHBOARD_ENV", raising=False)
    first = Settings(INSTANCE_PATH=str(tmp_path)).resolve().SECRET_KEY
    second = Settings(INSTANCE_PATH=str(tmp_path)).resolve().SECRET_KEY
    assert first == second and len(first) >= 32
    assert oct((tmp_path / "secret_key").stat().st_mode & 0o777) == "0o600"


def test_defaults_are_embedded(tmp_path):
    s = Settings(INSTANCE_PATH=str(tmp_path)).resolve()
    assert f"sqlite:///{tmp_path / 'switchboard.db'}" == s.DATABASE_URL
    assert f"unix://{tmp_path / 'redis.sock'}" == s.REDIS_URL


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("SWITCHBOARD_ACCESS_TOKEN_TTL", "60")
    monkeypatch.setenv("SWITCHBOARD_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("PORT", "9001")
    s = Settings.from_env()
    assert (s.ACCESS_TOKEN_TTL, s.MAX_BODY_BYTES, s.PORT) == (60, 2048, 9001)
    monkeypatch.setenv("PORT", "eighty")
    with pytest.raises(ConfigError, match="PORT"):
        Settings.from_env()


def test_unknown_env_name_refused(tmp_path):
    with pytest.raises(ConfigError):
        Settings(ENV="staging", INSTANCE_PATH=str(tmp_path)).resolve()


@pytest.mark.parametrize(
    "url,expected",
    [
        ("postgres://u:p@h/db", "postgresql+psycopg://u:p@h/db"),
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_database_url_normalised(url, expected):
    assert normalise_database_url(url) == expected
