"""Pipelining and chunked-body framing against a real server (raw sockets): a client that pipelines requests and
reads no answer holds a bounded amount of the server's memory, and a malformed chunked body is refused at once.

The backend is tests/fake_runtime.py (plugged in with VITC_RUNTIMES), so no runtime work slows the checks down.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from pathlib import Path

import fake_runtime
import pytest
from test_serve_fixtures import animal_pngs, fake_server

CLASSIFY = "/v1/models/fake/classify"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("pipelining") / "fake")


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _live(i: int) -> bytes:
    return f"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Request-Id: r{i}\r\n\r\n".encode()


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    return out


def test_a_client_that_pipelines_without_reading_holds_bounded_memory(bundle, tmp_path):
    """Thousands of small requests per read used to be parsed and queued at once (and more after every answer):
    one such connection grew the server by ~150 MB. Now a few are parsed ahead, and reading pauses."""
    with fake_server(bundle, tmp_path, "--receive-timeout-s", "30") as server:
        host, port = _address(server.url)
        pid = server.proc.pid
        # Legitimate pipelining still works: every answer, in order, on one connection.
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"".join(_live(i) for i in range(2000))
                     + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ids = re.findall(rb"x-request-id: r(\d+)", _read_all(sock))
        sock.close()
        assert [int(i) for i in ids] == list(range(2000))

        before = _rss_mb(pid)
        flood = socket.socket()
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # takes (almost) none of the answers
        flood.connect((host, port))
        flood.settimeout(1.0)
        blob = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 25_000  # 1 MiB
        sent, t0 = 0, time.monotonic()
        while sent < 64 << 20 and time.monotonic() - t0 < 20:
            try:
                sent += flood.send(blob)
            except TimeoutError:
                break  # the server stopped reading
        grown = _rss_mb(pid) - before
        flood.close()
        # Unbounded, the server read every byte sent and queued each request (about 1.5 KB of memory apiece).
        assert sent < 32 << 20 and grown < 16, (sent, grown)
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 200 ")
        sock.close()


def _chunked(head_extra: bytes = b"") -> bytes:
    return (f"POST {CLASSIFY} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n"
            ).encode() + head_extra + b"\r\n"


MALFORMED = {
    "bad chunk size": b"zz\r\n",
    "bad size after 900 KB": b"%x\r\n" % 900_000 + b"\0" * 900_000 + b"\r\nzz\r\n",
    "size of 2^64": b"10000000000000000\r\n",
    "size beyond 2^64": b"fffffffffffffffffff\r\nabc",
    "200 KB chunk extension": b"10;" + b"a" * 200_000,
    "endless trailer field": b"3\r\nabc\r\n0\r\nX-T: " + b"a" * 200_000,
}


def test_a_malformed_chunked_body_is_refused_at_once(bundle, tmp_path):
    """A bad chunk used to be held until the body deadline and then answered 408 (the client was told it was too
    slow although it had sent everything), holding its body's share of the budget all that time."""
    args = ("--receive-timeout-s", "30", "--max-body-bytes", str(1 << 20), "--max-buffered-bytes", str(1 << 20))
    with fake_server(bundle, tmp_path, *args) as server:
        host, port = _address(server.url)
        for name, body in MALFORMED.items():
            sock = socket.create_connection((host, port), timeout=10)
            t0 = time.monotonic()
            sock.sendall(_chunked() + body)
            answer = _read_all(sock)  # the server closes the connection after its answer
            took = time.monotonic() - t0
            sock.close()
            head, _, payload = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), (name, answer[:300])
            assert b"connection: close" in head.lower(), name
            assert "chunked body" in json.loads(payload)["error"], name
            assert took < 5, (name, took)
            # What it held of the 1 MiB budget is given back: a 900 KB body is read (and is not an image).
            sock = socket.create_connection((host, port), timeout=10)
            sock.sendall(f"POST {CLASSIFY} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: "
                         f"900000\r\nConnection: close\r\n\r\n".encode() + b"\0" * 900_000)
            assert _read_all(sock).startswith(b"HTTP/1.1 400 "), name
            sock.close()
        # A valid chunked upload is answered.
        png = animal_pngs(1)[0]
        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(_chunked(b"Connection: close\r\n") + b"%x;ext=1\r\n" % len(png) + png
                     + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 200 ")
        sock.close()


def test_a_chunked_body_broken_behind_pipelined_requests_is_answered_in_order(bundle, tmp_path):
    """The bad body of a request queued behind others: the earlier ones are answered, then its 400, then the
    connection closes; and a chunked upload whose stream breaks mid-way while the app reads it is not held."""
    with fake_server(bundle, tmp_path, "--receive-timeout-s", "30") as server:
        host, port = _address(server.url)
        sock = socket.create_connection((host, port), timeout=10)
        t0 = time.monotonic()
        sock.sendall(_live(0) + _live(1) + _chunked() + b"5\r\nabcde\r\nzz\r\n" + _live(2))
        answer = _read_all(sock)
        sock.close()
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200", b"400"], answer[:600]
        assert time.monotonic() - t0 < 5

        sock = socket.create_connection((host, port), timeout=10)
        sock.sendall(_chunked() + b"4\r\nabcd\r\n")
        time.sleep(0.3)  # the app is now waiting for more of the body

        def spoil() -> None:
            sock.sendall(b"-1\r\n")

        t0 = time.monotonic()
        threading.Thread(target=spoil).start()
        answer = _read_all(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400 ") and time.monotonic() - t0 < 5, answer[:300]
    logs = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    # Answered by the app: in its access log (and its metrics) as a 400, not a client that went away.
    statuses = [e.get("status") for e in logs if e.get("msg") == "request" and e.get("path") == CLASSIFY]
    assert statuses == [400, 400], statuses
