"""uvicorn's HTTP protocol with the bounds on request headers that uvicorn itself does not have, and JSON answers
for what its parser refuses.

Without them a client that connects and never finishes its headers (slowloris) holds a connection forever, and one
that streams an endless header grows the server's memory. A client that stops reading its answers would hold its
connection (and the request's memory) forever too, and one that pipelines thousands of requests per read would have
every one of them parsed and queued. The body has its own deadline and budget (serve.middleware.BodyLimitMiddleware);
idle connections, new or kept alive, have uvicorn's keep-alive timeout (a silent close). An answer that closes its
connection before the request was read whole closes it gently (serve.linger's lingering close), so that the client
reads it, not a reset.
A request that asks for a protocol upgrade (`Connection: Upgrade` with `Upgrade: h2c`, `websocket`, anything) is read
and answered as the same request without it (RFC 9110 7.8): its body is its body, and what follows it the next
request; the parser alone would take the body for the new protocol's bytes (request smuggling).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import sys
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.protocols.http.flow_control import FlowControl

from serve.chunked import ChunkSizes
from serve.errors import APIError
from serve.hostfield import host_field_problem
from serve.http_limits import PROBE_PATHS, PROBE_WAIT_S, ConnectionLimits, OpenConnections, Refusals
from serve.linger import LingeringClose, LingeringTransport

try:  # the bytes a socket's kernel queue holds that its peer has not taken (Linux: SIOCOUTQ)
    import fcntl
    import termios

    _OUTQ: int | None = termios.TIOCOUTQ
except (ImportError, AttributeError):  # elsewhere: the write buffer alone tells progress
    _OUTQ = None

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together (nginx's default buffers hold 32 KiB)
# Requests parsed on one connection that wait behind the one being answered. Beyond them the bytes read stay
# unparsed (one read at most: reading pauses) until answers go out; uvicorn parsed a whole read (256 KiB, thousands
# of small requests) into its queue, and resumed reading after every answer.
MAX_PIPELINED = 4
# An unfinished line of a chunked body's framing (a chunk size with its extensions, or a trailer field) may be this
# long, as in Go's net/http; the parser skips extensions without a limit, and gathers a trailer field in memory.
MAX_CHUNK_LINE = 4096
# A chunked body's framing (its chunk-size lines with their extensions, and the CRLF after each chunk's data) may be
# FRAMING_PER_BYTE bytes per byte of its data, plus FRAMING_SLACK; past that the body is refused (400) as it arrives.
# The body limit counts data alone, and each chunk costs the server a Python call or so: 1-byte chunks put 6 bytes on
# the wire per byte of data (a 16 MiB body of them is 100 MB), 1-byte chunks with extensions of MAX_CHUNK_LINE bytes
# about 4,000. Every chunk of 2 bytes or more without extensions keeps under the ratio (5 bytes of framing: a hex
# digit and two CRLFs), whatever the body's length; with the slack, a body of up to 32 KiB passes however it is
# chunked, and a longer one may begin with some 30,000 1-byte chunks. Trailers are not counted (MAX_HEADER_BYTES).
FRAMING_PER_BYTE = 3
FRAMING_SLACK = 64 * 1024
# A client may half-close after its requests (HTTP/1.1 allows it; `nc -N`, some proxies and load tools do), which
# the server cannot tell from one that closed entirely and left: both only send EOF. The requests read whole are
# answered either way; one still unanswered EOF_PROBE_S after the EOF gets an interim `100 Continue` (RFC 9110
# 15.2: an HTTP/1.1 client must take an unexpected 1xx), which a client that left answers with a reset, looked for
# as often: its requests are then disconnects, and their queued work is dropped as before. HTTP/1.0 cannot be
# probed (no 1xx may go to it), and its real peers (nginx's upstream connections by default, ApacheBench) close
# entirely rather than half-close: an EOF while an HTTP/1.0 request is owed its answer means the client left.
EOF_PROBE_S = 0.1
_INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEADERS_END = b"\r\n\r\n"  # the parser is strict: a request's headers end with this, nothing else
_EMPTY_LINES = re.compile(rb"[\r\n]*")  # what the parser skips before a request line
# A path separator sent percent-encoded. uvicorn decodes the path before the app routes it, so `/v2%2Frepository%2F...`
# reached the repository API while a gateway rule on the `/v2/repository/` prefix (Envoy and Istio keep `%2F` as sent)
# saw another path; Triton routes on the path as sent, where it matches no endpoint.
_ENCODED_SEPARATOR = re.compile(rb"%(2f|5c)", re.IGNORECASE)
# What the parser raises at the end of HTTP/2's connection preface (`PRI * HTTP/2.0` + `SM`, RFC 9113 3.4), the first
# bytes of an h2c client with prior knowledge or a gRPC client pointed at this port, and what that client is told.
_H2_PREFACE = "Pause on PRI/Upgrade"
H2_REFUSED = ("HTTP/2 is not supported (HTTP/1.1 only): this server has no HTTP/2 or gRPC endpoint (Triton's gRPC "
              "port is 8001 by default); send HTTP/1.1, e.g. tritonclient.http")
# What a request that the server had no memory to read is told (the words of serve.routes.deps.OUT_OF_MEMORY, which
# this module, below the app, does not import): 503 + Retry-After, not the client's fault.
OUT_OF_MEMORY = "the server ran out of memory for this request; retry later"


def _answer(status: int, reason: str, text: str, retry_after: int | None = None) -> bytes:
    """A complete JSON error response that closes the connection."""
    body = json.dumps({"error": text}).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\ndate: {formatdate(usegmt=True)}\r\ncontent-type: application/json\r\n"
            f"{retry}connection: close\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body


def _out_of_memory(error: BaseException | None) -> bool:
    """Whether the parser stopped because a callback ran out of memory (gathering the body, the URL or a header):
    httptools raises its own HttpParserCallbackError, with the callback's exception as its context."""
    return isinstance(error, MemoryError) or isinstance(getattr(error, "__context__", None), MemoryError)


