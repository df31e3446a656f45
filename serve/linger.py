"""The lingering close of serve.httpproto's connections: an answer that closes its connection while the client may
still be sending goes out, the write side shuts, and what the client still sends is read and dropped, within bounds,
before the connection closes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

# An answer that closes its connection while the client may still be sending (a 413 at once, a 404 or 401 to a
# request with a body, HTTP/1.0 or `Connection: close` or a stop's shutdown delay closing after it, a refusal in the
# middle of a request) half-closes, then reads and drops what still comes before it closes, as nginx does (its
# lingering close): closing with input unread makes the kernel send a reset, which destroys the answer before a
# client that sends its whole body first (requests, http.client, curl) gets to read it. The client may pause
# LINGER_IDLE_S between reads (nginx: 5 s; what matters here is curl's 1 s wait before it sends a body that got no
# `100 Continue`), and gets LINGER_S in all, never more than its body deadline (`seconds`): nginx allows 30 s for
# slow links, while this server's clients sit on a data-centre network where a body several times the limit takes a
# few seconds even at 100 Mbit/s, and a stop waits for lingering connections (within --graceful-timeout-s). It reads
# at most ConnectionLimits.linger_bytes (lingering_bytes: LINGER_BODIES bodies of the limit): bandwidth, not memory,
# since nothing read is kept. Past a bound the connection closes, a reset if the client is still sending. A kept
# connection, which reads and drops the rest of each body answered early (up to twice the limit each, as a 413 at
# once allows: serve.middleware.EarlyAnswerMiddleware), drops as much at most, all its requests together, before it
# closes gently too: otherwise one such request after another would have the server read without end.
LINGER_S = 10.0
LINGER_IDLE_S = 2.0
LINGER_BODIES = 8
LINGER_MIN_BYTES = 64 << 20


class LingeringTransport:
    """A connection's transport as uvicorn (and serve.httpproto) sees it: `close` closes gently when the client may
    still be sending (LingeringClose._close_gently), and the transport counts as closing from then on; the rest is
    the transport's own."""

    def __init__(self, transport: asyncio.Transport, protocol: LingeringClose) -> None:
        self._transport, self._protocol = transport, protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self._protocol.lingering:  # the answer is out and the write side shut: nothing more goes
            self._transport.write(data)

    def close(self) -> None:
        if not self._protocol.lingering and not self._protocol._close_gently():
            self._transport.close()


class LingeringClose:
    """The lingering close, mixed into serve.httpproto.HeaderBoundsProtocol, whose connection state it reads."""

    # `self` is that protocol (its _wire, _eof, _turned_away ...): not imported here, which would close an import
    # circle with serve.httpproto.

    lingering = False  # whether the answers are out and what the client still sends is read and dropped

    def _close_gently(self) -> bool:
        """Close gently, if the client may still be sending (and has not ended its stream): the answers written so
        far go out, then the write side shuts (the client reads them, then EOF), and what the client still sends is
        read and dropped until it closes, pauses LINGER_IDLE_S, has sent linger_bytes, or LINGER_S have passed.
        False when a plain close does (nothing unread, or a client silent for LINGER_IDLE_S already: a stalled
        upload at its deadline)."""
        wire = self._wire
        if (self._turned_away or self._eof or wire.is_closing() or not wire.can_write_eof()
                or not self._unread()):
            return False
        now = self.loop.time()
        if not self.flow.paused and now - self._last_read >= LINGER_IDLE_S:
            return False
        self.lingering = True
        self._disarm()
        self._unset_keepalive_if_required()
        for timer in (self._eof_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self.shared.waiting.pop(self, None)
        self._unparsed, self._at = b"", 0
        if self.flow.paused:
            self._last_read = now  # bytes may wait in the kernel: they count as just read
        self._linger_ends = now + min(LINGER_S, self.limits.seconds)
        wire.write_eof()  # once what is buffered has gone out
        self.flow.read_all()
        self._linger_check()
        return True

    def _linger_check(self) -> None:
        """End the lingering close at its bounds in time, else look again when the next one may be reached."""
        self._linger_timer = None
        if self._wire.is_closing():
            return
        now = self.loop.time()
        due = min(self._linger_ends, self._last_read + LINGER_IDLE_S)
        if now >= due:
            self._wire.abort()  # the client left the connection open, or never stops sending
            return
        self._linger_timer = self.loop.call_later(due - now, self._linger_check)
