"""Pure-ASGI middleware for the hard edges every route shares: access log + request metrics, auth, body limit."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve import workpool
from serve.errors import APIError, ClientGone
from serve.http_limits import host_port, logged_path
from serve.metrics import NOT_IN_FLIGHT, UNKNOWN_MODEL, Metrics
from serve.responses import error_response
from serve.timing import server_timing

access_log = logging.getLogger("vitc.access")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._~:/+=@-]")
CLIENT_CLOSED = 499  # nginx's "client closed request": counted and logged, never sent
# The path templates whose every answer, errors too, carries Server-Timing (v1 classify, v2 infer and its version).
INFERENCE_ROUTES = ("/classify", "/infer")
# Characters of a request's method in a log line (its path's: serve.http_limits.LOGGED_PATH, its length logged beside
# a cut one): the request line may be 64 KiB, and a percent-encoded control byte (3 bytes sent) is 6 in JSON.
LOGGED_METHOD = 32
log = logging.getLogger("vitc.serve")


class BodyTooLarge(APIError):
    """The request body passed the configured limit."""

    def __init__(self, limit: int) -> None:
        # The rest of the body may still be on its way: the connection cannot carry another request.
        super().__init__(413, f"request body is larger than the limit of {limit} bytes", {"Connection": "close"})


class AccessLogMiddleware:
    """Request id, in-flight gauge, request counter and latency by model/endpoint/status, one JSON log line."""

    # Also the last guard: an unexpected exception becomes a JSON 500 here, and the connection stays usable.

    def __init__(self, app: ASGIApp, metrics: Metrics, known_models: Callable[[], Collection[str]],
                 enabled: bool = True, templates: Collection[tuple[re.Pattern[str], str]] = ()) -> None:
        self.app, self.metrics, self.known_models, self.enabled = app, metrics, known_models, enabled
        self.templates = tuple(templates)

    def _route_of(self, scope: Scope) -> tuple[str, str | None]:
        """The path template and model name of a request, also when it was answered before routing (401, 413)."""
        route, params = scope.get("route"), scope.get("path_params") or {}
        if route is None:
            for regex, template in self.templates:
                if match := regex.match(scope["path"]):
                    return template, match.groupdict().get("name")
            return "other", None
        return getattr(route, "path", None) or "other", params.get("name")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or ())
        request_id = request_id_of(headers.get(b"x-request-id", b""))
        status, started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                extra = [(b"x-request-id", request_id.encode("latin-1"))]
                inference = self._route_of(scope)[0].endswith(INFERENCE_ROUTES)
                if timing := server_timing(scope, time.perf_counter() - start, inference):
                    extra.append((b"server-timing", timing))
                message["headers"] = [*message["headers"], *extra]
            await send(message)

        counted = scope["path"] not in NOT_IN_FLIGHT  # the scrape and the probes: an idle server reads 0
        if counted:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except (ClientDisconnect, ClientGone) as exc:
            # The client closed the connection (mid-upload, or while its request waited): nobody to answer.
            status = CLIENT_CLOSED
            if isinstance(exc, ClientDisconnect):
                name = self._route_of(scope)[1]
                model = name if name in self.known_models() else UNKNOWN_MODEL if name else ""
                self.metrics.disconnects.labels(model, "upload").inc()
        except Exception as exc:
            log.exception("unhandled error", extra={**logged_path(scope["path"]), "request_id": request_id})
            if started:
                raise
            await error_response(500, f"internal error ({type(exc).__name__})")(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what is still running when the graceful shutdown times out (a stalled upload, say):
            # answer a JSON 503 rather than letting uvicorn write a plain-text 500. Once answered, the request
            # ends here (re-raising would only make uvicorn log a traceback); unanswered, the cancellation goes on.
            status = 503
            if started:
                raise
            try:
                # Retry-After as every other 503: another replica (or this one restarted) takes the retry.
                await error_response(503, "the server is shutting down", {"Connection": "close", "Retry-After": "1"})(
                    scope, receive, send_with_id)
            except Exception:
                raise asyncio.CancelledError from None
        finally:
            if counted:
                self.metrics.in_flight.dec()
            if status != CLIENT_CLOSED and (unanswered := scope.get("vitc.unanswered")) and unanswered():
                status = CLIENT_CLOSED  # the client left before any of the answer went out (serve.httpproto)
            seconds = time.perf_counter() - start
            endpoint, name = self._route_of(scope)
            model = "" if name is None else name if name in self.known_models() else UNKNOWN_MODEL
            self.metrics.requests.labels(model, endpoint, str(status)).inc()
            self.metrics.latency.labels(model, endpoint).observe(seconds)
            if self.enabled:
                # Every field is bounded: the model is a known name or "_unknown", as in the metrics (the path
                # shows what was asked for), and the request id is already cleaned and cut.
                access_log.info("request", extra={
                    "method": scope["method"][:LOGGED_METHOD], **logged_path(scope["path"]), "status": status,
                    "duration_ms": round(seconds * 1000, 3), "model": model or None, "request_id": request_id,
                    "client": logged_client(scope),
                })


def logged_client(scope: Scope) -> str | None:
    """The access log's `client`: the peer's `host:port` (`[v6]:port`), or the address a trusted proxy forwarded."""
    # uvicorn puts a trusted peer's X-Forwarded-For in the scope's `client` unchecked, with port 0 when the header
    # gave none: it is logged only when it is an IP address (else any process on the proxy's host could log any
    # text as the client), without a port unless the header gave one; otherwise the peer's own address is logged.
    client = scope.get("client")
    peer = scope.get("vitc.peer", client)  # the connection's peer (serve.httpproto), before any forwarding
    if client and client != peer:
        # An IPv6 zone (`fe80::1%eth0`) names an interface of the proxy's host, and may be any text: left out.
        host, port = str(client[0]).partition("%")[0], client[1]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            client = peer
        else:
            return host_port(host, port if 0 < port < 65536 else None)
    return host_port(str(client[0]), client[1]) if client else None


class HeadMiddleware:
    """HEAD is GET without the body (RFC 9110 9.3.2): routed as GET; uvicorn, which still sees HEAD, drops the
    body and keeps the headers. FastAPI's routes answer only the methods they declare."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        inner = {**scope, "method": "GET"}
        try:
            await self.app(inner, receive, send)
        finally:
            # The access log reads the route and model name that routing set on the scope it was given.
            scope.update({k: inner[k] for k in ("route", "path_params") if k in inner})


