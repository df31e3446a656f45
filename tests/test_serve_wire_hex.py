"""The HTTP/1.1 wire as a client sees it (hEX's findings), against the real app behind serve.httpproto's protocol, in
process, on tests/fake_runtime.py, over real sockets: refusals of malformed headers give the parser's reason."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator

import fake_runtime
import pytest
from test_serve_fixtures import in_process_server


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> Iterator[int]:
    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("wire") / "fake")
    with in_process_server(bundle) as p:
        yield p


def _answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers (lower-case names) and body of the next answer on `sock` (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    top, _, rest = data.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    while len(rest) < int(headers.get("content-length", 0)):
        piece = sock.recv(65536)
        assert piece
        rest += piece
    return int(lines[0].split()[1]), headers, rest


def _ask(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request)
        return _answer(sock)


@pytest.mark.parametrize("head, reason", [
    (b"POST /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
     "Transfer-Encoding can't be present with Content-Length"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-A : a\r\n\r\n", "Invalid header token"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", "Invalid header value char"),
    (b"GET /v2 HTTP/1.1\nHost: x\n\n", "Expected CRLF after version"),
    (b"GET /v2/\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid char in url path"),
], ids=["cl-and-te", "space-before-colon", "nul-in-value", "bare-lf", "raw-utf8-path"])
def test_a_malformed_request_is_told_the_parsers_reason_in_one_short_line(port, head, reason):
    status, headers, body = _ask(port, head)
    assert status == 400 and headers["content-type"] == "application/json", (status, headers)
    text = json.loads(body)["error"]
    assert text == f"malformed request: {reason}", text


INFER = "/v2/models/fake/infer"


def _chunked_infer(body: bytes, trailer: bytes, headers: bytes = b"") -> bytes:
    """A chunked v2 infer request of `body` in one chunk, with `trailer` (field lines) after its last chunk."""
    return (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n".encode() + headers + b"\r\n"
            + b"%x\r\n" % len(body) + body + b"\r\n0\r\n" + trailer + b"\r\n")


def test_a_trailer_field_is_never_merged_into_the_request_headers(port):
    """RFC 9110 6.5.1: the body's coding and the answer's come from the header section; a trailer field that would
    frame the request or say how to read its body is refused (JSON 400), one that would not is read and ignored."""
    plain = fake_runtime.request_body(1.0)
    packed = gzip.compress(plain)
    status, _, body = _ask(port, _chunked_infer(packed, b"Content-Encoding: gzip\r\n"))
    assert status == 400 and "'Content-Encoding' may not be sent in its trailer" in json.loads(body)["error"], body
    for field in (b"Inference-Header-Content-Length: 0", b"Host: y", b"Content-Type: text/plain"):
        status, _, body = _ask(port, _chunked_infer(plain, field + b"\r\n"))
        assert status == 400 and "may not be sent in its trailer" in json.loads(body)["error"], (field, body)
    status, _, body = _ask(port, _chunked_infer(plain, b"Content-Length: 3\r\n"))  # the parser's own refusal
    assert status == 400 and "Content-Length" in json.loads(body)["error"], body
    status, headers, body = _ask(port, _chunked_infer(plain, b"Accept-Encoding: gzip\r\nX-Note: n\r\n"))
    assert status == 200 and "content-encoding" not in headers, (status, headers)  # the trailer asked, unheard
    assert json.loads(body)["model_name"] == "fake"
    status, headers, _ = _ask(port, _chunked_infer(plain, b"", b"Accept-Encoding: gzip\r\n"))
    assert status == 200 and headers["content-encoding"] == "gzip"  # the header section's own field is heard


@pytest.mark.parametrize("field", [b"Connection: close", b"Proxy-Connection: close", b"Keep-Alive: timeout=1",
                                   b"Upgrade: websocket", b"TE: trailers"])
def test_a_hop_by_hop_trailer_field_is_refused_not_applied(port, field):
    """A trailer's `Connection: close` closed the connection after the answer, unannounced, and the request pipelined
    behind it was never answered: every hop-by-hop field there is a JSON 400 naming it, with `connection: close`."""
    plain = fake_runtime.request_body(1.0)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(_chunked_infer(plain, field + b"\r\n") + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _answer(sock)
    name = field.partition(b":")[0].decode()
    assert status == 400 and headers.get("connection") == "close", (field, status, headers)
    assert f"{name!r} may not be sent in its trailer" in json.loads(body)["error"], body


def test_a_trailer_without_hop_by_hop_fields_keeps_the_connection_for_the_next_request(port):
    plain = fake_runtime.request_body(1.0)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(_chunked_infer(plain, b"X-Note: n\r\n")
                     + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while piece := sock.recv(65536):  # to the close the second request asked for
            data += piece
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 2 and data.endswith(b'{"live":true}'), data


@pytest.mark.parametrize("host", [b"a b c", b"a/b", b"[::1", b"x@y", b"%00", b"a:99999999", b"a:65536", b"[::1]x",
                                  b"[fe80::1%25eth0]", b"[1.2.3.4]", b"a:-1", b"a:b", b"a\"b"])
def test_an_invalid_host_value_is_a_json_400(port, host):
    status, headers, body = _ask(port, b"GET /v2 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json", (host, status)
    assert json.loads(body)["error"].startswith("invalid Host header: "), body


def test_an_invalid_host_value_is_told_what_is_wrong_with_it(port):
    status, _, body = _ask(port, b"GET /v2 HTTP/1.1\r\nHost: host:80:80 \r\n\r\n")
    assert status == 400 and json.loads(body)["error"] == (
        "invalid Host header: 'host:80:80' is not host[:port]: it has more than one ':' (an IPv6 address goes in "
        "brackets: [::1]:8000)"), body


@pytest.mark.parametrize("host", [b"", b"localhost", b"localhost:8000", b"127.0.0.1:0", b"example.com:65535",
                                  b"[::1]", b"[::1]:80", b"[v1.x]", b"my_host.local", b"a%2Db",
                                  b"xn--bcher-kva.example", b"a:", b"localhost ", b"localhost:8000\t",
                                  b" \t[::1]:80 "])
def test_a_valid_host_value_is_served(port, host):
    """RFC 9112 5: the whitespace around a field value (OWS) is no part of it: `localhost ` was refused."""
    status, _, body = _ask(port, b"GET /v2 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status == 200, (host, body)


@pytest.mark.parametrize("path, fields, status, says", [
    (INFER, b"Content-Encoding: br\r\n", 415, "unsupported Content-Encoding 'br'"),
    (INFER, b"Inference-Header-Content-Length: -1\r\n", 400, "must be a decimal integer, got '-1'"),
    ("/v1/models/fake/classify", b"Content-Type: image/png\r\nContent-Encoding: br\r\n", 415,
     "unsupported Content-Encoding 'br'"),
], ids=["v2-coding", "v2-header-length", "v1-coding"])
def test_what_the_headers_alone_refuse_is_answered_before_100_continue(port, path, fields, status, says):
    """RFC 9110 10.1.1: a server may answer at once instead of asking for a body it would throw away."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nExpect: 100-continue\r\n".encode()
                     + fields + b"\r\n")
        got, headers, body = _answer(sock)  # the first answer: the refusal, not `100 Continue`
    assert got == status and says in json.loads(body)["error"], (got, body)
