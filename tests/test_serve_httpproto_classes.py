"""The HTTP protocol and the server class at module level, in process: each configured protocol class holds its own
limits and count of open connections (two servers in one process share nothing), and the delayed shutdown turns
readiness off at the first signal and starts the drain at the second. The real servers' edges are in
tests/test_serve_http_edges.py, tests/test_serve_shutdown_delay.py and their neighbours."""

from __future__ import annotations

import asyncio
import signal
import socket
from types import SimpleNamespace

import pytest
import uvicorn
from uvicorn.server import ServerState

from serve.http_limits import ConnectionLimits, probe_places
from serve.httpproto import HeaderBoundsProtocol
from serve.shutdown import CONNECTION_CLOSE, DelayedShutdownServer


async def _app(scope, receive, send) -> None:
    """A minimal ASGI app: 200 `ok` to every request."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_limits_say_their_reasons():
    limits = ConnectionLimits(2.5, 7)
    assert limits.busy == "the server has 7 connections open, its limit; retry shortly"
    assert limits.too_slow == "the request headers did not arrive within 2.5 s"
    assert limits.probe_places == probe_places(7) == 16
    assert ConnectionLimits(1.0, 1000).probe_places == 100
    with pytest.raises(AttributeError):  # frozen: one server's limits cannot change under its connections
        limits.seconds = 1.0  # type: ignore[misc]


def test_each_configured_class_has_its_own_limits_and_count():
    refused: list[int] = []
    a = HeaderBoundsProtocol.configured(ConnectionLimits(1.0, 3), access_log=False, on_refusal=refused.append)
    b = HeaderBoundsProtocol.configured(ConnectionLimits(9.0))
    assert issubclass(a, HeaderBoundsProtocol) and issubclass(b, HeaderBoundsProtocol)
    assert a.limits == ConnectionLimits(1.0, 3) and b.limits.max_connections is None
    assert a.shared is not b.shared and (a.shared.admitted, a.shared.probes, a.shared.waiting) == (0, 0, {})
    assert not hasattr(HeaderBoundsProtocol, "shared")  # configuring never changes the class itself
    a.refusals.report(503, "test", SimpleNamespace(get_extra_info=lambda _: None))
    assert refused == [503]  # the callback is called as given, not bound as a method of the class
    config = uvicorn.Config(_app, http=a, log_config=None)
    config.load()
    assert config.http_protocol_class is a  # uvicorn gets a protocol class, as with its own


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


async def _serve_with(protocol: type[asyncio.Protocol]) -> tuple[asyncio.AbstractServer, int]:
    config = uvicorn.Config(_app, http=protocol, log_config=None, access_log=False, lifespan="off")
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _recv(sock: socket.socket) -> bytes:
    """What the server sends until it closes (or 2 s pass), read off the event loop's thread."""

    def read() -> bytes:
        sock.settimeout(2)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data

    return await asyncio.get_running_loop().run_in_executor(None, read)


def test_connections_beyond_the_limit_are_counted_per_class_and_given_back():
    """One admitted connection, the probe places beyond it, then a 503 for the next; a second class is not
    affected, and every place is given back when its connection is lost."""
    refused: list[int] = []
    one = HeaderBoundsProtocol.configured(ConnectionLimits(5.0, 1), access_log=False, on_refusal=refused.append)
    other = HeaderBoundsProtocol.configured(ConnectionLimits(5.0, 1), access_log=False)

    async def main() -> None:
        server, port = await _serve_with(one)
        server2, port2 = await _serve_with(other)
        socks = [_connect(port) for _ in range(1 + probe_places(1))]
        await asyncio.sleep(0.2)
        assert (one.shared.admitted, one.shared.probes, len(one.shared.waiting)) == (1, 16, 16)
        late = _connect(port)  # every probe place waits for its headers: the oldest gives its place to this one
        await asyncio.sleep(0.2)
        assert (one.shared.admitted, one.shared.probes) == (1, 16) and refused == [503]
        assert b"503 Service Unavailable" in await _recv(socks[1])
        extra = _connect(port2)
        extra.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _recv(extra)).startswith(b"HTTP/1.1 200 ")  # the other server's limit is its own
        socks[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await _recv(socks[0])).startswith(b"HTTP/1.1 200 ")
        for s in (*socks, late, extra):
            s.close()
        await asyncio.sleep(0.3)
        assert (one.shared.admitted, one.shared.probes, one.shared.waiting) == (0, 0, {})
        assert (other.shared.admitted, other.shared.probes) == (0, 0)
        server.close()
        server2.close()

    asyncio.run(main())


def _server(delay: float) -> tuple[DelayedShutdownServer, SimpleNamespace]:
    state = SimpleNamespace(ready=True, metrics=SimpleNamespace(serving=True))
    server = DelayedShutdownServer(uvicorn.Config(_app, log_config=None), state, delay)
    server.started = True
    return server, state


def test_the_first_signal_starts_the_delay_and_the_second_the_drain():
    server, state = _server(30.0)
    server.handle_exit(signal.SIGTERM, None)
    assert (state.ready, state.metrics.serving, server.should_exit) == (False, False, False)
    assert server.delay_ends is not None and server.signalled == signal.SIGTERM
    assert getattr(state, "stop_requested_at", None) is None  # the drain is not asked for yet
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and state.stop_requested_at is not None


def test_every_answer_during_the_delay_closes_its_connection():
    server, _ = _server(30.0)
    server.handle_exit(signal.SIGTERM, None)
    asyncio.run(server.on_tick(0))
    assert CONNECTION_CLOSE in server.server_state.default_headers and server.signalled is None
    assert not server.should_exit  # the delay is not over


@pytest.mark.parametrize("delay, started", [(0.0, True), (30.0, False)])
def test_without_a_delay_or_before_the_start_a_signal_drains_at_once(delay, started):
    server, state = _server(delay)
    server.started = started
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and server.delay_ends is None
    assert (state.ready, state.metrics.serving) == (False, False) and state.stop_requested_at is not None


def test_stop_before_uvicorn_takes_the_signals():
    server, state = _server(30.0)
    server.stop(signal.SIGTERM, None)
    assert server.should_exit and not state.ready and state.stop_requested_at is not None
