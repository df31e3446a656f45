"""The HTTP layer's answers to what a client sends outside the API (hEG): a percent-encoded path separator is refused
before routing (it reached the repository API past a gateway's prefix rule), with the path logged as it was sent.
A real repository server of tests/fake_runtime.py."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator

import fake_runtime
import httpx
import pytest
from test_repository_lifecycle import CONFIG, NAME, add_version
from test_serve_fixtures import start_server

from serve.launch import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("protocol")
    repo = tmp / "repo"
    add_version(repo, NAME, "1")
    (repo / NAME / "config.pbtxt").write_text(CONFIG)
    with start_server(["--model-repository", str(repo)], tmp / "server.log", fake_runtime.server_env(tmp)) as s:
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