def request_id_of(raw: bytes) -> str:
    """The client's X-Request-Id reduced to a safe header value (visible ASCII, at most 64), else a fresh one."""
    cleaned = _UNSAFE_ID.sub("", raw.decode("latin-1"))[:64]
    return cleaned or uuid.uuid4().hex[:16]


def expects_continue(scope: Scope) -> bool:
    """Whether the request waits for `100 Continue` before sending its body: `Expect: 100-continue` in HTTP/1.1 (an
    HTTP/1.0 request's is ignored, RFC 9110 10.1.1: no 1xx may go to it, serve.httpproto)."""
    return scope.get("http_version") != "1.0" and any(
        k == b"expect" and b"100-continue" in v.lower() for k, v in scope.get("headers") or ())


def _closes(headers: Collection[tuple[bytes, bytes]]) -> bool:
    """Whether request or response `headers` say `Connection: close`."""
    return any(k.lower() == b"connection" and b"close" in v.lower() for k, v in headers)


def _has_body(headers: Collection[tuple[bytes, bytes]]) -> tuple[bool, int | None]:
    """Whether request `headers` announce a body, and its declared length (None: chunked, or not a number)."""
    length: int | None = 0
    for k, v in headers:
        if k == b"transfer-encoding":
            return True, None
        if k == b"content-length":
            length = int(v) if v.strip().isdigit() else None
    return length != 0, length


