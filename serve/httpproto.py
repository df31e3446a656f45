"""uvicorn's HTTP protocol with the bounds on request headers that uvicorn itself does not have, and JSON answers
for what its parser refuses.

Without them a client that connects and never finishes its headers (slowloris) holds a connection forever, and one
that streams an endless header grows the server's memory. The body has its own deadline and budget
(serve.middleware.BodyLimitMiddleware); idle keep-alive connections have uvicorn's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together (nginx's default buffers hold 32 KiB)


def _answer(status: int, reason: str, text: str) -> bytes:
    """A complete JSON error response that closes the connection."""
    body = json.dumps({"error": text}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's default HTTP protocol class, closing with a JSON 408 a connection whose request headers are not
    complete `seconds` after the connection opened or the request's first byte arrived, with a JSON 431 one whose
    headers pass MAX_HEADER_BYTES, and with a JSON 400 what uvicorn's parser refuses."""
    timeout = _answer(408, "Request Timeout", f"the request headers did not arrive within {seconds:g} s")
    too_large = _answer(431, "Request Header Fields Too Large",
                        f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes")

    class HeaderBoundsProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._headers_of = self.cycle  # the request whose headers were complete last
            self._body_read_of = None  # the request whose body was read to its end last
            self._header_timer: asyncio.TimerHandle | None = None
            self._header_bytes = 0
            self._completed_now = False  # whether the read being parsed ended a request's body
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                # The next request's first bytes, or the rest of a body answered early (a 404 before it was read).
                self._arm()
            self._completed_now = False
            super().data_received(data)
            if self.cycle is not self._headers_of:  # a new request's headers are complete (uvicorn made its cycle)
                self._headers_of = self.cycle
                self._disarm()
            elif self._header_timer is not None and self._answer_owed() and not self._completed_now:
                # A read that finished an early-answered body is that body, not the next request's headers (what
                # follows it in the same read is measured by the parser as its headers complete).
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._close_with(too_large)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._body_read_of = self.cycle
            self._completed_now = True

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._parsed_header_bytes, self._oversized, self._in_headers = 0, False, True

        def on_headers_complete(self) -> None:
            self._in_headers = False
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if (self._header_timer is None and getattr(self, "_in_headers", False) and not self.pipeline
                    and not self.transport.is_closing()):
                # A pipelined request that began while this one was served and is still short of its headers:
                # its deadline starts now (uvicorn would only arm the silent keep-alive close).
                self._unset_keepalive_if_required()
                self._arm()

        def on_url(self, url: bytes) -> None:
            super().on_url(url)
            self._count_parsed(len(url))

        def on_header(self, name: bytes, value: bytes) -> None:
            super().on_header(name, value)
            self._count_parsed(len(name) + len(value) + 4)

        def _count_parsed(self, n: int) -> None:
            """Headers that arrive whole in one read are measured here, as the parser hands them over."""
            self._parsed_header_bytes += n
            if self._parsed_header_bytes > MAX_HEADER_BYTES:
                self._oversized = True
                raise ValueError("request headers too large")  # the parser stops; uvicorn answers via 400 below

        def send_400_response(self, msg: str) -> None:
            self._close_with(too_large if getattr(self, "_oversized", False) else _answer(400, "Bad Request", msg))

        def _answer_owed(self) -> bool:
            """Whether the bytes in flight start a request nobody has answered yet, rather than finish the body of
            one answered early (whose rest is only read and dropped)."""
            return self.cycle is None or self._body_read_of is self.cycle

        def _arm(self) -> None:
            self._header_bytes = 0
            self._header_timer = asyncio.get_running_loop().call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self._answer_owed():
                self._close_with(timeout)
            elif not self.transport.is_closing():
                self.transport.close()  # already answered: the rest of its body is not worth waiting for

        def _close_with(self, answer: bytes) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return HeaderBoundsProtocol
