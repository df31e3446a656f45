"""The first stop signal closes connections at once, a forced stop ends quietly, and the edges of `Expect` and of
oversized bodies: no `100 Continue` to HTTP/1.0, one `connection: close`, a 413 decided from Content-Length alone.

The protocol checks run in process (serve.httpproto with serve.shutdown's server, no event-loop tick in between);
the rest on real `python -m serve` processes of tests/fake_runtime.py."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import fake_runtime
import pytest
import uvicorn
from test_serve_fixtures import fake_server

from serve.http_limits import ConnectionLimits
from serve.httpproto import HeaderBoundsProtocol
from serve.shutdown import CONNECTION_CLOSE, DelayedShutdownServer

V2 = "/v2/models/fake/infer"


# In process: the protocol and the server class, driven without uvicorn's main loop (so no tick runs).

async def _app(scope, receive, send) -> None:
    """200 `ok`; /slow answers once `scope["state"]["release"]` is set; /body reads the body first."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await scope["state"]["release"].wait()
    if scope["path"] == "/body":
        while (await receive()).get("more_body"):
            pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _start(close_connections: bool = True) -> tuple[DelayedShutdownServer, asyncio.AbstractServer, int]:
    """A started DelayedShutdownServer (30 s delay) whose connections use a configured HeaderBoundsProtocol."""
    protocol = HeaderBoundsProtocol.configured(ConnectionLimits(5.0), access_log=False)
    config = uvicorn.Config(_app, http=protocol, log_config=None, access_log=False, lifespan="off")
    config.load()
    state = type("State", (), {})()
    state.ready, state.metrics = True, type("Metrics", (), {"serving": True})()
    server = DelayedShutdownServer(config, state, 30.0, protocol.close_after_answers if close_connections else None)
    server.started = True
    app_state = {"release": asyncio.Event()}
    listener = await asyncio.get_running_loop().create_server(
        lambda: protocol(config=config, server_state=server.server_state, app_state=app_state), "127.0.0.1", 0)
    server.release = app_state["release"]  # type: ignore[attr-defined]
    return server, listener, listener.sockets[0].getsockname()[1]


