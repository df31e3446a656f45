"""Shared helpers for the benchmark tests (no tests here): stand-in HTTP servers in this process, on loopback."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandInHandler(BaseHTTPRequestHandler):
    """A quiet HTTP/1.1 handler (keep-alive, as the load tools' clients expect) with body helpers."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *_args: object) -> None:
        pass  # one line a request would bury the test's own output

    def read_body(self) -> bytes:
        """The request's body (read whole, so the connection can carry the next request)."""
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def send_body(self, body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        """Answer `status` with `body`, its Content-Length and `headers`."""
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def stand_in_server(handler_cls: type[BaseHTTPRequestHandler], path: str = "", port: int = 0) -> Iterator[str]:
    """`handler_cls` served on 127.0.0.1:`port` (0: a free one) in a daemon thread; its URL, then `path`."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler_cls)
    server.daemon_threads = True  # a handler still waiting for a request does not hold up the shutdown
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}"
    finally:
        server.shutdown()
        server.server_close()
