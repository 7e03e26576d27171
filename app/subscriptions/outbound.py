"""Sending one delivery over HTTP(S), refusing targets a server should not reach (SSRF).

The target's addresses are resolved and checked, then the connection goes to the checked address
(TLS still verifies the hostname), so a DNS answer that changes between check and connect
cannot point a delivery at loopback, the private network or a cloud metadata service. Redirects
are not followed.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.netguard import Network, Refused, check_host, resolve

#: how much of a response we read (its body is only kept as an error hint)
READ_LIMIT = 64 * 1024


@dataclass
class Result:
    status: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _split(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise Refused("only http:// and https:// URLs are delivered to")
    if not parts.hostname:
        raise Refused("the URL has no host")
    if parts.username or parts.password:
        raise Refused("credentials in the URL are not supported; use the signature")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, path


def for_audit(url: str) -> str:
    """The URL as the audit log keeps it: its origin only. Paths and queries of webhook URLs are
    often the secret (`hooks.slack.com/services/T…/B…/X…`, `?token=`)."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.hostname or ''}"
    with contextlib.suppress(ValueError):
        if parts.port:
            origin += f":{parts.port}"
    rest = (parts.path or "").strip("/") or parts.query
    return origin + ("/…" if rest else "")


def check_url(url: str, allowed: Sequence[Network]) -> None:
    """For saving a subscription: the URL's form, and its addresses if they resolve now (they
    are checked again on every delivery)."""
    _scheme, host, port, _path = _split(url)
    check_host(host, port, allowed)


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    allowed: Sequence[Network],
) -> Result:
    """One POST; never raises: what went wrong is in `Result.error`."""
    started = time.monotonic()

    def done(status: int | None, error: str | None) -> Result:
        return Result(status, error, int((time.monotonic() - started) * 1000))

    try:
        scheme, host, port, path = _split(url)
        address = resolve(host, port, allowed)[0]
    except Refused as exc:
        return done(None, f"refused: {exc}")
    except OSError as exc:
        return done(None, f"cannot resolve {url}: {exc}")
    kind = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    conn = kind(host, port, str(address), timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        text = response.read(READ_LIMIT)
        if 200 <= response.status < 300:
            return done(response.status, None)
        hint = text[:300].decode("utf-8", "replace").strip()
        return done(response.status, f"HTTP {response.status}" + (f": {hint}" if hint else ""))
    except (OSError, http.client.HTTPException) as exc:
        return done(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        conn.close()