def _parser_refusal(error: BaseException | None, msg: str) -> tuple[int, str, str]:
    """The answer to what the parser refused (uvicorn calls send_400_response inside its `except`): an unknown
    method is 501 and an unknown HTTP version 505 (RFC 9110 9.1, 15.6.6), HTTP/2's connection preface too, the
    rest 400 with the parser's reason (`msg` where there is none: a callback's own failure)."""
    if isinstance(error, httptools.HttpParserInvalidMethodError):
        return 501, "Not Implemented", "unknown request method (methods are case-sensitive, e.g. GET, POST)"
    if isinstance(error, httptools.HttpParserError) and str(error) == "Invalid HTTP version":
        return 505, "HTTP Version Not Supported", "unknown HTTP version (HTTP/1.1 only)"
    if isinstance(error, httptools.HttpParserError) and str(error) == _H2_PREFACE:
        return 505, "HTTP Version Not Supported", H2_REFUSED
    if isinstance(error, httptools.HttpParserError) and not isinstance(error, httptools.HttpParserCallbackError):
        # llhttp's reasons are short fixed texts ("Invalid header value char"), as a chunked body's refusal gives them.
        return 400, "Bad Request", f"malformed request: {str(error).splitlines()[0] if str(error) else msg}"[:200]
    return 400, "Bad Request", msg


class _HeldFlow(FlowControl):
    """uvicorn's read flow control, plus a hold of this module's own: while it is on, reading stays paused whatever
    uvicorn resumes (it resumes after every answer, and whenever the app waits for body bytes)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__(transport)
        self._reader, self._held, self._paused = transport, False, False
        self._draining = False  # a lingering close: everything is read (and dropped), whatever pauses ask

    def pause_reading(self) -> None:
        self.read_paused = True
        self._apply()

    def resume_reading(self) -> None:
        self.read_paused = False
        self._apply()

    def hold(self, on: bool) -> None:
        """Keep reading paused (`on`), or let uvicorn's own pauses decide again."""
        self._held = on
        self._apply()

    @property
    def paused(self) -> bool:
        """Whether reading is paused (the client may have sent bytes that wait unread in the kernel)."""
        return self._paused

    def read_all(self) -> None:
        """Read from now on, whatever is paused or held: what arrives is only dropped (a lingering close)."""
        self._draining = True
        self._apply()

    def _apply(self) -> None:
        paused = (self.read_paused or self._held) and not self._draining
        if paused != self._paused:
            self._paused = paused
            (self._reader.pause_reading if paused else self._reader.resume_reading)()


_TOO_LARGE = f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes"
# Fields a chunked body's trailer may not carry (RFC 9110 6.5.1): they frame the message, route it, control the
# connection or say how its content is read, which the request's headers alone decide (a proxy or filter checks
# those, not the trailer). The hop-by-hop ones (RFC 9110 7.6.1) too: llhttp reads a trailer's Connection (and
# Proxy-Connection) as a header's, so `Connection: close` there ended the keep-alive unannounced and dropped the
# pipelined requests behind it.
_HEADER_ONLY = frozenset({b"content-length", b"transfer-encoding", b"trailer", b"host", b"content-encoding",
                          b"content-type", b"inference-header-content-length", b"connection", b"proxy-connection",
                          b"keep-alive", b"upgrade", b"te"})


