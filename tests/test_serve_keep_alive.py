"""--keep-alive-s (VITC_KEEP_ALIVE_S): how long an idle keep-alive connection stays open. It was a fixed 15 s, so a
load balancer that keeps idle connections longer (AWS ALB 60 s, nginx upstream 60 s) sent requests on connections
the server had just closed: 502s, broken pipes. Real server processes of tests/fake_runtime.py."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import fake_runtime
import pytest
from test_serve_fixtures import fake_server, start_server

from serve.launch import ServerProcess

REQUEST = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("keep-alive") / "fake")


def _answer(sock: socket.socket) -> bytes:
    """One whole answer to REQUEST (headers and its Content-Length of body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(ln.split(b":", 1)[1]) for ln in head.lower().split(b"\r\n") if ln.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def _idle_until_closed(sock: socket.socket) -> float:
    """Seconds from now until the server closes the idle connection (EOF)."""
    start = time.monotonic()
    sock.settimeout(20)
    assert sock.recv(4096) == b""
    return time.monotonic() - start


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=20)
    sock.sendall(REQUEST)
    _answer(sock)
    return sock


def test_an_idle_connection_is_closed_after_the_flags_seconds(bundle, tmp_path):
    with fake_server(bundle, tmp_path, "--keep-alive-s", "1") as server, _connect(server) as sock:
        assert 0.8 < _idle_until_closed(sock) < 2.5  # was 15 s whatever was asked


def test_an_idle_connection_is_kept_until_the_variables_seconds(bundle, tmp_path):
    env = {**fake_runtime.server_env(tmp_path), "VITC_KEEP_ALIVE_S": "3"}
    with start_server(["--model", f"fake={bundle}", "--backend", "fake"], tmp_path / "server.log", env) as server, \
            _connect(server) as sock:
        time.sleep(1.5)  # longer than the 1 s above: still open, and the next request on it is answered
        sock.sendall(REQUEST)
        assert b"live" in _answer(sock)
        assert 2.6 < _idle_until_closed(sock) < 5.0  # counted from the last answer


@pytest.mark.parametrize("value", ["0", "0.5", "-1", "3601", "nan", "inf", "soon"])
@pytest.mark.parametrize("where", ["flag", "environment"])
def test_a_bad_keep_alive_is_refused_in_one_line(value, where, capsys, monkeypatch):
    from serve.__main__ import main

    args = ["--model", "nowhere"]
    if where == "flag":
        args += ["--keep-alive-s", value]
    else:
        monkeypatch.setenv("VITC_KEEP_ALIVE_S", value)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse refuses a flag that is not a number itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    if where == "flag" and value == "soon":
        assert err == "python -m serve: error: argument --keep-alive-s: invalid float value: 'soon'", err
    else:
        assert err.startswith("python -m serve: error: invalid setting --keep-alive-s (VITC_KEEP_ALIVE_S): "), err


def test_the_default_stays_15_s():
    from serve.settings import Settings

    assert Settings().keep_alive_s == 15.0
    assert Settings(keep_alive_s=1).keep_alive_s == 1.0 and Settings(keep_alive_s=3600).keep_alive_s == 3600.0
