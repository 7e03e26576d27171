"""Settings, read from the environment only (12-factor).

Every setting is one attribute of `Settings`; `Settings.from_env()` is the only place that reads
`os.environ`, and the README's configuration table lists the same names. Values are plain Python
types so tests can override any of them with `create_app({...})`.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from app.agents.registry import custom_agents


class ConfigError(RuntimeError):
    """A setting is missing or wrong: the server refuses to start rather than run insecurely."""


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from exc


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def normalise_database_url(url: str) -> str:
    """Heroku-style `postgres://` URLs and bare `postgresql://` both mean psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def instance_path() -> Path:
    """`SWITCHBOARD_INSTANCE_PATH`, else `instance/` under the working directory: never under the
    installed package (site-packages), which a deploy replaces and may not be writable."""
    return Path(os.environ.get("SWITCHBOARD_INSTANCE_PATH") or Path.cwd() / "instance").absolute()


def embedded_redis_socket(instance: Path) -> Path:
    """Where `switchboard dev` puts the embedded Redis when REDIS_URL is unset."""
    return instance / "redis.sock"


def private_file(path: Path) -> Path:
    """Create `path` (and its directory) readable by the server's user only, if missing: the
    SQLite database holds every credential's hash."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def fernet_key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def secrets_keys(raw: str) -> list[str]:
    """`SWITCHBOARD_SECRETS_KEY`: Fernet keys, comma-separated, newest first."""
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    for key in keys:
        try:
            if len(base64.urlsafe_b64decode(key.encode())) != 32:
                raise ValueError
        except (ValueError, TypeError):
            raise ValueError(
                "each key is 32 url-safe base64-encoded bytes (a Fernet key)"
            ) from None
    return keys


def dev_secret_key(
    instance: Path, name: str = "secret_key", make: Callable[[], str] | None = None
) -> str:
    """A development key generated once and kept under instance/ (mode 0600), so sessions and
    secrets survive restarts."""
    path = instance / name
    if path.exists():
        return path.read_text().strip()
    instance.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = make() if make else secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


@dataclass
class Settings:
    """Every setting Switchboard reads; the README's table documents each one."""

    #: development | production | testing. Production refuses insecure defaults.
    ENV: str = "development"
    #: Signs access JWTs. Generated once under instance/ outside production.
    SECRET_KEY: str = ""
    #: SQLAlchemy URL; `postgres://` is accepted. Default: SQLite file under instance/.
    DATABASE_URL: str = ""
    #: Redis URL (`redis://`, `rediss://` or `unix://`). Default: the embedded Redis socket.
    REDIS_URL: str = ""
    #: With a `rediss://` REDIS_URL: verify the server's certificate. `false` for a provider
    #: whose Redis presents a self-signed certificate (Heroku Redis); better, give its CA below.
    REDIS_TLS_VERIFY: bool = True
    #: With a `rediss://` REDIS_URL: a CA file (PEM) to verify the server's certificate with.
    REDIS_CA_FILE: str = ""
    #: Port gunicorn binds (`make run` binds 127.0.0.1:PORT).
    PORT: int = 8000
    #: Access JWT lifetime in seconds.
    ACCESS_TOKEN_TTL: int = 15 * 60
    #: Refresh token lifetime in seconds.
    REFRESH_TOKEN_TTL: int = 30 * 24 * 3600
    #: Largest request body accepted, in bytes (413 beyond).
    MAX_BODY_BYTES: int = 1024 * 1024
    #: Requests per principal for reads (GET/HEAD) across the API.
    RATE_LIMIT_READ: str = "1200/minute"
    #: Requests per principal for writes (POST/PUT/PATCH/DELETE) across the API.
    RATE_LIMIT_WRITE: str = "300/minute"
    #: Failed logins or bad credentials allowed per client IP.
    RATE_LIMIT_AUTH_FAILURES_IP: str = "20/minute"
    #: Failed logins allowed per account (username or email), whatever the IP.
    RATE_LIMIT_AUTH_FAILURES_USER: str = "10/15minutes"
    #: Turn rate limiting off entirely (not recommended).
    RATE_LIMIT_ENABLED: bool = True
    #: Trust this many proxies' X-Forwarded-For (0: use the socket peer address).
    TRUSTED_PROXIES: int = 0
    #: Issuer shown in authenticator apps for TOTP.
    TOTP_ISSUER: str = "Switchboard"
    #: Log level for the app's own loggers.
    LOG_LEVEL: str = "INFO"
    #: Bootstrap admin created on first start when no admin exists.
    ADMIN_USERNAME: str = ""
    ADMIN_PASSWORD: str = ""
    ADMIN_EMAIL: str = ""
    #: Worker processes `switchboard worker` runs (each executes one agent at a time).
    WORKER_PROCESSES: int = 4
    #: A run's lease: an executor that stops renewing it for this long loses the run.
    LEASE_SECONDS: int = 15
    #: How often an executor renews its lease.
    LEASE_RENEW_SECONDS: int = 5
    #: Seconds between the maintenance sweeps (expired leases, lost jobs, dispatch).
    SWEEP_INTERVAL: int = 5
    #: Seconds between TERM and KILL when a run is stopped or times out.
    STOP_GRACE_SECONDS: int = 10
    #: Default task timeout in seconds (0: none).
    DEFAULT_TIMEOUT_S: int = 3600
    #: Log batches are written when this old (milliseconds) or this large (bytes).
    LOG_FLUSH_MS: int = 100
    LOG_FLUSH_BYTES: int = 64 * 1024
    #: Where runs get their git worktrees and scratch directories (default: instance/workspaces).
    WORKSPACE_ROOT: str = ""
    #: Directories (comma-separated) under which a project's `workdir` may lie (default:
    #: WORKSPACE_ROOT/workdirs). The instance and workspace directories are never allowed.
    WORKDIR_ROOTS: str = ""
    #: Allow local paths and file:// as a project's repo_url (development and tests only).
    ALLOW_LOCAL_REPOS: bool = False
    #: Names of the server's environment variables an agent also gets (comma-separated, e.g.
    #: `ANTHROPIC_API_KEY,OPENAI_API_KEY`); nothing else of the server's environment reaches it.
    AGENT_ENV_PASSTHROUGH: str = ""
    #: Fernet keys (comma-separated, newest first) encrypting project secrets. Required in
    #: production; generated once under instance/ otherwise.
    SECRETS_KEY: str = ""
    #: The server's base URL as agents reach it (`SWITCHBOARD_URL` in an agent's environment).
    #: Default: http://127.0.0.1:PORT.
    PUBLIC_URL: str = ""
    #: auto | bwrap | none: run agents under bubblewrap (auto: when `bwrap` works).
    SANDBOX: str = "auto"
    #: Hours a finished run's worktree and home are kept (its branch stays in the cached clone).
    WORKSPACE_RETENTION_HOURS: int = 24
    #: Readiness warns when the workspace disk has less free space than this, in MB.
    WORKSPACE_MIN_FREE_MB: int = 1024
    #: Custom agents as JSON: {"name": {"command": [...], "stdin": true, "parser": "text"}}.
    AGENTS: str = ""
    #: Seconds between `:ping` comments on idle streams (and how fast a gone client is noticed).
    STREAM_PING_SECONDS: int = 15
    #: Concurrent streams one user may hold open (429 beyond).
    STREAM_CAP: int = 4
    #: Streams one web process serves at once (503 beyond), so that some of its threads always
    #: answer the API. 0: three quarters of GUNICORN_THREADS (12 of the default 16).
    STREAMS_PER_PROCESS: int = 0
    #: The `retry:` hint sent to EventSource clients, in milliseconds.
    STREAM_RETRY_MS: int = 3000
    #: Lifetime of a stream token (for EventSource, which cannot send headers), in seconds.
    STREAM_TOKEN_TTL: int = 60
    #: How long a process remembers a credential's user, token and project roles, in seconds
    #: (a change is announced to every process at once; 0: look them up on every request).
    AUTH_CACHE_SECONDS: int = 5
    #: Largest webhook delivery accepted, in bytes (GitHub's own cap is 25 MB).
    WEBHOOK_MAX_BODY_BYTES: int = 25 * 1024 * 1024
    #: Seconds to wait before each retry of a failed outbound delivery; one attempt more than
    #: entries in all, then the delivery is a dead letter.
    WEBHOOK_RETRY_SCHEDULE: str = "10,60,300,1800,7200"
    #: Seconds an outbound delivery may take (connect + response).
    WEBHOOK_TIMEOUT_S: int = 10
    #: SMTP server notifications are emailed through (`smtp://[user:password@]host[:port]`,
    #: `smtps://…`, `?starttls=1`); empty: no email
    SMTP_URL: str = ""
    SMTP_FROM: str = "switchboard@localhost"
    #: emails one user gets per hour at most; the rest are folded into the next one's digest
    NOTIFY_EMAILS_PER_HOUR: int = 20
    #: GitHub's REST API, where an approved run's pull request is opened (GitHub Enterprise:
    #: https://<host>/api/v3)
    GITHUB_API_URL: str = "https://api.github.com"
    #: Networks (CIDR, comma-separated) outbound deliveries may reach although they are loopback
    #: or private; empty refuses every non-public address (SSRF).
    WEBHOOK_ALLOWED_NETWORKS: str = ""
    #: Days that finished webhook events and outbound deliveries are kept (0: forever).
    WEBHOOK_RETENTION_DAYS: int = 30
    #: Where SQLite, the dev secret and the embedded Redis live.
    INSTANCE_PATH: str = field(default_factory=lambda: str(instance_path()))

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ.get
        d = cls()
        return cls(
            ENV=env("SWITCHBOARD_ENV", d.ENV).strip().lower(),
            SECRET_KEY=env("SECRET_KEY", ""),
            DATABASE_URL=env("DATABASE_URL", ""),
            REDIS_URL=env("REDIS_URL", ""),
            REDIS_TLS_VERIFY=_bool("SWITCHBOARD_REDIS_TLS_VERIFY", d.REDIS_TLS_VERIFY),
            REDIS_CA_FILE=env("SWITCHBOARD_REDIS_CA_FILE", ""),
            PORT=_int("PORT", d.PORT),
            ACCESS_TOKEN_TTL=_int("SWITCHBOARD_ACCESS_TOKEN_TTL", d.ACCESS_TOKEN_TTL),
            REFRESH_TOKEN_TTL=_int("SWITCHBOARD_REFRESH_TOKEN_TTL", d.REFRESH_TOKEN_TTL),
            MAX_BODY_BYTES=_int("SWITCHBOARD_MAX_BODY_BYTES", d.MAX_BODY_BYTES),
            RATE_LIMIT_READ=env("SWITCHBOARD_RATE_LIMIT_READ", d.RATE_LIMIT_READ),
            RATE_LIMIT_WRITE=env("SWITCHBOARD_RATE_LIMIT_WRITE", d.RATE_LIMIT_WRITE),
            RATE_LIMIT_AUTH_FAILURES_IP=env(
                "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_IP", d.RATE_LIMIT_AUTH_FAILURES_IP
            ),
            RATE_LIMIT_AUTH_FAILURES_USER=env(
                "SWITCHBOARD_RATE_LIMIT_AUTH_FAILURES_USER", d.RATE_LIMIT_AUTH_FAILURES_USER
            ),
            RATE_LIMIT_ENABLED=_bool("SWITCHBOARD_RATE_LIMIT_ENABLED", d.RATE_LIMIT_ENABLED),
            TRUSTED_PROXIES=_int("SWITCHBOARD_TRUSTED_PROXIES", d.TRUSTED_PROXIES),
            TOTP_ISSUER=env("SWITCHBOARD_TOTP_ISSUER", d.TOTP_ISSUER),
            LOG_LEVEL=env("SWITCHBOARD_LOG_LEVEL", d.LOG_LEVEL).upper(),
            ADMIN_USERNAME=env("SWITCHBOARD_ADMIN_USERNAME", ""),
            ADMIN_PASSWORD=env("SWITCHBOARD_ADMIN_PASSWORD", ""),
            ADMIN_EMAIL=env("SWITCHBOARD_ADMIN_EMAIL", ""),
            WORKER_PROCESSES=_int("SWITCHBOARD_WORKER_PROCESSES", d.WORKER_PROCESSES),
            LEASE_SECONDS=_int("SWITCHBOARD_LEASE_SECONDS", d.LEASE_SECONDS),
            LEASE_RENEW_SECONDS=_int("SWITCHBOARD_LEASE_RENEW_SECONDS", d.LEASE_RENEW_SECONDS),
            SWEEP_INTERVAL=_int("SWITCHBOARD_SWEEP_INTERVAL", d.SWEEP_INTERVAL),
            STOP_GRACE_SECONDS=_int("SWITCHBOARD_STOP_GRACE_SECONDS", d.STOP_GRACE_SECONDS),
            DEFAULT_TIMEOUT_S=_int("SWITCHBOARD_DEFAULT_TIMEOUT_S", d.DEFAULT_TIMEOUT_S),
            LOG_FLUSH_MS=_int("SWITCHBOARD_LOG_FLUSH_MS", d.LOG_FLUSH_MS),
            LOG_FLUSH_BYTES=_int("SWITCHBOARD_LOG_FLUSH_BYTES", d.LOG_FLUSH_BYTES),
            WORKSPACE_ROOT=env("SWITCHBOARD_WORKSPACE_ROOT", ""),
            AGENTS=env("SWITCHBOARD_AGENTS", ""),
            WORKDIR_ROOTS=env("SWITCHBOARD_WORKDIR_ROOTS", ""),
            ALLOW_LOCAL_REPOS=_bool("SWITCHBOARD_ALLOW_LOCAL_REPOS", d.ALLOW_LOCAL_REPOS),
            AGENT_ENV_PASSTHROUGH=env("SWITCHBOARD_AGENT_ENV_PASSTHROUGH", ""),
            SECRETS_KEY=env("SWITCHBOARD_SECRETS_KEY", ""),
            PUBLIC_URL=env("SWITCHBOARD_PUBLIC_URL", ""),
            SANDBOX=env("SWITCHBOARD_SANDBOX", d.SANDBOX).strip().lower(),
            WORKSPACE_RETENTION_HOURS=_int(
                "SWITCHBOARD_WORKSPACE_RETENTION_HOURS", d.WORKSPACE_RETENTION_HOURS
            ),
            WORKSPACE_MIN_FREE_MB=_int(
                "SWITCHBOARD_WORKSPACE_MIN_FREE_MB", d.WORKSPACE_MIN_FREE_MB
            ),
            STREAM_PING_SECONDS=_int("SWITCHBOARD_STREAM_PING_SECONDS", d.STREAM_PING_SECONDS),
            STREAM_CAP=_int("SWITCHBOARD_STREAM_CAP", d.STREAM_CAP),
            STREAMS_PER_PROCESS=_int(
                "SWITCHBOARD_STREAMS_PER_PROCESS", _int("GUNICORN_THREADS", 16) * 3 // 4
            ),
            STREAM_RETRY_MS=_int("SWITCHBOARD_STREAM_RETRY_MS", d.STREAM_RETRY_MS),
            STREAM_TOKEN_TTL=_int("SWITCHBOARD_STREAM_TOKEN_TTL", d.STREAM_TOKEN_TTL),
            AUTH_CACHE_SECONDS=_int("SWITCHBOARD_AUTH_CACHE_SECONDS", d.AUTH_CACHE_SECONDS),
            WEBHOOK_MAX_BODY_BYTES=_int(
                "SWITCHBOARD_WEBHOOK_MAX_BODY_BYTES", d.WEBHOOK_MAX_BODY_BYTES
            ),
            WEBHOOK_RETRY_SCHEDULE=env(
                "SWITCHBOARD_WEBHOOK_RETRY_SCHEDULE", d.WEBHOOK_RETRY_SCHEDULE
            ),
            WEBHOOK_TIMEOUT_S=_int("SWITCHBOARD_WEBHOOK_TIMEOUT_S", d.WEBHOOK_TIMEOUT_S),
            GITHUB_API_URL=env("SWITCHBOARD_GITHUB_API_URL", d.GITHUB_API_URL),
            SMTP_URL=env("SWITCHBOARD_SMTP_URL", d.SMTP_URL),
            SMTP_FROM=env("SWITCHBOARD_SMTP_FROM", d.SMTP_FROM),
            NOTIFY_EMAILS_PER_HOUR=_int(
                "SWITCHBOARD_NOTIFY_EMAILS_PER_HOUR", d.NOTIFY_EMAILS_PER_HOUR
            ),
            WEBHOOK_ALLOWED_NETWORKS=env("SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS", ""),
            WEBHOOK_RETENTION_DAYS=_int(
                "SWITCHBOARD_WEBHOOK_RETENTION_DAYS", d.WEBHOOK_RETENTION_DAYS
            ),
        )

    def resolve(self) -> Settings:
        """Fill derived defaults and refuse what production must not run with."""
        instance = Path(self.INSTANCE_PATH)
        if self.ENV not in ("development", "production", "testing"):
            raise ConfigError(
                f"SWITCHBOARD_ENV must be development, production or testing, got {self.ENV!r}"
            )
        if self.ENV == "production":
            if not self.SECRET_KEY or len(self.SECRET_KEY) < 32:
                raise ConfigError("SECRET_KEY (32+ characters) is required in production")
            if not self.REDIS_URL:
                raise ConfigError("REDIS_URL is required in production")
            if not self.SECRETS_KEY:
                raise ConfigError(
                    "SWITCHBOARD_SECRETS_KEY is required in production "
                    "(make one: switchboard secrets new-key)"
                )
        else:
            if not self.SECRET_KEY:
                self.SECRET_KEY = dev_secret_key(instance)
            if not self.SECRETS_KEY:
                self.SECRETS_KEY = dev_secret_key(instance, "secrets_key", fernet_key)
        if not self.DATABASE_URL:
            self.DATABASE_URL = f"sqlite:///{private_file(instance / 'switchboard.db')}"
        self.DATABASE_URL = normalise_database_url(self.DATABASE_URL)
        if not self.REDIS_URL:
            self.REDIS_URL = f"unix://{embedded_redis_socket(instance)}"
        self.REDIS_URL = redis_tls_url(self.REDIS_URL, self.REDIS_TLS_VERIFY, self.REDIS_CA_FILE)
        if not self.WORKSPACE_ROOT:
            self.WORKSPACE_ROOT = str(instance / "workspaces")
        if not self.WORKDIR_ROOTS:
            self.WORKDIR_ROOTS = str(Path(self.WORKSPACE_ROOT) / "workdirs")
        if not self.PUBLIC_URL:
            self.PUBLIC_URL = f"http://127.0.0.1:{self.PORT}"
        self.PUBLIC_URL = self.PUBLIC_URL.rstrip("/")
        if self.SANDBOX not in ("auto", "bwrap", "none"):
            raise ConfigError(
                f"SWITCHBOARD_SANDBOX must be auto, bwrap or none, got {self.SANDBOX!r}"
            )
        try:
            passthrough_names(self.AGENT_ENV_PASSTHROUGH)
        except ValueError as exc:
            raise ConfigError(f"SWITCHBOARD_AGENT_ENV_PASSTHROUGH is not valid: {exc}") from exc
        try:
            secrets_keys(self.SECRETS_KEY)
        except ValueError as exc:
            raise ConfigError(f"SWITCHBOARD_SECRETS_KEY is not valid: {exc}") from exc
        try:
            retry_schedule(self.WEBHOOK_RETRY_SCHEDULE)
        except ValueError as exc:
            raise ConfigError(f"SWITCHBOARD_WEBHOOK_RETRY_SCHEDULE is not valid: {exc}") from exc
        try:
            allowed_networks(self.WEBHOOK_ALLOWED_NETWORKS)
        except ValueError as exc:
            raise ConfigError(f"SWITCHBOARD_WEBHOOK_ALLOWED_NETWORKS is not valid: {exc}") from exc
        if self.AGENTS:
            try:
                custom_agents(self.AGENTS)
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"SWITCHBOARD_AGENTS is not valid: {exc}") from exc
        return self

    def flask_config(self) -> dict[str, object]:
        """The Flask/extension keys derived from our settings."""
        return {
            **{f"SWITCHBOARD_{k}": v for k, v in asdict(self).items()},
            "SECRET_KEY": self.SECRET_KEY,
            "SQLALCHEMY_DATABASE_URI": self.DATABASE_URL,
            "SQLALCHEMY_ENGINE_OPTIONS": engine_options(self.DATABASE_URL),
            "MAX_CONTENT_LENGTH": self.MAX_BODY_BYTES,
            "TESTING": self.ENV == "testing",
            "PROPAGATE_EXCEPTIONS": False,
            "JSON_SORT_KEYS": False,
            "RATELIMIT_ENABLED": self.RATE_LIMIT_ENABLED,
        }