async def _response(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[str, str]]]:
    """One response: its status line and its headers as a list (a repeated header shows twice)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = [(k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines)]
    await asyncio.wait_for(reader.readexactly(int(dict(headers).get("content-length", 0))), 5)
    return status.encode(), headers


async def _eof(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 2) == b""
    except (TimeoutError, ConnectionError):
        return False


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def test_the_first_signal_closes_every_later_answer_at_once():
    """Before, `Connection: close` came with uvicorn's next tick (up to 0.1 s later): an answer in between, to a
    kept-alive connection or to a request in progress, left its connection open, for the drain to close it under
    the client."""

    async def main() -> None:
        server, listener, port = await _start()
        idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
        idle_w.write(GET)
        _, headers = await _response(idle_r)
        assert ("connection", "close") not in headers  # kept alive before the signal
        busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
        busy_w.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)  # its answer is in progress when the signal comes
        server.handle_exit(signal.SIGTERM, None)
        assert not server.app_state.ready and not server.should_exit
        idle_w.write(GET)  # the kept-alive connection's next request
        status, headers = await _response(idle_r)
        assert status.startswith(b"HTTP/1.1 200") and [h for h in headers if h[0] == "connection"] == [
            ("connection", "close")], headers
        assert await _eof(idle_r)
        server.release.set()
        status, headers = await _response(busy_r)
        assert status.startswith(b"HTTP/1.1 200") and ("connection", "close") in headers, headers
        assert await _eof(busy_r)
        fresh_r, fresh_w = await asyncio.open_connection("127.0.0.1", port)  # the port still answers
        fresh_w.write(GET)
        assert ("connection", "close") in (await _response(fresh_r))[1]
        for w in (idle_w, busy_w, fresh_w):
            w.close()
        listener.close()

    asyncio.run(main())


def test_without_the_protocol_switch_the_default_header_is_set_by_the_signal_itself():
    """A protocol other than HeaderBoundsProtocol: the default `connection: close` header, set by the signal's
    handler too (it was set by the next tick only)."""

    async def main() -> DelayedShutdownServer:
        server, listener, _ = await _start(close_connections=False)
        listener.close()
        return server

    server = asyncio.run(main())
    server.handle_exit(signal.SIGTERM, None)
    assert CONNECTION_CLOSE in server.server_state.default_headers  # no tick ran


async def _exchange(port: int, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Send `head`, what the server sent within 0.5 s, then `body`, and what it sent until it closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    try:
        early = await asyncio.wait_for(reader.read(65536), 0.5)
    except TimeoutError:
        early = b""
    writer.write(body)
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return early, rest


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_100_continue_goes_to_http11_only(version):
    """RFC 9110 10.1.1 and 15.2: an HTTP/1.0 request's `Expect: 100-continue` is ignored and no 1xx goes to an
    HTTP/1.0 client, which would take it for the answer (it was sent as to HTTP/1.1)."""

    async def main() -> None:
        _, listener, port = await _start()
        head = (f"POST /body HTTP/{version}\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n"
                "Connection: close\r\n\r\n").encode()
        early, rest = await _exchange(port, head, b"data")
        listener.close()
        if version == "1.0":
            assert early == b"" and rest.startswith(b"HTTP/1.1 200 ") and b"100 Continue" not in rest, (early, rest)
        else:
            assert early == b"HTTP/1.1 100 Continue\r\n\r\n" and rest.startswith(b"HTTP/1.1 200 "), (early, rest)

    asyncio.run(main())


# Real servers.

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("stop-expect") / "fake")


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_answer(sock: socket.socket) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers (a list: a repeated header shows twice) and body of one Content-Length framed answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines)]
    while len(body) < int(dict(headers)["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "closed inside the body"
        body += chunk
    return int(status.split()[1]), headers, body


def _closed(sock: socket.socket, within: float = 5.0) -> bytes | None:
    """What the server sent before closing within `within` seconds (None if it kept the connection open)."""
    sock.settimeout(within)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return data


def _post(length: int, extra: str = "", version: str = "1.1", path: str = V2) -> bytes:
    return f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Length: {length}\r\n{extra}\r\n".encode()


LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def test_expect_and_oversized_bodies_on_a_real_server(bundle, tmp_path):
    limit = 100_000
    with fake_server(bundle, tmp_path, "--max-body-bytes", str(limit), "--receive-timeout-s", "3",
                     "--keep-alive-s", "1") as server:
        port = server.port
        # HTTP/1.0 with `Expect: 100-continue`: no `100 Continue` (it was sent, and the client took it for the answer).
        sock = _connect(port)
        sock.sendall(_post(len(fake_runtime.request_body(1.0)), "Expect: 100-continue\r\n", version="1.0"))
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.sendall(fake_runtime.request_body(1.0))
        sock.settimeout(10)
        status, headers, _ = _read_answer(sock)
        assert status == 200 and ("connection", "close") in headers
        sock.close()
        # A 413 to `Expect: 100-continue` says `connection: close` once (it said it twice), on /v2 and /v1.
        for path in (V2, "/v1/models/fake/classify"):
            sock = _connect(port)
            t0 = time.monotonic()
            sock.sendall(_post(2 * limit, "Expect: 100-continue\r\nContent-Type: image/png\r\n", path=path))
            status, headers, _ = _read_answer(sock)
            assert status == 413 and time.monotonic() - t0 < 2
            assert [h for h in headers if h[0] == "connection"] == [("connection", "close")], headers
            assert _closed(sock) == b""
            sock.close()
        # Content-Length alone proves the body too large: 413 at once (it came after a fixed 5 s, past the 3 s
        # body deadline), on /v2 and /v1. The connection stays open: the body, if it comes, is read and dropped,
        # and the next request is answered.
        for path in (V2, "/v1/models/fake/classify"):
            sock = _connect(port)
            t0 = time.monotonic()
            sock.sendall(_post(2 * limit, "Content-Type: image/png\r\n", path=path))
            status, headers, body = _read_answer(sock)
            assert status == 413 and time.monotonic() - t0 < 1.5, (status, time.monotonic() - t0)
            assert "larger than the limit of 100000 bytes" in json.loads(body)["error"]
            assert [h for h in headers if h[0] == "connection"] == [], headers
            sock.sendall(b"\0" * (2 * limit) + LIVE)
            status, _, body = _read_answer(sock)
            assert status == 200 and json.loads(body) == {"live": True}
            sock.close()
        # A client that sends the whole oversized body before it reads gets the 413, not a reset; once the body is
        # read the idle connection closes at the keep-alive timeout (1 s), not with a 408 at the body deadline (3 s).
        sock = _connect(port)
        sock.sendall(_post(2 * limit) + b"\0" * (2 * limit))
        t0 = time.monotonic()
        assert _read_answer(sock)[0] == 413
        assert _closed(sock) == b"" and time.monotonic() - t0 < 2.5
        sock.close()
        # HTTP/1.0 (closed after its answer): the body is read first, and a body that never comes is waited for no
        # longer than the body deadline.
        sock = _connect(port)
        sock.sendall(_post(2 * limit, version="1.0") + b"\0" * (2 * limit))
        status, headers, _ = _read_answer(sock)
        assert status == 413 and ("connection", "close") in headers
        sock.close()
        sock = _connect(port)
        t0 = time.monotonic()
        sock.sendall(_post(2 * limit, version="1.0"))
        assert _read_answer(sock)[0] == 413 and time.monotonic() - t0 < 3.8
        sock.close()
        # Past twice the limit: 413 and closed at once, as before.
        sock = _connect(port)
        sock.sendall(_post(3 * limit))
        status, headers, _ = _read_answer(sock)
        assert status == 413 and [h for h in headers if h[0] == "connection"] == [("connection", "close")]
        sock.close()


def test_a_request_right_after_the_signal_closes_its_kept_alive_connection(bundle, tmp_path):
    """The harness's `delay_immediately`: a request 20 ms after SIGTERM on a kept-alive connection was answered
    without `connection: close`, and the connection stayed open until the drain closed it."""
    with fake_server(bundle, tmp_path, "--shutdown-delay", "2", "--graceful-timeout-s", "5") as server:
        sock = _connect(server.port)
        sock.sendall(LIVE)
        assert _read_answer(sock)[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _read_answer(sock)
        assert status == 400 and json.loads(body) == {"ready": False}
        assert [h for h in headers if h[0] == "connection"] == [("connection", "close")], headers
        assert _closed(sock, 1.0) == b""
        sock.close()
        assert server.proc.wait(20) == 0


def test_a_forced_stop_logs_one_line_and_nothing_after_the_last(bundle, tmp_path):
    """The third Ctrl-C during --shutdown-delay (the second starts the drain, which waits for a stalled upload):
    it logged uvicorn's multi-line CancelledError traceback of the lifespan, and access and `stopped` lines after
    "Finished server process"."""
    with fake_server(bundle, tmp_path, "--shutdown-delay", "5", "--graceful-timeout-s", "20",
                     "--receive-timeout-s", "30") as server:
        upload = _connect(server.port)
        upload.sendall(_post(100_000) + b"\0" * 1000)  # stalled: the drain waits for it
        time.sleep(0.3)
        t0 = time.monotonic()
        for _ in range(3):
            server.proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
        assert server.proc.wait(10) == 0 and time.monotonic() - t0 < 5
        status, headers, body = _read_answer(upload)
        assert status == 503 and json.loads(body)["error"] == "the server is shutting down"
        upload.close()
    lines = [ln for ln in server.logs().splitlines() if ln.strip()]
    entries = [json.loads(ln) for ln in lines]  # every line is JSON
    assert not [e for e in entries if e["level"] in ("error", "critical") or "exc" in e], entries
    assert all("\n" not in str(e["msg"]) for e in entries)
    forced = [e for e in entries if e["msg"].startswith("forced exit")]
    assert len(forced) == 1 and forced[0]["level"] == "warning" and forced[0]["requests"] == 1, forced
    assert entries[-1]["msg"].startswith("Finished server process"), entries[-4:]
    msgs = [e["msg"] for e in entries]
    assert msgs.index(forced[0]["msg"]) < msgs.index("stopped")  # the models closed, before the last line
    assert any(e.get("status") == 503 for e in entries if e["logger"] == "vitc.access")
