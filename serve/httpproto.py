"""uvicorn's HTTP protocol with a deadline on request headers, which uvicorn itself does not have.

Without it a client that connects and never finishes its headers (slowloris) holds a connection and a file
descriptor forever. The body has its own deadline (serve.middleware.BodyLimitMiddleware); idle keep-alive
connections have uvicorn's keep-alive timeout.
"""

from __future__ import annotations

import asyncio
import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's default HTTP protocol class, closing with a JSON 408 a connection whose request headers are not
    complete `seconds` after the connection opened or the request's first byte arrived."""
    body = json.dumps({"error": f"the request headers did not arrive within {seconds:g} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._headers_of = self.cycle  # the request whose headers were complete last
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of the next request on a keep-alive connection
            super().data_received(data)
            if self.cycle is not self._headers_of:  # a new request's headers are complete (uvicorn made its cycle)
                self._headers_of = self.cycle
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = asyncio.get_running_loop().call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return HeaderTimeoutProtocol