def redis_tls_url(url: str, verify: bool, ca_file: str) -> str:
    """The TLS settings written into a `rediss://` URL, which every Redis client of ours (the
    app, the hub, the rate limiter, RQ) builds its connection from."""
    if not url.startswith("rediss://"):
        return url
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if ca_file:
        if not Path(ca_file).is_file():
            raise ConfigError(f"SWITCHBOARD_REDIS_CA_FILE {ca_file!r} is not a file")
        query.setdefault("ssl_ca_certs", ca_file)
    if not verify:
        query.setdefault("ssl_cert_reqs", "none")
    return urlunsplit(parts._replace(query=urlencode(query)))


def retry_schedule(raw: str) -> list[float]:
    """`"10,60,300"` -> [10.0, 60.0, 300.0]; empty means no retries."""
    delays = [float(part) for part in raw.split(",") if part.strip()]
    if any(d < 0 for d in delays):
        raise ValueError("delays must be zero or more seconds")
    return delays


def allowed_networks(raw: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip()
    ]


#: never passed to an agent, whatever SWITCHBOARD_AGENT_ENV_PASSTHROUGH says
NEVER_PASSED = frozenset({"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "SWITCHBOARD_ADMIN_PASSWORD"})


def passthrough_names(raw: str) -> list[str]:
    """`SWITCHBOARD_AGENT_ENV_PASSTHROUGH`, checked: the server's own credentials and
    Switchboard's variables are refused (ValueError)."""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for name in names:
        if name in NEVER_PASSED or name.startswith("SWITCHBOARD_"):
            raise ValueError(f"{name} is the server's own and never reaches an agent")
    return names


def workdir_roots(cfg: Mapping[str, Any]) -> list[str]:
    return [r.strip() for r in cfg["SWITCHBOARD_WORKDIR_ROOTS"].split(",") if r.strip()]


def protected_dirs(cfg: Mapping[str, Any]) -> list[str]:
    """The server's own directories: no project works in or over them."""
    return [cfg["SWITCHBOARD_INSTANCE_PATH"], cfg["SWITCHBOARD_WORKSPACE_ROOT"]]


def engine_options(url: str) -> dict[str, object]:
    if url.startswith("sqlite"):
        # Threads share the file; a busy writer makes others wait instead of failing at once.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    # no pool_pre_ping: it costs a round trip on every checkout; app.extensions pings only
    # connections that sat idle (see _ping_idle_connection)
    return {"pool_size": 10, "max_overflow": 20}
