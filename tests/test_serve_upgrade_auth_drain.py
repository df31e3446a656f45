"""What a raw client can do to the framing of `python -m serve` (serve.httpproto, serve.middleware), over real sockets:

- a request with `Connection: Upgrade` (websocket, h2c, anything) is the same request without it: its body is its
  body (the parser alone dispatched it bodiless and then read the body as the next request: smuggling), requests
  pipelined after it are answered in order, and the connection stays usable; CONNECT is refused without a desync;
- an answer given before the body was read (a 401, a 404) does not make the server read and drop an endless or huge
  body on a kept connection: it closes, within the lingering close's bounds, and a kept connection drops a bounded
  amount of answered bodies in all;
- more than one Authorization header is a 400, and only the documented paths are open without the key; a chunk-size
  line that announces more than --max-body-bytes is a 413 at once; HTTP/1.0 with Transfer-Encoding is a 400.

Real servers of tests/fake_runtime.py."""

from __future__ import annotations

import json
import socket
import time

import fake_runtime
import pytest
from test_serve_fixtures import fake_server

from serve.chunked import ChunkSizes
from serve.http_limits import lingering_bytes

KEY = "sekrit"
AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
LIMIT = 1_000_000  # --max-body-bytes
LINGER = lingering_bytes(LIMIT)  # what a lingering close, or a kept connection's drops, read at most
SMUGGLED = b"GET /v2/health/ready?SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"
INDEX_ERROR = "the index request body must be a JSON object"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upgrade")
    bundle = fake_runtime.write_bundle(tmp / "fake")
    with fake_server(bundle, tmp, "--api-key", KEY, "--max-body-bytes", str(LIMIT),
                     "--receive-timeout-s", "5") as s:
        yield s


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _answers(sock: socket.socket, n: int, wait: float = 3.0, settle: float = 0.3
             ) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Up to `n` answers read from `sock` within `wait` s (each Content-Length framed), and whether the server closed
    the connection (looked for `settle` s more once `n` are in)."""
    data, answers = b"", []
    deadline = time.monotonic() + wait
    while True:
        while b"\r\n\r\n" in data:
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
            size = int(headers.get("content-length", 0))
            if len(rest) < size:
                break
            answers.append((int(lines[0].split()[1]), headers, rest[:size]))
            data = rest[size:]
        left = deadline - time.monotonic() if len(answers) < n else settle
        if left <= 0:
            return answers, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return answers, False
        except ConnectionResetError:
            return answers, True
        if not chunk:
            return answers, True
        data += chunk


def _send(sock: socket.socket, parts: list[bytes], bytewise: bool = False) -> None:
    """Send `parts` one write each, a moment apart (or, bytewise, every byte of all but the first apart)."""
    for i, part in enumerate(parts):
        pieces = [part[j:j + 1] for j in range(len(part))] if bytewise and i else [part]
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(0.002 if bytewise else 0.1)


def _index_request(body: bytes, upgrade: str | None, chunked: bool, version: str = "1.1") -> tuple[bytes, bytes]:
    """A POST /v2/repository/index: its head and its framed body."""
    head = f"POST /v2/repository/index HTTP/{version}\r\nHost: x\r\n".encode() + AUTH
    if upgrade is not None:
        head += (f"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n"
                 "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n").encode()
    if chunked:
        split = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:split], body[split:])) + b"0\r\n\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n", framed
    return head + b"Content-Length: %d\r\n\r\n" % len(body), body


READY = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("upgrade", ["websocket", "h2c", "foo"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("delivery", ["one-write", "body-later", "bytewise"])
def test_an_upgrade_request_is_read_as_the_same_request_without_it(server, upgrade, chunked, delivery):
    """Its body (here a request of its own, with the CRLF CRLF that ends headers) is its body: the route refuses it as
    not JSON, nothing answers the smuggled request, the pipelined request after it is answered, in order, and the
    connection carries another request after that."""
    head, body = _index_request(SMUGGLED, upgrade, chunked)
    with _connect(server) as sock:
        if delivery == "one-write":
            _send(sock, [head + body + READY])
        else:
            _send(sock, [head, body + READY], bytewise=delivery == "bytewise")
        answers, _ = _answers(sock, 2, settle=0)
        assert [a[0] for a in answers] == [400, 200], answers
        assert INDEX_ERROR in json.loads(answers[0][2])["error"]
        assert json.loads(answers[1][2]) == {"ready": True}
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        answers, _ = _answers(sock, 1, settle=0.05)  # answers come in order: a smuggled one would come first
        assert [json.loads(a[2]) for a in answers] == [{"live": True}], answers


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_an_upgrade_request_with_a_good_body_and_one_without_a_body_are_answered_as_plain_http(server, version):
    """The body reaches the route (a good one: 200 with the index, HTTP/1.0 too); a bodiless GET with Upgrade is
    followed by the request pipelined in the same write (it was dropped)."""
    head, body = _index_request(b'{"ready": true}', "h2c", chunked=False, version=version)
    if version == "1.0":
        head = head.replace(b"Connection: Upgrade,", b"Connection: keep-alive, Upgrade,")
    with _connect(server) as sock:
        _send(sock, [head, body])
        answers, _ = _answers(sock, 1)
        assert answers[0][0] == 200 and isinstance(json.loads(answers[0][2]), list), answers
    with _connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n" + READY)
        answers, closed = _answers(sock, 2)
        assert [a[0] for a in answers] == [200, 200] and not closed, answers
        assert json.loads(answers[1][2]) == {"ready": True}


def test_connect_is_refused_and_its_body_never_read_as_a_request(server):
    """CONNECT (either form) is one JSON 400 and the connection closes: what follows it is never answered."""
    for target in (b"example.com:443", b"/v2/health/live"):
        with _connect(server) as sock:
            _send(sock, [b"CONNECT " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED),
                         SMUGGLED])
            answers, closed = _answers(sock, 2, wait=1.5)
            assert [a[0] for a in answers] == [400] and closed, answers
            assert "CONNECT" in json.loads(answers[0][2])["error"]


def _stream(sock: socket.socket, head: bytes, piece: bytes, most: int) -> int:
    """Send `head`, then `piece` on and on until the server stops taking it or `most` bytes went; bytes sent."""
    sock.sendall(head)
    sent = 0
    try:
        while sent < most:
            sock.sendall(piece)
            sent += len(piece)
    except OSError:
        pass
    return sent


@pytest.mark.parametrize("framing", ["content-length", "chunked", "1-byte chunks"])
def test_a_401_before_the_body_does_not_read_it_without_bound(server, framing):
    """Without the key, a huge or endless body after the 401 is read and dropped only up to the lingering close's
    byte bound (it was read on, a core's worth, until the 60 s deadline); the client reads its 401 first."""
    head = b"POST /v2/models/fake/infer HTTP/1.1\r\nHost: x\r\n"
    if framing == "content-length":
        head, piece = head + b"Content-Length: 100000000000\r\n\r\n", b"x" * 65536
    elif framing == "chunked":
        head, piece = head + b"Transfer-Encoding: chunked\r\n\r\n", b"10000\r\n" + b"x" * 65536 + b"\r\n"
    else:
        head, piece = head + b"Transfer-Encoding: chunked\r\n\r\n", b"1\r\nx\r\n" * 10000
    with _connect(server) as sock:
        sent = _stream(sock, head, piece, 8 * LINGER)
        assert sent < 3 * LINGER, sent  # the bound plus what socket buffers hold
    with _connect(server) as sock:
        sock.sendall(head + piece)
        answers, closed = _answers(sock, 1)
        assert answers[0][0] == 401 and answers[0][1]["connection"] == "close" and closed, answers


def test_early_answers_close_when_the_rest_is_unbounded_and_kept_connections_drop_a_bounded_amount(server):
    """A 401 to a body still to come closes even when it is small; a 404 keeps the connection for a declared body
    (up to twice the limit, as a 413 at once does) but closes for a chunked one; and a kept connection that is sent
    one such body after another closes once it has dropped the lingering close's bound."""
    with _connect(server) as sock:
        _send(sock, [b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"])
        answers, _ = _answers(sock, 1)
        assert answers[0][0] == 401 and answers[0][1]["connection"] == "close", answers
    for chunked, kept in ((False, True), (True, False)):
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % LIMIT
        with _connect(server) as sock:
            _send(sock, [b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\n" + AUTH + framing + b"\r\n\r\n"])
            answers, _ = _answers(sock, 1)
            assert answers[0][0] == 404 and (answers[0][1].get("connection") == "close") != kept, answers
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * LIMIT)
    with _connect(server) as sock:
        sent = _stream(sock, b"", request + b"x" * (2 * LIMIT), 8 * LINGER)
        assert sent < 3 * LINGER, sent


@pytest.mark.parametrize("order", ["wrong first", "right first"])
def test_more_than_one_authorization_header_is_a_400(server, order):
    keys = [b"Authorization: Bearer wrong\r\n", AUTH]
    if order == "right first":
        keys.reverse()
    with _connect(server) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(keys) + b"\r\n")
        answers, _ = _answers(sock, 1)
        assert answers[0][0] == 400 and "Authorization" in json.loads(answers[0][2])["error"], answers


def test_the_open_paths_are_the_documented_ones(server):
    """Health and the docs pages --help and the README name; not Swagger UI's OAuth2 redirect page."""
    for path, status in (("/docs", 200), ("/openapi.json", 200), ("/v2/health/live", 200),
                         ("/docs/oauth2-redirect", 401)):
        with _connect(server) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answers, _ = _answers(sock, 1, settle=0)
            assert answers[0][0] == status, (path, answers[0][:2])


def test_a_chunk_announced_past_the_limit_is_a_413_at_once(server):
    """One chunk over the limit, or one that takes the announced total past it, is refused before its data comes
    (it was waited for until the body deadline); HTTP/1.0 with Transfer-Encoding is a 400 (RFC 9112 6.1)."""
    head = b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
    half = b"x" * (LIMIT // 2 + 1)
    for body in (b"FFFFFFFFFFFF\r\nabc", b"%x\r\n%s\r\n%x;ext=1\r\n" % (len(half), half, len(half))):
        with _connect(server) as sock:
            _send(sock, [head, body])
            started = time.monotonic()
            answers, closed = _answers(sock, 1, wait=2.0)
            assert answers and answers[0][0] == 413 and closed, answers
            assert f"limit of {LIMIT} bytes" in json.loads(answers[0][2])["error"]
            assert time.monotonic() - started < 1.5
    with _connect(server) as sock:
        sock.sendall(b"POST /v2/repository/index HTTP/1.0\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
                     b"2\r\n{}\r\n0\r\n\r\n")
        answers, closed = _answers(sock, 1)
        assert answers[0][0] == 400 and "HTTP/1.0" in json.loads(answers[0][2])["error"] and closed, answers


def test_chunk_sizes_are_followed_however_the_body_is_cut():
    """The sizes the chunk-size lines announce, with extensions and leading zeros, one byte at a time or at once."""
    body = b"5;a=b\r\nhello\r\n0010\r\n" + b"y" * 16 + b"\r\n1A; q=\"x;y\"\r\n" + b"z" * 26 + b"\r\n0\r\nT: 9\r\n\r\n"
    last = body.index(b"0\r\nT") + 3  # the end of the last chunk's size line
    for step in (1, 3, len(body)):
        sizes = ChunkSizes()
        seen = []
        for i in range(0, len(body), step):
            end, announced = sizes.feed(body[i:i + step])
            if announced:
                seen.append(sizes.announced)
            assert end == min(step, max(0, last - i)), (step, i, end)  # it stops at the last chunk's line
        assert sizes.announced == 5 + 16 + 26 and seen[-1] == 47, (step, seen)
    huge = ChunkSizes()
    assert huge.feed(b"00000000FFFFFFFFFFFFFFFFF\r\n")[1] and huge.announced >= 1 << 64
