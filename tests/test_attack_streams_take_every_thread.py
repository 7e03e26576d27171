"""Security issue, item 7: streams cannot take every web thread. A web process serves at most
`SWITCHBOARD_STREAMS_PER_PROCESS` streams (three quarters of its threads by default); beyond, a
stream is 503 with Retry-After and the API goes on answering."""

from __future__ import annotations

import socket
import time
import urllib.request

import pytest
from helpers import wait_for
from servers import LiveServer


def _open_stream(port: int, token: str) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        f"GET /api/v1/stream HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


@pytest.fixture
def small_server(app, client):
    server = LiveServer(app, GUNICORN_THREADS="4")  # default cap: 3 streams
    yield server
    server.stop()
    print("---- web output ----\n" + server.output())


def test_attack_streams_take_every_web_thread(small_server, member):
    port = small_server.port
    held = []
    try:
        for _ in range(3):
            sock, head = _open_stream(port, member.access_token)
            assert head.startswith(b"HTTP/1.1 200"), head
            held.append(sock)
        sock, head = _open_stream(port, member.access_token)
        sock.close()
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"Retry-After: 5" in head and b"application/problem+json" in head
        started = time.monotonic()  # the API still answers, at once
        with urllib.request.urlopen(f"{small_server.url}/api/v1/health", timeout=5) as resp:
            assert resp.status == 200
        assert time.monotonic() - started < 4.0  # not held up by the streams
        held.pop().close()  # a stream ends: its slot is free again once the server notices

        def reopened() -> bool:
            sock, head = _open_stream(port, member.access_token)
            if head.startswith(b"HTTP/1.1 200"):
                held.append(sock)
                return True
            sock.close()
            return False

        wait_for(reopened, timeout=10, interval=0.5)
    finally:
        for sock in held:
            sock.close()


def test_the_process_cap_counts_streams_that_never_started(app, client, member, monkeypatch):
    from app.live.sse import process_streams

    monkeypatch.setitem(app.config, "SWITCHBOARD_STREAMS_PER_PROCESS", 1)
    before = process_streams.open
    first = client.get("/api/v1/stream", headers=member.headers, buffered=False)
    assert first.status_code == 200 and process_streams.open == before + 1
    second = client.get("/api/v1/stream", headers=member.headers, buffered=False)
    assert second.status_code == 503 and second.headers["Retry-After"] == "5"
    first.close()  # closed before its body was read: the slot comes back all the same
    assert process_streams.open == before
    third = client.get("/api/v1/stream", headers=member.headers, buffered=False)
    assert third.status_code == 200
    third.close()