class EarlyAnswerMiddleware:
    """Close the connection after an answer begun before the request's body was read, unless the rest is cheap."""

    # An answer begun before the request's body was read to its end (a 401, a 404, a 413 at once) keeps its
    # connection only where the rest of the body is worth reading and dropping for it, as a 413 at once decides: a
    # declared Content-Length of at most twice `max_bytes`, and never after a 401 (a client without the key is owed
    # no such service), nor where the rest may take the connection past what a kept connection drops, all its
    # requests together (`vitc.drop_left`). Otherwise it closes the connection, gently: serve.httpproto's lingering
    # close reads and drops what the client still sends within its bounds in bytes and time. On a kept connection
    # an endless chunked body or a huge Content-Length would be read and dropped to its end, costing the client
    # bandwidth and the server a core. An answer given before an `Expect: 100-continue` body was asked for closes
    # too: the client may never send that body (RFC 9110 10.1.1), and its next request would be read as it.

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or ()
        body, length = _has_body(headers)
        expects = expects_continue(scope)
        if not body and not expects:  # most requests: nothing to watch
            await self.app(scope, receive, send)
            return
        asked = read = False

        async def reading() -> Message:
            nonlocal asked, read
            asked = True  # uvicorn sends `100 Continue` now
            message = await receive()
            read = read or (message["type"] == "http.request" and not message.get("more_body", False))
            return message

        def closes(status: int) -> bool:
            """Whether an answer of `status` begun now must close the connection."""
            if expects and not asked:
                return True
            unread = scope.get("vitc.body_unread")  # the parser's word (serve.httpproto), else the app's reads
            if not body or read or (unread is not None and not unread()):
                return False
            if status == 401 or length is None or length > 2 * self.max_bytes:
                return True
            # The connection closes once it has dropped its bound of answered bodies: an answer after which the rest
            # of this one may take it there says so, rather than leave the client's next request to an EOF.
            left = scope.get("vitc.drop_left")
            return left is not None and length > left()

        async def early_send(message: Message) -> None:
            if (message["type"] == "http.response.start" and not _closes(message.get("headers", ()))
                    and closes(message["status"])):
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, reading, early_send)


class AuthMiddleware:
    """Bearer-token check on every path except the open ones (health); more than one Authorization header is a 400
    on every path (as nginx answers): a gateway that checks one of them while this server checked another would let
    a request through that neither meant to."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: Collection[str]) -> None:
        self.app = app
        self.key = api_key.encode()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope.get("headers") or () if k == b"authorization"]
        if len(given) > 1:
            await error_response(400, f"{len(given)} Authorization headers (send one)")(scope, receive, send)
            return
        if scope["path"] not in self.open_paths:
            auth = given[0] if given else b""
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                reason = "missing or invalid bearer token (send 'Authorization: Bearer <api key>')"
                await error_response(401, reason, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTimeout(APIError):
    """The request body did not arrive in time (a stalled or trickling client)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s", {"Connection": "close"})


class BodiesFull(APIError):
    """The bodies being received and held, all requests together, would pass the server's budget."""

    def __init__(self, limit: int) -> None:
        super().__init__(503, f"the server holds its limit of {limit} bytes of request bodies; retry shortly",
                         {"Retry-After": "1", "Connection": "close"})


TRIM_BYTES = 64 << 20  # after bodies this big at once are answered, freed memory goes back to the system


