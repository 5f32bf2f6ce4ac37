"""Slow and idle clients (RELIABILITY row 42) against the real `rankserve serve` (uvicorn): a request head
sent a byte at a time, a connection that sends nothing, a body that stops arriving, and more connections
than --limit-concurrency. Each is cut off or refused; the server keeps answering everyone else."""

from __future__ import annotations

import socket
import time

import pytest

from tests.util_server import LiveServer


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with LiveServer(tmp_path_factory.mktemp("slow"), "tiny-llama", "--header-timeout", "1", "--body-timeout", "1",
                    "--limit-concurrency", "6") as srv:
        yield srv


def connect(srv: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closes the connection (recv returns b'' or an error), or None."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return time.monotonic() - start
    except TimeoutError:
        return None
    except OSError:
        return time.monotonic() - start


def read_until(sock: socket.socket, marker: bytes, timeout: float = 5.0) -> bytes:
    """What the server sends until ``marker`` appears or it closes the connection."""
    sock.settimeout(timeout)
    reply = b""
    while marker not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    return reply


def test_a_connection_that_sends_nothing_is_closed(live):
    with connect(live) as s:
        assert closed_within(s, 5) is not None


def test_a_head_sent_a_byte_at_a_time_is_cut_off(live):
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with connect(live) as s:
        start = time.monotonic()
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - start > 6:
                    break
        except OSError:
            pass  # the server closed the connection mid-head
        took = closed_within(s, 3)
        assert took is not None and time.monotonic() - start < 6
    with live.client() as c:
        assert c.get("/health").status_code == 200


def test_a_body_that_stops_arriving_is_408(live):
    with connect(live) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": \"tiny-llama\", ")
        reply = read_until(s, b"--body-timeout")
        assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply


def test_connections_beyond_the_limit_are_refused_and_the_server_recovers(live):
    held = [connect(live) for _ in range(5)]  # with the next client's: the limit of 6 connections
    try:
        for s in held:  # each holds a request open: its body never completes within the second
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
        time.sleep(0.2)
        with live.client() as c:
            assert c.get("/v1/models").status_code == 503
    finally:
        for s in held:
            s.close()
    time.sleep(1.5)
    with live.client() as c:
        assert c.get("/v1/models").status_code == 200


def test_an_upload_that_stalls_is_408_and_leaves_no_spool(live):
    boundary = b"BOUNDARY"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="adapter_id"\r\n\r\nstalled\r\n'
            b"--" + boundary + b'\r\nContent-Disposition: form-data; name="files"; filename="a.safetensors"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + b"\x00" * 4096)
    with connect(live) as s:
        s.sendall(b"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=" + boundary
                  + b"\r\nContent-Length: 1000000\r\n\r\n" + head)
        reply = read_until(s, b"--body-timeout")
        assert reply.startswith(b"HTTP/1.1 408") and b"stalled" in reply
    spool = live.store / "tmp"
    assert not spool.exists() or not any(spool.iterdir())
    with live.client() as c:
        assert c.get("/v1/adapters/stalled").status_code == 404
