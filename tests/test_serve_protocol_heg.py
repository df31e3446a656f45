"""The HTTP layer's answers to what a client sends outside the API (hEG): a percent-encoded path separator is refused
before routing (it reached the repository API past a gateway's prefix rule), with the path logged as it was sent; a
connection that sends nothing is closed silently at the keep-alive timeout (it got an unasked 408, which a pooling
client read as the answer to its next request, at the receive timeout); HTTP/2's connection preface (h2c, gRPC) is
answered 505 as other HTTP versions are, not a generic 400. A real repository server of tests/fake_runtime.py."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator

import fake_runtime
import httpx
import pytest
from test_repository_lifecycle import CONFIG, NAME, add_version
from test_serve_fixtures import start_server

from serve.launch import ServerProcess

KEEP_ALIVE_S, RECEIVE_S = 1, 3  # apart enough to tell which closed a connection


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("protocol")
    repo = tmp / "repo"
    add_version(repo, NAME, "1")
    (repo / NAME / "config.pbtxt").write_text(CONFIG)
    args = ["--model-repository", str(repo), "--keep-alive-s", str(KEEP_ALIVE_S), "--receive-timeout-s", str(RECEIVE_S)]
    with start_server(args, tmp / "server.log", fake_runtime.server_env(tmp)) as s:
        yield s
    assert "Traceback" not in s.logs()


def _exchange(port: int, request: bytes) -> bytes:
    """Everything the server sends back to `request` until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _refusals(server: ServerProcess) -> dict[str, float]:
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(r'vitc_protocol_refusals_total\{status="(\w+)"\} (\S+)', metrics)}


def _refused_lines(server: ServerProcess) -> list[dict]:
    lines = (json.loads(line) for line in server.logs().splitlines() if line.startswith("{"))
    return [e for e in lines if e.get("msg") == "refused"]


def test_an_encoded_path_separator_is_refused_before_routing_and_logged_as_sent(server):
    before = _refusals(server)["400"]
    paths = ["/v2%2Frepository%2Fmodels%2Ffake%2Funload", "/v2/repository/models/fake%2f/unload",
             "/v2%5Chealth/live", "/v2/health%5clive"]
    for path in paths:
        request = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        answer = _exchange(server.port, request.encode())
        assert _status(answer) == 400, answer
        assert "%2F, %5C" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"], answer
    # Nothing was unloaded, every refusal is counted and logged with the path as it was sent (not decoded).
    ready = httpx.post(server.url + "/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert [e["name"] for e in ready] == [NAME]
    assert _refusals(server)["400"] == before + len(paths)
    logged = [e["path"] for e in _refused_lines(server) if e["status"] == 400]
    assert set(paths) <= set(logged), logged
    # Other percent-encodings (a letter, a space, UTF-8) and an encoded '/' in the query are routed as before.
    for path, status in (("/v2/models/fa%6Be/ready", 200), ("/v2/health/live?x=a%2Fb", 200),
                         ("/v2/models/f%20ke/ready", 404), ("/v2/models/caf%C3%A9/ready", 404)):
        assert _status(_exchange(server.port, f"GET {path} HTTP/1.0\r\n\r\n".encode())) == status, path
    assert _refusals(server)["400"] == before + len(paths)


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """What the server sends on `sock` until it closes it, and the seconds that took."""
    start, out = time.monotonic(), b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        out += chunk
    return out, time.monotonic() - start


def test_a_connection_that_sends_nothing_is_closed_silently_at_the_keep_alive_timeout(server):
    before = _refusals(server)["408"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as partial:
        partial.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # a request begun: its headers' deadline
        answer, seconds = _until_closed(silent)
        assert answer == b"" and KEEP_ALIVE_S - 0.3 < seconds < RECEIVE_S - 0.5, (answer, seconds)
        answer, seconds = _until_closed(partial)
        assert _status(answer) == 408 and b"headers did not arrive" in answer, answer
    assert _refusals(server)["408"] == before + 1  # the silent close is no refusal
    # A connection idle before its first request is held as long as one kept alive between requests.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as kept:
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = kept.recv(65536)
        while not reply.endswith(b"}"):  # the head and the body may come in two segments
            reply += kept.recv(65536)
        assert _status(reply) == 200
        answer, seconds = _until_closed(kept)
        assert answer == b"" and KEEP_ALIVE_S - 0.3 < seconds < RECEIVE_S - 0.5, (answer, seconds)


def _reply(sock: socket.socket) -> bytes:
    """One small JSON answer read whole from `sock` (its head and body may come in two segments)."""
    reply = sock.recv(65536)
    while not reply.endswith(b"}"):
        reply += sock.recv(65536)
    return reply


def test_empty_lines_begin_no_request_and_leave_the_connection_idle(server):
    """A new connection that sent only CRLF got an unasked 408 at the receive timeout (RFC 9112 2.2: empty lines
    before a request line are ignored); now it is idle, new or kept alive, until a request's first byte."""
    before = _refusals(server)["408"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as fresh, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as kept, \
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as begun:
        fresh.sendall(b"\r\n")
        kept.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_reply(kept)) == 200
        kept.sendall(b"\r\n\n")  # after the answer: what a kept connection gets is the same
        begun.sendall(b"\r\n\r\nGET /v2/health/live HTTP/1.1\r\n")  # a request line: its headers' deadline runs
        for sock in (fresh, kept):
            answer, seconds = _until_closed(sock)
            assert answer == b"" and seconds < RECEIVE_S - 0.5, (answer, seconds)
        answer, _ = _until_closed(begun)
        assert _status(answer) == 408 and b"headers did not arrive" in answer, answer
    assert _refusals(server)["408"] == before + 1
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as late:  # empty lines, then a request
        late.sendall(b"\r\n")
        time.sleep(KEEP_ALIVE_S / 2)
        late.sendall(b"\r\nGET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _status(_reply(late)) == 200


def test_the_http2_preface_is_answered_505_once_and_closed(server):
    before = _refusals(server)["505"]
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # what a client sends right after the preface
    for sent in (preface, preface + settings_frame):
        answer = _exchange(server.port, sent)
        assert len(re.findall(rb"HTTP/1\.1 \d{3} ", answer)) == 1 and _status(answer) == 505, answer
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert "HTTP/2 is not supported" in error and "gRPC" in error, error
    assert _refusals(server)["505"] == before + 2
