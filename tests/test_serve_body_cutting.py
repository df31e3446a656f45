"""How serve.httpproto hands a connection's bytes to the parser, in process (its protocol class, a real socket, a tiny
ASGI app):

- a body, and the empty lines between requests, go to the parser in pieces as large as the reads, whatever they
  hold: CRLF CRLF (what ends a request's headers) on and on went in 4 bytes at a time, each piece through the whole
  Python path (~15x the CPU; one unauthenticated client at 2 MB/s stalled the server), also the rest of a body
  answered early, which is only read and dropped;
- a kept connection that drops its bound of bodies answered early (`linger_bytes`) says `Connection: close` in the
  answer after which it closes (the answer said nothing, and the client's next request met an EOF)."""

from __future__ import annotations

import asyncio
import json

import uvicorn
from uvicorn.server import ServerState

from serve.http_limits import ConnectionLimits
from serve.httpproto import HeaderBoundsProtocol
from serve.middleware import EarlyAnswerMiddleware

CRLFS = b"\r\n\r\n" * 250_000  # 1 MB of what ends a request's headers


async def _app(scope, receive, send) -> None:
    """/body reads the body and answers its length; any other path answers 404 without reading it."""
    if scope["type"] != "http":
        return
    size, status = 0, 404
    if scope["path"] == "/body":
        status, more = 200, True
        while more:
            message = await receive()
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _counting(limits: ConnectionLimits, app=_app) -> tuple[type, uvicorn.Config, dict[str, int]]:
    """A configured protocol class that counts its reads and the pieces it gives the parser, with its config."""
    counts = {"reads": 0, "pieces": 0}

    class Counting(HeaderBoundsProtocol.configured(limits, access_log=False)):  # type: ignore[misc]
        def data_received(self, data: bytes) -> None:
            counts["reads"] += 1
            super().data_received(data)

        def _parse(self, data: bytes) -> None:
            counts["pieces"] += 1
            super()._parse(data)

    config = uvicorn.Config(app, http=Counting, log_config=None, access_log=False, lifespan="off")
    config.load()
    return Counting, config, counts


async def _serve(limits: ConnectionLimits, app=_app) -> tuple[asyncio.AbstractServer, int, dict[str, int]]:
    protocol, config, counts = _counting(limits, app)
    state = ServerState()
    listener = await asyncio.get_running_loop().create_server(
        lambda: protocol(config=config, server_state=state, app_state={}), "127.0.0.1", 0)
    return listener, listener.sockets[0].getsockname()[1], counts


async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One answer: its status, headers and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, *lines = head.decode("latin-1").split("\r\n")[:-2]
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), 10)
    return int(status.split()[1]), headers, body


async def _eof(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionError:
        return True


def _chunked(data: bytes, size: int) -> bytes:
    """`data` as a chunked body of chunks of `size` bytes."""
    parts = (data[i:i + size] for i in range(0, len(data), size))
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


READY = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_body_of_crlf_crlf_goes_to_the_parser_in_pieces_as_large_as_the_reads():
    """A megabyte of CRLF CRLF, read by the app (Content-Length; chunked in 2-byte chunks, and in one chunk),
    answered early and dropped (404), or sent between two requests, costs a few pieces a read, as a body of spaces
    does, not 250,000; it is the body it said it was, and the request pipelined behind it is answered in order."""

    async def main() -> None:
        listener, port, counts = await _serve(ConnectionLimits(10.0))
        head = b"POST /body HTTP/1.1\r\nHost: x\r\n"
        for framing, body in ((b"Content-Length: %d" % len(CRLFS), CRLFS),
                              (b"Transfer-Encoding: chunked", _chunked(CRLFS, 2)),
                              (b"Transfer-Encoding: chunked", _chunked(CRLFS, len(CRLFS)))):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            counts.update(reads=0, pieces=0)
            writer.write(head + framing + b"\r\n\r\n" + body + READY)
            status, _, answer = await _answer(reader)
            assert status == 200 and json.loads(answer) == {"size": len(CRLFS)}, (framing, status, answer)
            assert (await _answer(reader))[0] == 404  # the next request, not a piece of the body
            # headers, their body (the reads it spans), the last chunk's line, the trailers' end, the next request
            assert counts["pieces"] <= counts["reads"] + 4, (framing, counts)
            writer.close()
        # Between requests: empty lines, which the parser skips.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        counts.update(reads=0, pieces=0)
        writer.write(READY + CRLFS + READY)
        assert [(await _answer(reader))[0] for _ in range(2)] == [404, 404]
        assert counts["pieces"] <= counts["reads"] + 4, counts
        writer.close()
        # Answered before its body came: the rest is only read and dropped, and the connection is kept.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(CRLFS))
        status, headers, _ = await _answer(reader)
        assert status == 404 and "connection" not in headers, headers
        counts.update(reads=0, pieces=0)
        writer.write(CRLFS + READY)
        assert (await _answer(reader))[0] == 404
        assert counts["pieces"] <= counts["reads"] + 2, counts
        writer.close()
        listener.close()

    asyncio.run(main())


def test_the_answer_after_which_a_kept_connection_closes_for_its_drop_bound_says_so():
    """Bodies of 1000 bytes answered early (404) on one connection that drops 3500 bytes of them at most: three are
    kept, the fourth answer says `Connection: close` (the rest of its body would pass the bound) and the connection
    closes after its body; every answer that did not say so carried the next request."""

    async def main() -> None:
        app = EarlyAnswerMiddleware(_app, max_bytes=1000)
        listener, port, _ = await _serve(ConnectionLimits(10.0, linger_bytes=3500), app)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        closes = []
        for _ in range(6):
            writer.write(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
            status, headers, _ = await _answer(reader)  # a kept connection answers every request
            assert status == 404, (status, headers)
            closes.append(headers.get("connection") == "close")
            writer.write(b"x" * 1000)
            if closes[-1]:
                break
        assert closes == [False, False, False, True], closes
        assert await _eof(reader)
        writer.close()
        listener.close()

    asyncio.run(main())