class BodyBudget:
    """Bytes of request bodies held at once, all requests together (the event loop's only: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0
        self._peak = 0  # the most held since memory was last given back

    def take(self, n: int) -> bool:
        """Reserve `n` more bytes; False (nothing reserved) when that would pass the limit."""
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self._peak = max(self._peak, self.held)
        self.held -= n
        if self._peak >= TRIM_BYTES and self.held <= self._peak // 4:
            # A burst of bodies is over: hand their memory back (glibc keeps freed arenas otherwise; a gzip storm
            # left 1.2 GB resident until a big image's decode happened to trim).
            self._peak = self.held
            workpool.trim()

    def free(self) -> int:
        """Bytes that can still be reserved."""
        return self.limit - self.held


class BodyHold:
    """What one request holds of the body budget beyond its bytes on the wire (its body once inflated from a
    Content-Encoding), given back with them when it is answered."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.held = budget, 0

    def take(self, n: int) -> None:
        """Hold `n` more bytes, or raise BodiesFull (503)."""
        if not self.budget.take(n):
            raise BodiesFull(self.budget.limit)
        self.held += n


def body_hold(scope: Scope) -> BodyHold | None:
    """The request's hold on the body budget (None outside BodyLimitMiddleware)."""
    return scope.get("vitc.body_hold")


class BodyLimitMiddleware:
    """Bound request bodies: 413 over `max_bytes`, 408 past `timeout_s`, 503 when all held would pass `budget`."""

    # `max_bytes` is checked on the declared length and on what is streamed. Each request's body bytes count against
    # the budget from their arrival until its answer is sent (a declared length that does not fit what is free is
    # refused at once), and so does the body inflated from a Content-Encoding (`body_hold`), so slow or stalled
    # uploads and gzip bodies can hold neither unbounded memory nor a connection forever, and headers alone hold
    # nothing.

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 60.0, budget: BodyBudget | None = None
                 ) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.budget = budget or BodyBudget(1 << 62)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        length = 0
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await error_response(400, "invalid Content-Length header")(scope, receive, send)
                return
            if length > self.max_bytes:
                # Decided from the header, answered at once (a body that never comes is not waited for). Up to twice
                # the limit, on a connection that may stay open, uvicorn's parser reads the rest of the body and
                # drops it (as after any answer given before the body), and the connection carries the next request.
                # Otherwise the answer closes the connection: a client waiting on `Expect: 100-continue` sends
                # nothing, a body past twice the limit is not worth keeping the connection for, and HTTP/1.0 or
                # `Connection: close` close anyway; so does any answer once a stop began (serve.httpproto). What the
                # client still sends is then read and dropped, within bounds, before the close (serve.httpproto's
                # lingering close): it reads the 413 rather than a reset.
                big = BodyTooLarge(self.max_bytes)
                kept = (not expects_continue(scope) and length <= 2 * self.max_bytes
                        and scope.get("http_version") != "1.0" and not _closes(scope.get("headers") or ()))
                await error_response(big.status, big.reason, None if kept else big.headers)(scope, receive, send)
                return
        if length > self.budget.free():
            # Refused before a byte is read (also before `100 Continue`), but nothing is reserved for a declared
            # length: bytes count from their arrival, so headers alone (a stalled client) hold none of the budget.
            full = BodiesFull(self.budget.limit)
            await error_response(full.status, full.reason, full.headers)(scope, receive, send)
            return
        reserved, received, complete = 0, 0, length == 0 and b"chunked" not in headers.get(
            b"transfer-encoding", b"").lower()
        # A chunked body's chunk-size lines announce what is coming (serve.httpproto): one past the limit is refused
        # at once, as a Content-Length past it is, rather than read until its bytes pass the limit.
        announced = scope.get("vitc.body_announced")
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, reserved, complete
            if complete:  # the body is in: what is left to receive is the disconnect, with no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes or (announced is not None and announced() > self.max_bytes):
                    # Answered at once, closing the connection: the rest of the body is read and dropped, within
                    # bounds, by the lingering close (serve.httpproto), so the client reads the 413.
                    raise BodyTooLarge(self.max_bytes)
                if received > reserved:  # reserved as it arrives
                    if not self.budget.take(received - reserved):
                        raise BodiesFull(self.budget.limit)
                    reserved = received
            return message

        hold = scope["vitc.body_hold"] = BodyHold(self.budget)
        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.budget.give(reserved + hold.held)