class HeaderBoundsProtocol(LingeringClose, AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's default HTTP protocol, bounding what one connection may cost, with JSON answers to what it refuses."""

    # uvicorn makes one instance per connection from the class it is given: `configured` makes that class, holding
    # the limits and the count of open connections that all of its connections share, and `refusals`, which counts
    # and logs each answer given here (the app's access log and metrics never see them).
    limits: ClassVar[ConnectionLimits]
    shared: ClassVar[OpenConnections]
    refusals: ClassVar[Refusals]
    # Set per request by on_message_begin; send_400_response may come before the first request begins.
    _oversized = False
    _long_uri = False
    _bad: tuple[Any, ...] | None = None
    _bad_trailer: bytes | None = None  # a field of _HEADER_ONLY in the trailer of the request being read

    @classmethod
    def configured(cls, limits: ConnectionLimits, *, access_log: bool = True,
                   on_refusal: Callable[[int], None] | None = None) -> type[HeaderBoundsProtocol]:
        """The protocol class of one server: its connections share `limits` and one count of those open."""
        return type(cls.__name__, (cls,), {"limits": limits, "shared": OpenConnections(),
                                           "refusals": Refusals(access_log, on_refusal)})

    @classmethod
    def close_after_answers(cls) -> None:
        """From now on every answer not yet begun, on every connection of this class, says `connection: close` and
        closes its connection (a stop's shutdown delay). A plain assignment: safe in a signal handler."""
        cls.shared.closing = True

    # Connections: admission, the probe places beyond the limit, and their release. A connection beyond
    # `limits.max_connections` open at once gets a JSON 503 and is closed unread (each one holds a file descriptor and
    # memory for up to `limits.seconds`, so without a bound a flood of idle ones starves the process), except that a
    # few (`limits.probe_places`) may still GET health, readiness or metrics within PROBE_WAIT_S.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.flow = _HeldFlow(transport)  # before any request (each request's cycle shares it)
        self._wire = transport  # the transport itself: self.transport (every cycle's too) closes gently
        self.transport = LingeringTransport(transport, self)
        self._last_read = self.loop.time()
        if not self._admit():
            self._turn_away()
            return
        self._start_bounds()
        if self._probe_only:
            self._arm(PROBE_WAIT_S)
        else:
            self._idle()

    def _admit(self) -> bool:
        """Take a place for this connection, under the limit or a probe place beyond it; False if none is left."""
        limits, shared = self.limits, self.shared
        self._admitted = limits.max_connections is None or shared.admitted < limits.max_connections
        if not self._admitted and shared.probes >= limits.probe_places and shared.waiting:
            # Every probe place is taken: the one held longest by a client whose request is still incomplete goes
            # to this newcomer (a real probe sends its whole request at once; idle sockets, or ones that send a
            # byte now and then, must not hold the places).
            next(iter(shared.waiting))._evict()
        self._probe_only = not self._admitted and shared.probes < limits.probe_places
        if self._turned_away:
            return False
        self._counted = True  # whether this connection still holds its place in `shared`
        shared.count(self._probe_only, 1)
        if self._probe_only:
            shared.waiting[self] = None
        return True

    @property
    def _turned_away(self) -> bool:
        """Whether this connection got no place (it is answered 503 and closed unread)."""
        return not (self._admitted or self._probe_only)

    def _start_bounds(self) -> None:
        """The per-connection state of the bounds, before the first request."""
        self._headers_of = self.cycle  # the request whose headers were complete last
        self._body_read_of = None  # the request whose body was read to its end last
        self._header_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._sent_waiters: list[Callable[[], None]] = []  # called once the answers written so far left the buffer
        self._send_left = 0  # bytes the write buffer held when the send timer was last armed
        self._lost = False  # whether the connection is gone (connection_lost)
        self._messages = 0  # requests begun on this connection
        self._in_headers = False  # whether the parser is inside the latest request's line and headers
        self._in_body = False  # whether it is inside the latest request's body
        self._header_bytes = 0  # bytes of reads that arrived wholly inside that request's headers
        self._refusal: bytes | None = None  # an error answer waiting for the answers to earlier requests
        self._running: Any = None
        self._unparsed, self._at = b"", 0  # bytes read but not yet given to the parser, and how far it got
        self._tail = b""  # the last 3 bytes given to the parser (a headers' end may span two reads)
        self._line_bytes = 0  # bytes of the unfinished line of a chunked body's framing (size line or trailer)
        self._bad_body: tuple[Any, int, str] | None = None  # a request whose chunked body is malformed
        self._eof = False  # whether the client half-closed (or left) with answers still owed
        self._eof_timer: asyncio.TimerHandle | None = None
        self._probed = False  # whether the interim answer that tells a half-close from a departure went out
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_ends = 0.0  # when a lingering close ends at the latest (loop time)
        self._lingered = 0  # bytes read and dropped by it
        self._cut_off = False  # a 408 or an eviction: the connection closes at once, its place free (no linger)
        self._refused = False  # whether a refusal was written for the request whose headers are still arriving
        self._behind = False  # whether that request began while the one ahead of it was still unanswered
        self._priming = False  # a fresh parser is being fed a request head of this module's own (_ignore_upgrade)
        self._skip_complete = False  # the parser ends an Upgrade request at its headers: its body is still to come
        self._chunks: ChunkSizes | None = None  # the chunked body being read, followed for its chunk sizes
        self._announcing = False  # whether the piece being parsed ends a chunk-size line (_cut)
        self._chunk_data: list[bytes] = []  # chunk data the parser gave that uvicorn has not been handed yet
        self._body_left = 0  # bytes still due of the Content-Length body being read
        self._drained = 0  # bytes of bodies answered early read and dropped on this kept connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._turned_away:
            self._linger.cancel()
            super().connection_lost(exc)
            return
        self._release()
        self._lost = True
        self._written()  # nothing more will go out: what waited for it to go is done
        # uvicorn marks only the newest request as disconnected; with pipelining the one being answered is older,
        # and its next write would hit the closed transport.
        for cycle in (self._running, *(c for c, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def _release(self) -> None:
        """Give up this connection's place and stop its timers."""
        if self._counted:
            self.shared.count(self._probe_only, -1)
        self.shared.waiting.pop(self, None)
        self._disarm()
        for timer in (self._eof_timer, self._send_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()

    def _evict(self) -> None:
        """Give up this probe place (its client's request is still incomplete): 503, the place free at once."""
        self.shared.waiting.pop(self, None)
        self.shared.count(True, -1)
        self._counted = False  # counted out here, not again when the connection is lost
        self._cut_off = True
        self._refuse(503, "Service Unavailable", self.limits.busy, 1)

    def _turn_away(self) -> None:
        """503 at once, then half-close and wait a moment for the client to close: closing with its request unread
        would reset the connection, and the reset can destroy the 503 before the client reads it."""
        self.refusals.report(503, "too many connections", self.transport)
        self.transport.write(_answer(503, "Service Unavailable", self.limits.busy, retry_after=1))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger = asyncio.get_running_loop().call_later(1.0, self.transport.abort)

    # Reading: what goes to the parser, and how much of it at once. At most MAX_PIPELINED requests are parsed ahead
    # of the one being answered, and reading pauses until answers go out. A request with `Connection: Upgrade` is
    # read and answered as the same request without it (no upgrade is ever done: _feed_parser).

    def data_received(self, data: bytes) -> None:
        if self._turned_away:
            return  # what the client sends before it sees the 503 is dropped
        self._last_read = self.loop.time()
        if self.lingering:
            self._lingered += len(data)
            if self._lingered > self.limits.linger_bytes:
                self._wire.abort()  # a client that sends on and on: the bound in bytes
            return
        if (self._header_timer is None and (self.cycle is None or self.cycle.response_complete)
                and not self._empty_lines(self._unparsed[self._at:] + data)):
            # The next request's first bytes, or the rest of a body answered early (a 404 before it was read).
            self._arm()
        # Reading is held while bytes wait unparsed, so this is the whole read (the slice is only defensive).
        self._unparsed, self._at = (self._unparsed[self._at:] + data if self._unparsed else data), 0
        self._feed()

    def _empty_lines(self, data: bytes) -> bool:
        """Whether `data` is only empty lines between requests, which begin none (RFC 9112 2.2: a server ignores
        them before a request line): the connection stays idle, under its keep-alive timeout, not a header
        deadline whose 408 would answer nothing a client asked."""
        return not self._in_headers and not self._in_body and _EMPTY_LINES.fullmatch(data) is not None

    def _parsing(self) -> bool:
        """Whether bytes read may still go to the parser."""
        return (self.parser is not None and self._refusal is None and self._bad_body is None
                and not self.transport.is_closing())

    def _feed(self) -> None:
        """Give the parser the bytes read, as far as MAX_PIPELINED requests may wait behind the one being answered;
        the rest stays here, with reading paused, until answers go out."""
        while self._unparsed and self._parsing():
            room = MAX_PIPELINED - len(self.pipeline)
            if room <= 0:
                break
            data, at = self._unparsed, self._at
            end = self._cut()
            if (chunks := self._chunks) is not None and chunks.framing > (FRAMING_PER_BYTE * chunks.announced
                                                                          + FRAMING_SLACK):
                # Refused before the parser is given any of it, so that a body read whole in one piece is too.
                self._body_refused(f"chunked body framing too large: {chunks.framing} bytes of chunk-size lines for "
                                   f"{chunks.announced} bytes of data (at most {FRAMING_PER_BYTE} per byte + "
                                   f"{FRAMING_SLACK}); send larger chunks")
                break
            piece = data if at == 0 and end == len(data) else data[at:end]
            self._unparsed, self._at = (b"", 0) if end == len(data) else (data, end)
            self._tail = (self._tail + piece[-3:])[-3:]
            self._parse(piece)
        if not self._parsing():
            self._unparsed, self._at = b"", 0  # refused or closing: nothing more is read
        self.flow.hold(bool(self._unparsed) or self._bad_body is not None or self._eof)

    def _cut(self) -> int:
        """Where the bytes waiting are cut: right after the first CRLF CRLF where headers may end (a request's, or a
        chunked body's trailers), else after all of them. Bytes where none can end are skipped, not searched (CRLF
        CRLF on and on costs no piece each): a Content-Length body's rest, a chunked body's chunks as far as they go
        (ChunkSizes), and the empty lines the parser skips before a request. A piece given to the parser thus ends
        at most one request's headers, at its own end: a body begins with a piece of its own, and a piece that ends
        a body ends with it."""
        data, at = self._unparsed, self._at
        self._announcing = False
        if self._in_body:
            if self._body_left:
                return min(len(data), at + self._body_left)
            if self._chunks is not None:
                end, self._announcing = self._chunks.feed(data, at)
                if end > at:  # the body's end too, where no trailer fields follow its last chunk
                    return end + 2 if self._chunks.last and data.startswith(b"\r\n", end) else end
        elif not self._in_headers and (start := _EMPTY_LINES.match(data, at).end()) > at:
            return start  # between requests: the empty lines the parser skips, a piece of their own (no headers)
        spanning = (self._tail + data[at:at + 3]).find(_HEADERS_END)  # begun in what the parser already has
        if spanning >= 0:
            return at + spanning + len(_HEADERS_END) - len(self._tail)
        end = data.find(_HEADERS_END, at)
        return len(data) if end < 0 else end + len(_HEADERS_END)

    def _parse(self, data: bytes) -> None:
        if self._empty_lines(data):
            return  # skipped, as the parser would skip them; giving them to it would end the keep-alive timeout
        begun, idle = self._messages, not self._in_headers and not self._in_body
        chunks = self._chunks if self._announcing else None  # a chunk-size line ended in this piece (_cut)
        self._feed_parser(data)
        if chunks is not None and chunks is self._chunks and self._parsing():
            self.cycle.message_event.set()  # a `receive` waiting for body bytes looks at what is announced
        if self._drained > self.limits.linger_bytes and not self.transport.is_closing():
            # Enough of answered bodies dropped: the rest goes to a lingering close's bounds. (The answer whose body
            # got here said `Connection: close`: vitc.drop_left.)
            self.transport.close()
        if self.cycle is not self._headers_of:  # a new request's headers are complete (uvicorn made its cycle)
            self._headers_of = self.cycle
            self._disarm()
        if self._in_headers and self._messages == begun + idle:
            self._count_header_read(data)
        elif self._chunks is not None and self._parsing():
            if self._chunks.in_line:
                self._count_chunk_line(data)
            else:
                self._line_bytes = 0  # the piece ends inside chunk data: no line is unfinished

    def _feed_parser(self, data: bytes) -> None:
        """uvicorn's data_received, except that a request with `Connection: Upgrade` is read on as plain HTTP."""
        self._unset_keepalive_if_required()
        while True:
            try:
                self.parser.feed_data(data)
                self._give_chunk_data()
                return
            except httptools.HttpParserError as exc:
                self._chunk_data.clear()  # the body is refused: what the parser took of it goes nowhere
                msg = "Invalid HTTP request received."
                if not _out_of_memory(exc):  # the request is not at fault: its 503 is in the access log
                    self.logger.warning(msg)
                self.send_400_response(msg)
                return
            except MemoryError:  # gathering the chunk data (_give_chunk_data): a 503, as inside the parser
                self.send_400_response("Invalid HTTP request received.")
                return
            except httptools.HttpParserUpgrade as upgrade:
                # The parser stopped at the end of the request's headers (having called it complete, with no body)
                # and takes whatever follows for another protocol's.
                data = data[upgrade.args[0]:]
                self._ignore_upgrade()
                if not data:
                    return

    def _ignore_upgrade(self) -> None:
        """Go on after an Upgrade request's headers as if it had not asked for the upgrade: a fresh parser, first fed
        a request head of the same HTTP version, framing and persistence (its callbacks ignored), takes its body and
        the requests after it. (A parser resumed after an upgrade would read the body as a new request.)"""
        if self._codings:
            framing = b"transfer-encoding: chunked\r\n"  # the only coding on_headers_complete lets through
        else:
            framing = b"".join(b"content-length: " + v + b"\r\n" for n, v in self.headers if n == b"content-length")
        tokens = {t.strip().lower() for n, v in self.headers if n == b"connection" for t in v.split(b",")}
        persistence = b"".join(b"connection: " + t + b"\r\n" for t in (b"close", b"keep-alive") if t in tokens)
        version = self.parser.get_http_version().encode()
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
        self._priming = True
        try:
            self.parser.feed_data(b"POST / HTTP/" + version + b"\r\n" + framing + persistence + b"\r\n")
        finally:
            self._priming = False

    def _count_header_read(self, data: bytes) -> None:
        """The whole read went into the headers of one request, which the parser holds until they are complete (it
        parses even while earlier requests are answered): counted here, whether or not a deadline runs. A read that
        also ended an earlier request is left out (at most one read); whole headers are measured as they are
        parsed (_count_parsed)."""
        self._header_bytes += len(data)
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, "Request Header Fields Too Large", _TOO_LARGE)

    def _count_chunk_line(self, data: bytes) -> None:
        """Inside a chunk-size line or the trailers, whose lines end with LF (chunk data before the line ends with
        CRLF too): the unfinished line is what follows the last LF given to the parser."""
        lf = data.rfind(b"\n")
        self._line_bytes = (self._line_bytes if lf < 0 else 0) + len(data) - lf - 1
        if self._line_bytes > MAX_CHUNK_LINE:
            self._body_refused(f"malformed chunked body: a chunk-size line or trailer field longer than "
                               f"{MAX_CHUNK_LINE} bytes")

    # The parser's callbacks: each request's line, headers and body. Headers past MAX_HEADER_BYTES are a JSON 431;
    # CONNECT is refused (400), and so is HTTP/1.0 with a Transfer-Encoding (RFC 9112 6.1): _header_problem.

    def on_message_begin(self) -> None:
        if self._priming:
            return
        super().on_message_begin()
        # The access log's peer (serve.middleware): uvicorn's proxy-headers middleware replaces the scope's
        # `client` with what a trusted peer's X-Forwarded-For says, which may be any text.
        self.scope["vitc.peer"] = self.client
        self._unset_keepalive_if_required()  # armed when an early answer's body ended in this same read
        self._messages += 1
        self._behind = bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)
        self._parsed_header_bytes, self._oversized, self._in_headers = 0, False, True
        self._header_bytes, self._hosts, self._bad, self._long_uri = 0, 0, None, False
        self._bad_trailer = None
        self._bad_host: str | None = None  # why the first Host value breaks the grammar (serve.hostfield)
        self._codings: list[bytes] = []  # Transfer-Encoding values

    def on_url(self, url: bytes) -> None:
        if self._priming:
            return
        super().on_url(url)
        self._long_uri = len(self.url) > MAX_HEADER_BYTES  # uvicorn gathers the URL's pieces in self.url
        self._count_parsed(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._priming:
            return
        self._count_parsed(len(name) + len(value) + 4)  # a trailer's fields too: one bound for both sections
        if self._in_body:
            # A chunked body's trailer field: counted, never merged into the request's headers (RFC 9110 6.5.1).
            # uvicorn appended it to the list the app reads, after the app had begun, and a Content-Encoding there,
            # which no proxy saw in the headers, decoded the body.
            if name.lower() in _HEADER_ONLY:
                self._bad_trailer = name
                raise ValueError(name)  # the parser stops; send_400_response answers
            return
        super().on_header(name, value)
        if name.lower() == b"host":
            self._hosts += 1
            if self._bad_host is None:
                self._bad_host = host_field_problem(value)
        if name.lower() == b"transfer-encoding":
            self._codings.append(value)

    def _count_parsed(self, n: int) -> None:
        """Headers that arrive whole in one read are measured here, as the parser hands them over."""
        self._parsed_header_bytes += n
        if self._parsed_header_bytes > MAX_HEADER_BYTES:
            self._oversized = True
            raise ValueError("request headers too large")  # the parser stops; uvicorn answers via 400 below

    def on_headers_complete(self) -> None:
        if self._priming:
            return
        self._in_headers, self._in_body, self._line_bytes = False, True, 0
        if self._probe_only and not self._is_probe():
            self._bad = (503, "Service Unavailable", self.limits.busy, 1)
            raise ValueError(self._bad)
        self.shared.waiting.pop(self, None)  # a probe under way: no newcomer takes its place
        codings = [c.strip().lower() for v in self._codings for c in v.split(b",") if c.strip()]
        if problem := self._header_problem(codings):
            self._bad = problem
            raise ValueError(self._bad)  # the parser stops; uvicorn answers via send_400_response
        super().on_headers_complete()
        # The parser ends a request with `Connection: Upgrade` here, calling it complete: a body it has still comes.
        lengths = [v for n, v in self.headers if n == b"content-length"]
        self._skip_complete = self.parser.should_upgrade() and bool(codings or (lengths and int(lengths[0])))
        self._chunks = ChunkSizes() if codings else None
        self._body_left = 0 if codings or not lengths else int(lengths[0])
        if (cycle := self.cycle) is not None and cycle.scope is self.scope:
            # What only the connection knows, for the app: whether the request's body is not yet read to its end;
            # for a chunked body, the bytes its chunk-size lines announced so far (a chunk announced past the body
            # limit is refused before its data arrives: serve.middleware); and the bytes of bodies answered early
            # that the connection may still read and drop before it closes (an answer whose body may take it past
            # that says `Connection: close`: serve.middleware).
            self.scope["vitc.body_unread"] = lambda: self.cycle is cycle and self._body_read_of is not cycle
            if (chunks := self._chunks) is not None:
                self.scope["vitc.body_announced"] = lambda: chunks.announced
            self.scope["vitc.drop_left"] = lambda: self.limits.linger_bytes - self._drained
            # For the access log: a client that left before any of the answer went out was sent nothing (uvicorn
            # drops what the app sends then).
            self.scope["vitc.unanswered"] = lambda: cycle.disconnected and not cycle.response_started
            # For a large answer's memory (serve.responses.HeldResponse): held until the client has taken it.
            self.scope["vitc.when_sent"] = self.when_sent
            if self.scope["http_version"] == "1.0":
                # RFC 9110 10.1.1: an HTTP/1.0 request's 100-continue expectation is ignored, and 15.2: no 1xx goes
                # to HTTP/1.0 (uvicorn would send `100 Continue` when the app first reads the body).
                cycle.waiting_for_100_continue = False
        if self._probe_only:
            self.cycle.keep_alive = False  # one probe per place beyond the limit, then the place is free

    def _is_probe(self) -> bool:
        """Whether the request whose headers are complete is one a probe place may send."""
        return (self.parser.get_method() in (b"GET", b"HEAD")
                and PROBE_PATHS.fullmatch(self.url.partition(b"?")[0]) is not None)

    def _header_problem(self, codings: list[bytes]) -> tuple[int, str, str] | None:
        """The answer to a request whose complete headers this server refuses (status, reason, text), else None."""
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            # The parser takes HTTP/0.9 and HTTP/2.0 request lines, which uvicorn would answer as HTTP/1.1.
            return 505, "HTTP Version Not Supported", f"HTTP/{version} is not supported (HTTP/1.1 only)"
        if self.parser.get_method() == b"CONNECT":
            # The parser takes whatever follows a CONNECT for a tunnel's bytes; this server is no proxy.
            return 400, "Bad Request", "CONNECT is not supported (this server is not a proxy)"
        if _ENCODED_SEPARATOR.search(self.url.partition(b"?")[0]):
            return 400, "Bad Request", ("an encoded '/' or '\\' (%2F, %5C) in the request path is not taken: send the "
                                        "path unencoded")
        if codings and version == "1.0":
            # RFC 9112 6.1: an HTTP/1.0 message with a Transfer-Encoding has faulty framing.
            return 400, "Bad Request", "Transfer-Encoding is not allowed in HTTP/1.0 (send Content-Length)"
        if self._hosts != 1 and version == "1.1":
            # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without exactly one Host.
            return 400, "Bad Request", f"an HTTP/1.1 request needs exactly one Host header, not {self._hosts}"
        if self._bad_host is not None:
            # RFC 9112 3.2: and to one whose Host value is invalid (not `host [ ":" port ]`, RFC 3986).
            return 400, "Bad Request", f"invalid Host header: {self._bad_host}"
        if codings and codings != [b"chunked"]:
            # RFC 9112 6.1: a transfer coding the server does not understand is 501 (the parser would take
            # `gzip, chunked` as plain chunked and hand on a still-compressed body).
            return 501, "Not Implemented", ("Transfer-Encoding "
                                            f"{b', '.join(codings).decode('latin-1')[:64]!r} is not supported "
                                            "(chunked only; use Content-Encoding for gzip or deflate)")
        return None

    def on_body(self, body: bytes) -> None:
        if self._chunks is None:
            self._body_left -= len(body)
            super().on_body(body)
        else:
            self._chunk_data.append(body)  # handed to uvicorn once per piece parsed (_give_chunk_data)
        if self.cycle.response_complete:
            self._drained += len(body)  # the rest of a body answered early: read and dropped (uvicorn drops it)

    def _give_chunk_data(self) -> None:
        """Hand uvicorn the chunk data the parser gave since the last time, in one piece: uvicorn appends each piece
        to the request's body bytes (`body += piece`, a copy of all of them), and a read of 1-byte chunks (tens of
        thousands) made that quadratic."""
        if self._chunk_data:
            parts, self._chunk_data = self._chunk_data, []
            super().on_body(b"".join(parts))

    def on_message_complete(self) -> None:
        if self._priming:
            return
        if self._skip_complete:
            self._skip_complete = False  # the end of an Upgrade request's headers, not of its body (_ignore_upgrade)
            return
        self._give_chunk_data()  # the body's end comes after all of it
        super().on_message_complete()
        self._body_read_of, self._in_body, self._chunks = self.cycle, False, None
        self._body_left = 0
        self._read_on()
        if self.cycle.response_complete and not self._eof and not self.transport.is_closing():
            # The rest of a body answered early (a 404, a 413) is read and dropped: the connection is idle now, and
            # gets uvicorn's keep-alive timeout, not the deadline of headers that have not begun (a 408).
            self._idle()

    def _idle(self) -> None:
        """Wait for a request that has not begun: uvicorn's keep-alive timeout closes the connection silently (no
        header deadline runs until its first byte arrives: data_received)."""
        self._disarm()
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def _read_on(self) -> None:
        """Resume reading once the request being answered has its body whole, so that the client's EOF or reset is
        seen (eof_received, connection_lost) while the request is decoded and computed."""
        # uvicorn pauses reading once more than 64 KiB of body wait for the app (HIGH_WATER_LIMIT), and only the
        # app's `receive` resumes it: with the body whole the app calls it again only once its rows are queued, so a
        # client that left during a decode of seconds was answered (200) for nobody. What is read from now on is
        # the next request, as after a small body: its parse is bounded (_feed, MAX_HEADER_BYTES), and uvicorn
        # pauses again at its headers while this one runs. A request pipelined behind the running one stays paused
        # as uvicorn left it, and nothing more is read while a refusal waits for earlier answers.
        if self.cycle is self._running and self._refusal is None:
            self.flow.resume_reading()

    # Malformed chunked bodies: the app's `receive` raises their JSON error. A malformed chunked body (or one of its
    # framing lines longer than MAX_CHUNK_LINE, or framing past FRAMING_PER_BYTE bytes per byte of its data) ends its
    # request at once: the app's `receive` raises a JSON 400 that the app answers, closing the connection; a body the
    # server has no memory to gather, a JSON 503 + Retry-After (OUT_OF_MEMORY) the same way.

    def _body_open(self) -> bool:
        """Whether the parser is inside the body of a request that is not answered yet."""
        return (self._in_body and self.cycle is not None and self._body_read_of is not self.cycle
                and not self.cycle.response_complete)

    def _body_refused(self, text: str, status: int = 400) -> None:
        """A malformed chunked body: the request's app gets a JSON `status` from its `receive` at once (rather than
        waiting out the body deadline), its answer closes the connection, and nothing more is read. Once the
        request is answered (early), the connection gets the refusal instead."""
        if not self._body_open():
            self._refuse(status, HTTPStatus(status).phrase, text)
            return
        self._bad_body = (self.cycle, status, text)
        self.cycle.keep_alive = False
        self.cycle.message_event.set()  # wakes a `receive` waiting for body bytes
        self._unparsed, self._at = b"", 0
        self.flow.hold(True)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        self._running = cycle  # the request being answered (the others wait in self.pipeline)
        cycle.receive = self._checked_receive(cycle)  # what run_asgi hands the app
        cycle.send = self._closing_send(cycle)
        super()._start_asgi_task(cycle, app)

    def _closing_send(self, cycle: Any) -> Callable[[Any], Any]:
        """uvicorn's `send` of `cycle`, closing the connection after an answer begun once the server stops
        (close_after_answers): checked as the answer begins, so it holds for requests already in progress then."""
        send, shared = cycle.send, self.shared

        async def closing_send(message: Any) -> None:
            if shared.closing and not cycle.response_started:
                cycle.keep_alive = False  # uvicorn then says `connection: close` (once) and closes after the answer
            await send(message)

        return closing_send

    def _checked_receive(self, cycle: Any) -> Callable[[], Any]:
        """uvicorn's `receive` of `cycle`, raising the JSON error of a malformed chunked body."""
        receive = cycle.receive

        async def checked() -> Any:
            if self._bad_body is None or self._bad_body[0] is not cycle:
                message = await receive()
                if self._bad_body is None or self._bad_body[0] is not cycle:
                    return message
            _, status, text = self._bad_body
            retry = {"Retry-After": "1"} if status == 503 else {}  # out of memory: the server's trouble, for now
            raise APIError(status, text, {"Connection": "close", **retry})

        return checked

    # Answers: in order, each refusal after the answers before it. What uvicorn's parser refuses is a JSON 400 (501
    # an unknown method, 505 an unknown HTTP version: _parser_refusal).

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refusal is not None:
            if not self.pipeline and self.cycle is not None and self.cycle.response_complete:
                self._close_with(self._refusal)  # every request before the refused one is answered
            else:
                self.flow.pause_reading()  # uvicorn resumed it; nothing after the refusal is read
            return
        if self._unparsed:
            self._feed()  # an answer went out: the next request waiting unparsed may be parsed
        if self._eof:
            if not self._owed_at_eof() and not self.transport.is_closing():
                self.transport.close()  # every request the client sent whole is answered
            return
        if self._header_timer is None and self._in_headers and not self.pipeline and not self.transport.is_closing():
            # A pipelined request that began while this one was served and is still short of its headers: its
            # deadline starts now (uvicorn would only arm the silent keep-alive close).
            self._unset_keepalive_if_required()
            self._arm()

    def send_400_response(self, msg: str) -> None:
        if _out_of_memory(sys.exc_info()[1]):
            # Not the client's fault (nor malformed): 503 + Retry-After, and the connection closes (the parser stopped).
            if self._body_open():
                self._body_refused(OUT_OF_MEMORY, 503)
            else:
                self._refuse(503, "Service Unavailable", OUT_OF_MEMORY, 1)
        elif self._body_open():
            # Inside a chunked body: a bad chunk size, a size of 2^64 or more, too many trailer fields.
            if self._oversized:
                self._body_refused(f"the request's header and trailer fields are larger than {MAX_HEADER_BYTES} "
                                   "bytes", 431)
            elif self._bad_trailer is not None:
                name = self._bad_trailer.decode("latin-1")[:64]
                self._body_refused(f"malformed chunked body: {name!r} may not be sent in its trailer (it frames the "
                                   "request, controls the connection or says how its body is read): send it in the "
                                   "request's headers")
            else:
                self._body_refused(f"malformed chunked body: {sys.exc_info()[1] or msg}"[:200])
        elif self._long_uri:
            self._refuse(414, "URI Too Long", f"the request target is longer than {MAX_HEADER_BYTES} bytes")
        elif self._oversized:
            self._refuse(431, "Request Header Fields Too Large", _TOO_LARGE)
        elif self._bad is not None:  # refused for its complete headers: the log names the path, as it was sent
            self._refuse(*self._bad, path=self.url.partition(b"?")[0].decode("latin-1"))
        else:
            self._refuse(*_parser_refusal(sys.exc_info()[1], msg))

    def _refuse(self, status: int, reason: str, text: str, retry_after: int | None = None, *,
                path: str | None = None) -> None:
        """Answer `status` and close, once the requests before this one are answered (RFC 9112 9.3.2: answers go
        out in order); nothing more is read meanwhile. `path`: the refused request's, for the log."""
        self._disarm()
        if self._refusal is not None or self.transport.is_closing():
            return
        self.refusals.report(status, text, self.transport, path)
        answer = _answer(status, reason, text, retry_after)
        if self.pipeline or (self.cycle is not None and not self.cycle.response_complete):
            self._refusal = answer
            self.flow.pause_reading()
        else:
            self._close_with(answer)

    def _close_with(self, answer: bytes) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._refused = True
            self.transport.write(answer)
            self.transport.close()

    # Closing gently: an answer that closes its connection while the client may still be sending closes it gently,
    # within bounds (serve.linger.LingeringClose), when _unread says so.

    def _unread(self) -> bool:
        """Whether the client may still be sending what has not been read, after an answer that a reset would
        destroy: a body not read to its end, the rest of headers refused (a 431) or of a request begun behind the
        one answered, or requests or bytes waiting behind it. Not after a 408 or an eviction (the client was too
        slow: its place is freed at once), nor for headers still arriving that nothing answered (a stop's drain)."""
        if self._cut_off:
            return False
        body_left = self._in_body and self.cycle is not None and self._body_read_of is not self.cycle
        headers_left = self._in_headers and (self._refused or self._behind)
        return bool(body_left or headers_left or self._unparsed or self.pipeline or self.flow.paused)

    # Deadlines: a request's headers, and a client that takes none of its answer. A connection whose request headers
    # are not complete `limits.seconds` after the request's first byte arrived is closed with a JSON 408; one whose
    # client accepts none of its answer for `limits.seconds` is dropped. A connection on which no request has begun,
    # new or kept alive, is idle: closed silently at the keep-alive timeout (_idle), as nginx closes it. A 408 there
    # would answer no request: a client that pooled the connection read it as the answer to its next one.

    def _answer_owed(self) -> bool:
        """Whether the bytes in flight start a request nobody has answered yet, rather than finish the body of one
        answered early (whose rest is only read and dropped)."""
        return self.cycle is None or self._body_read_of is self.cycle

    def _arm(self, delay: float | None = None) -> None:
        """Start the headers' deadline: `delay` seconds, by default the limits' own."""
        delay = self.limits.seconds if delay is None else delay
        self._header_timer = asyncio.get_running_loop().call_later(delay, self._expired)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expired(self) -> None:
        self._header_timer = None
        if self._answer_owed():
            self._cut_off = True  # too slow: closed at once, not lingering, so that its place is free for others
        if self._probe_only and self._answer_owed():
            self._refuse(503, "Service Unavailable", self.limits.busy, 1)  # a place beyond the limit, not a slow client
        elif self._answer_owed():
            self._refuse(408, "Request Timeout", self.limits.too_slow)
        elif not self.transport.is_closing():
            self.transport.close()  # already answered: the rest of its body is not worth waiting for

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_left = self._unsent()
            self._send_timer = asyncio.get_running_loop().call_later(self.limits.seconds, self._send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._written()

    def when_sent(self, done: Callable[[], None]) -> None:
        """Call `done` once what was written so far has left this connection's write buffer for the kernel (below
        its low-water mark), or the connection is gone: at once if it has already."""
        # A closing transport still sends what it holds (uvicorn closes it in the last send of an answer that ends
        # its connection: `Connection: close`, HTTP/1.0, a half-close, a stop): only a lost one has nothing to wait
        # for, and it is no longer paused then.
        if self._sent_waiters or (self.flow.write_paused and not self._lost):
            self._sent_waiters.append(done)
        else:
            done()

    def _written(self) -> None:
        """Call (once) everything waiting for the written answers to leave the buffer."""
        waiters, self._sent_waiters = self._sent_waiters, []
        for done in waiters:
            done()

    def _unsent(self) -> int:
        """Bytes of answers written that the client has not taken: the write buffer's, and the kernel's queue's
        (it holds megabytes on a fast link, so a slow reader drains it long before the buffer moves)."""
        left = self.transport.get_write_buffer_size()
        if _OUTQ is not None and (sock := self.transport.get_extra_info("socket")) is not None:
            with contextlib.suppress(OSError, ValueError):
                left += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
        return left

    def _send_expired(self) -> None:
        # The client has taken none of the answer for `seconds`: it cannot be answered, only let go. One that took
        # some (a large answer, written whole, read slowly) is given another `seconds`: the limit is on stalling.
        self._send_timer = None
        if (left := self._unsent()) < self._send_left and not self._lost:
            self._send_left = left
            self._send_timer = asyncio.get_running_loop().call_later(self.limits.seconds, self._send_expired)
            return
        self.transport.abort()

    # End of the client's stream: a half-close, or a client that left. A client that half-closes after its HTTP/1.1
    # requests has those it sent whole answered, then the connection closes (EOF_PROBE_S); an EOF while an HTTP/1.0
    # request is owed its answer is a disconnect.

    def eof_received(self) -> bool | None:
        """The client sends nothing more. Requests it sent whole are still answered (then the connection closes);
        one cut short, or an HTTP/1.0 one owed its answer, means it left, and the transport closes, as uvicorn's
        does (every request not answered is then a disconnect)."""
        if self._turned_away or self.lingering or not self._owed_at_eof() or self._owed_to_http10():
            return None  # asyncio closes the transport (lingering: the client read the answer and closed)
        if not self._eof:
            self._eof = True
            self._disarm()  # no request can follow
            self.flow.hold(True)  # nothing more to read, whatever uvicorn resumes
            if self._refusal is None and self.cycle is not None:
                self.cycle.keep_alive = False  # the last answer says `connection: close`, and closes
            self._eof_timer = asyncio.get_running_loop().call_later(EOF_PROBE_S, self._check_client)
        return True  # the transport stays open for the answers

    def _owed_at_eof(self) -> bool:
        """Whether requests read whole (or refused already) wait for their answers, and none is cut short."""
        if self.transport.is_closing():
            return False
        if self._refusal is not None or (self._bad_body is not None and not self._bad_body[0].response_complete):
            return True
        if self._in_headers or self._body_open():
            return False
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _owed_to_http10(self) -> bool:
        """Whether a request read but not yet answered is HTTP/1.0: no probe can tell whether its client is still
        there, and HTTP/1.0 peers close entirely rather than half-close (EOF_PROBE_S)."""
        owed = (self._running, self.cycle, *(c for c, _ in self.pipeline))
        return any(c is not None and not c.response_complete and c.scope.get("http_version") == "1.0" for c in owed)

    def _check_client(self) -> None:
        """After a half-close or a departure (an EOF either way) while answers are owed: send the interim answer
        before the running request's own, once, then look for the reset of a client that left."""
        self._eof_timer = None
        if not self._owed_at_eof():
            return
        if self._probed:
            if self._client_reset():
                self.transport.abort()  # the client is gone, its requests are disconnects
                return
        else:
            self._send_interim()
        self._eof_timer = asyncio.get_running_loop().call_later(EOF_PROBE_S, self._check_client)

    def _client_reset(self) -> bool:
        """Whether the client answered the interim answer with a reset (it left)."""
        sock = self.transport.get_extra_info("socket")
        return sock is not None and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def _send_interim(self) -> None:
        """The interim `100 Continue`, ahead of the running request's own answer, if that one may take it."""
        running = self._running
        if (running is not None and not running.response_started and not running.response_complete
                and running.scope.get("http_version") == "1.1"):  # never a 1xx to HTTP/1.0 (RFC 9110 15.2)
            running.waiting_for_100_continue = False  # this one serves for an `Expect: 100-continue` too
            self.transport.write(_INTERIM)
            self._probed = True
