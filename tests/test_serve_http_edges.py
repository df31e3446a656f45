"""HTTP edges of a real server: stalled and trickling uploads, the bodies all requests hold at once, HEAD, content
codings on /v1, cut multipart forms, hostile repository-index bodies, SIGTERM during an upload, JSON-only logs.

The backend is tests/fake_runtime.py (plugged in with VITC_RUNTIMES), so no runtime work slows the checks down.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import socket
import time
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import animal_pngs, start_server

from serve.server import connections_fitting, files_needed

CLASSIFY = "/v1/models/fake/classify"
# --receive-timeout-s of the servers whose deadlines the tests wait for (stalled bodies and headers, a reader that
# stops): long enough for the requests a test sends before a deadline, short enough not to wait on it for long.
RECEIVE_S = 1.5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("edges") / "fake")


def _open_upload(url: str, length: int, sent: bytes = b"x" * 10) -> socket.socket:
    """A POST that declares `length` body bytes and sends only `sent`: a stalled client."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(f"POST {CLASSIFY} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response (Content-Length framed), read until the server closes or
    the body is complete."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def test_stalled_uploads_time_out_and_bodies_held_at_once_are_bounded(bundle, tmp_path):
    args = ["--model", f"fake={bundle}", "--backend", "fake", "--max-body-bytes", str(1 << 20),
            "--max-buffered-bytes", str(2 << 20), "--receive-timeout-s", str(RECEIVE_S)]
    with start_server(args, tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        png = animal_pngs(1)[0]
        # Uploads that sent only their headers hold none of the 2 MiB budget: a full-size body still passes.
        idle = [_open_upload(server.url, 1 << 20, b"") for _ in range(4)]
        time.sleep(0.3)
        assert client.post(CLASSIFY, content=b"\0" * ((1 << 20) - 100),
                           headers={"content-type": "image/png"}).status_code == 400  # not an image, but read
        for sock in idle:
            sock.close()
        # Two stalled uploads that sent most of their 1 MiB hold most of the budget. A third body that does not fit
        # is refused at once, before a byte of it is read; small requests without a body still pass.
        t0 = time.monotonic()
        stalled = [_open_upload(server.url, 1 << 20, b"x" * ((1 << 20) - 10)) for _ in range(2)]
        time.sleep(0.3)
        r = client.post(CLASSIFY, content=png, headers={"content-type": "image/png"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert "request bodies" in r.json()["error"]
        assert client.get("/v2/health/ready").status_code == 200
        # A chunked stream is counted as it arrives.
        chunks = (png for _ in range(1))
        r = client.post(CLASSIFY, content=chunks, headers={"content-type": "image/png"})
        assert r.status_code == 503, r.text
        # The stalled clients get a JSON 408 at the body deadline, and their connections are closed.
        for sock in stalled:
            status, headers, body = _read_response(sock)
            assert status == 408 and headers["connection"] == "close", (status, headers)
            assert f"did not arrive within {RECEIVE_S:g} s" in json.loads(body)["error"]
            assert _closed_by_server(sock)
            sock.close()
        assert RECEIVE_S - 0.5 < time.monotonic() - t0 < 20
        # Their bytes are given back: a full-size body fits again, and a trickle is cut at the same deadline.
        assert client.post(CLASSIFY, content=png, headers={"content-type": "image/png"}).status_code == 200
        trickle = _open_upload(server.url, 1000, b"")
        t0 = time.monotonic()
        for _ in range(6):
            try:
                trickle.sendall(b"x")
            except OSError:
                break
            time.sleep(0.5)
        status, _, _ = _read_response(trickle)
        trickle.close()
        assert status == 408 and time.monotonic() - t0 < 10
        # Headers get the same deadline: a connection that stops inside its headers (also on a kept-alive connection
        # after a first answer) is answered 408 and closed. (One that sends nothing is idle: test_serve_protocol_heg.)
        host, port = server.url.removeprefix("http://").split(":")
        partial = socket.create_connection((host, int(port)), timeout=30)
        partial.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")
        kept = socket.create_connection((host, int(port)), timeout=30)
        kept.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(kept)[0] == 200
        kept.sendall(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
        piped = socket.create_connection((host, int(port)), timeout=30)  # pipelined behind a complete request
        piped.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
        assert _read_response(piped)[0] == 200
        t0 = time.monotonic()
        for sock in (partial, kept, piped):
            status, headers, body = _read_response(sock)
            assert status == 408 and "headers did not arrive" in json.loads(body)["error"]
            assert _closed_by_server(sock)
            sock.close()
        assert time.monotonic() - t0 < 10
        # Headers are bounded in size too: an endless header is a JSON 431, not a growing buffer.
        endless = socket.create_connection((host, int(port)), timeout=30)
        endless.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(40):
                endless.sendall(b"a" * 4096)
        except OSError:
            pass  # closed by the server mid-stream
        status, _, body = _read_response(endless)
        endless.close()
        assert status == 431 and "headers are larger" in json.loads(body)["error"]
        # A complete request whose headers arrive whole in one read is measured too.
        r = client.get("/v2/health/live", headers={"X-Big": "a" * 70_000})
        assert r.status_code == 431 and r.json()["error"]
        assert client.get("/v2/health/live", headers={"X-Big": "a" * 60_000}).status_code == 200
        # What uvicorn's parser refuses (a request smuggling attempt) is a JSON 400 as well.
        smuggle = socket.create_connection((host, int(port)), timeout=30)
        smuggle.sendall(b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        status, headers, body = _read_response(smuggle)
        smuggle.close()
        assert status == 400 and headers["content-type"] == "application/json" and json.loads(body)["error"]
        # An answer given before the body was read (unknown model) is the only answer: the rest of the body is
        # dropped, and no second, unsolicited 408 follows it.
        early = socket.create_connection((host, int(port)), timeout=30)
        early.sendall(b"POST /v1/models/nope/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
        status, _, _ = _read_response(early)
        assert status == 404
        for _ in range(8):
            try:
                early.sendall(b"x" * 1000)
            except OSError:
                break
            time.sleep(0.5)
        early.settimeout(10)
        try:
            rest = early.recv(65536)
        except (ConnectionResetError, TimeoutError):
            rest = b""
        early.close()
        assert b"HTTP/1.1" not in rest, rest[:200]
        # The rest of an early-answered body is that body, however big the read that ends it: the next request on
        # the connection is answered (it got the 431 meant for headers over 64 KiB).
        again = socket.create_connection((host, int(port)), timeout=30)
        again.sendall(b"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 250000\r\n\r\n" + b" " * 100)
        assert _read_response(again)[0] == 404
        again.sendall(b" " * 249_900 + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = _read_response(again)
        again.close()
        assert status == 200, body
        # The budget's accounting returns to zero: two full bodies at once are taken.
        big = b"\0" * ((1 << 20) - 100)
        with httpx.Client(base_url=server.url, timeout=30) as other:
            for c in (client, other):
                assert c.post(CLASSIFY, content=big, headers={"content-type": "image/png"}).status_code == 400
    assert "Traceback" not in server.logs()


def test_head_codings_multipart_and_index_bodies(bundle, tmp_path):
    with start_server(["--model", f"fake={bundle}", "--backend", "fake"], tmp_path / "server.log",
                      fake_runtime.server_env(tmp_path)) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        # HEAD is GET without the body, on every GET route (load balancers probe health with it).
        for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/fake", "/v1/models", "/metrics"):
            get, head = client.get(path), client.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
        assert client.head("/v2/models/nope").status_code == 404
        assert client.head(CLASSIFY).status_code == 405  # a POST-only route
        r = client.post("/v2/health/live")  # a GET route says it takes HEAD too
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD" and r.json()["error"]
        # An Upgrade request is plain HTTP here, and no warning per request floods the log.
        r = client.get("/v2/health/live", headers={"connection": "Upgrade", "upgrade": "websocket"})
        assert r.status_code == 200

        png = animal_pngs(1)[0]
        plain = client.post(CLASSIFY, content=png, headers={"content-type": "image/png"})
        assert plain.status_code == 200
        for coding, body in (("gzip", gzip.compress(png)), ("deflate", __import__("zlib").compress(png)),
                             ("x-gzip", gzip.compress(png))):
            r = client.post(CLASSIFY, content=body, headers={"content-type": "image/png", "content-encoding": coding})
            assert r.status_code == 200 and r.json() == plain.json(), (coding, r.text)
        for coding, status in (("br", 415), ("gzip", 400)):  # unknown coding; a body that is not gzip
            r = client.post(CLASSIFY, content=png, headers={"content-type": "image/png", "content-encoding": coding})
            assert r.status_code == status and r.json()["error"], (coding, r.text)
            if status == 415:  # RFC 9110 15.5.16: say which codings would do
                assert r.headers["accept-encoding"] == "gzip, deflate"

        # A multipart form cut before its closing boundary is malformed (the parser would drop the cut part).
        boundary = "XXbound"
        part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + png
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        r = client.post(CLASSIFY, content=part[:len(part) - len(png) + 50], headers=headers)
        assert r.status_code == 400 and "closing boundary" in r.json()["error"]
        whole = part + f"\r\n--{boundary}--\r\n".encode()
        assert client.post(CLASSIFY, content=whole, headers=headers).json() == plain.json()
        # The boundary parameter is found among others, and an epilogue after the closing delimiter is allowed.
        other = {"content-type": f"multipart/form-data; x-boundary=ZZ; boundary=\"{boundary}\""}
        assert client.post(CLASSIFY, content=whole + b"epilogue", headers=other).json() == plain.json()
        # A second file cut short is refused, even when the cut part's bytes spell the closing boundary.
        second = (f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.png\"\r\n"
                  f"Content-Type: image/png\r\n\r\nPNG bytes --{boundary}-- and then cut").encode()
        r = client.post(CLASSIFY, content=part + second, headers=headers)
        assert r.status_code == 400 and "closing boundary" in r.json()["error"]
        r = client.post(CLASSIFY, content=gzip.compress(whole), headers={**headers, "content-encoding": "gzip"})
        assert r.status_code == 415

        # A float TIFF of NaN has no pixel values: 400, not an undefined cast.
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20), np.nan, np.float32), "F").save(buf, format="TIFF")
        r = client.post(CLASSIFY, content=buf.getvalue(), headers={"content-type": "image/tiff"})
        assert r.status_code == 400 and "non-finite" in r.json()["error"], r.text

        # Repository index: anything but {"ready": <bool>} is a 400, however deep or odd; past 64 KiB a 413.
        for body in (b"[" * 60_000, b'{"a":' * 12_000, b'{"ready": "no"}', b'{"ready": NaN}', b"[]", b"7"):
            r = client.post("/v2/repository/index", content=body)
            assert r.status_code == 400 and r.json()["error"], body[:20]
        assert client.post("/v2/repository/index", content=b"[" * 100_000).status_code == 413
        assert client.post("/v2/repository/index", json={"ready": True}).status_code == 200
    logs = server.logs()
    assert "Traceback" not in logs and "upgrade" not in logs.lower()
    for line in logs.splitlines():  # warnings and third-party messages too: one JSON object per line
        json.loads(line)


def test_sigterm_during_a_stalled_upload_answers_json_and_exits_in_time(bundle, tmp_path):
    args = ["--model", f"fake={bundle}", "--backend", "fake", "--graceful-timeout-s", "1"]
    server = start_server(args, tmp_path / "server.log", fake_runtime.server_env(tmp_path))
    try:
        sock = _open_upload(server.url, 1000)
        time.sleep(0.3)
        t0 = time.monotonic()
        server.proc.terminate()
        status, headers, body = _read_response(sock)
        sock.close()
        assert status == 503 and headers["content-type"] == "application/json", (status, body)
        assert "shutting down" in json.loads(body)["error"]
        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
    finally:
        server.stop()
    assert "Traceback" not in server.logs()


def _answers(host: str, port: int, data: bytes) -> list[int]:
    """The statuses of every answer to `data` sent in one write, read until the server closes."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(data)
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    sock.close()
    return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", out)]


def test_protocol_refusals_come_in_order_and_a_reader_that_stops_is_let_go(bundle, tmp_path):
    args = ["--model", f"fake={bundle}", "--backend", "fake", "--receive-timeout-s", str(RECEIVE_S), "--api-key", "k"]
    with start_server(args, tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        port = int(port)
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        # Answers go out in order (RFC 9112 9.3.2): the valid requests before a malformed or oversized one get
        # theirs before its 400/431 (the refusal used to be written at once, and the earlier answers dropped).
        assert _answers(host, port, live + b"GET / HTTP/1.1\r\nFoo : bar\r\n\r\n") == [200, 400]
        assert _answers(host, port, live * 2 + b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n") == [
            200, 200, 431]
        # An answer before the body was asked for (`Expect: 100-continue`, unknown model) closes the connection:
        # the client may never send that body, and its next request would otherwise be read as it.
        for auth, refused in ((b"", 401), (b"Authorization: Bearer k\r\n", 404)):  # the key is checked first
            expecting = socket.create_connection((host, port), timeout=10)
            expecting.sendall(b"POST /v1/models/nope/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                              b"Content-Length: 1000\r\nExpect: 100-continue\r\n" + auth + b"\r\n")
            status, headers, _ = _read_response(expecting)
            assert status == refused and headers["connection"] == "close", headers
            assert _closed_by_server(expecting)
            expecting.close()
        assert _answers(host, port, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n") == [414]
        # An HTTP/1.1 request needs exactly one Host (RFC 9112 3.2); HTTP/1.0 needs none.
        assert _answers(host, port, b"GET /v2/health/live HTTP/1.1\r\n\r\n") == [400]
        assert _answers(host, port, b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == [400]
        assert _answers(host, port, b"GET /v2/health/live HTTP/1.0\r\n\r\n") == [200]
        # An unknown method is 501 and an unknown HTTP version 505 (RFC 9110 9.1, 15.6.6), after earlier answers.
        assert _answers(host, port, live + b"FOO /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n") == [200, 501]
        assert _answers(host, port, b"get /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n") == [501]
        for version in (b"2.0", b"0.9", b"3.7"):
            assert _answers(host, port, b"GET /v2/health/live HTTP/" + version + b"\r\nHost: x\r\n\r\n") == [505]
        # A transfer coding other than chunked is not understood (RFC 9112 6.1): 501, not a body read as chunked.
        assert _answers(host, port, b"POST /v2/repository/index HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n") == [501]
        # A client that pipelines requests, reads none of the answers and streams an endless header: reading stops
        # a few requests ahead of the answers (the header is never even read), and the connection is dropped once
        # the client has taken nothing for the receive timeout (it held its request, and grew the server's memory,
        # forever).
        flood = socket.socket()
        flood.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        flood.connect((host, port))
        flood.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 300 + b"GET / HTTP/1.1\r\nHost: x\r\nX-E: ")
        flood.settimeout(0.5)
        sent, t0, dropped = 0, time.monotonic(), False
        while time.monotonic() - t0 < 20 and not dropped:
            try:
                sent += flood.send(b"a" * 65536)
            except TimeoutError:
                pass
            except OSError:
                dropped = True
        flood.close()
        assert dropped and time.monotonic() - t0 < 15, (sent, time.monotonic() - t0)
        assert sent < 64 << 20, sent
        assert httpx.get(server.url + "/v2/health/live", timeout=5).status_code == 200
        # Answered below the app, yet counted (vitc_requests_total never sees them).
        metrics = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer k"}, timeout=5).text
        counted = {m[1]: float(m[2]) for m in re.finditer(r'vitc_protocol_refusals_total\{status="(\w+)"\} (\S+)',
                                                          metrics)}
        assert counted["501"] >= 3 and counted["505"] == 3 and counted["414"] == 1 and counted["431"] >= 1, counted
    logs = server.logs()
    assert "Traceback" not in logs
    # Refused below the app, yet in the access log with the client's address.
    refused = [e for e in map(json.loads, logs.splitlines()) if e.get("msg") == "refused"]
    assert {414, 431, 400, 501, 505} <= {e["status"] for e in refused} and all(e["client"] for e in refused)


def test_an_inflated_body_is_held_against_the_budget_and_json_is_bounded_by_the_model(bundle, tmp_path):
    """A 1 KB gzip body inflates to 1 MiB: that is what it holds while it waits (hundreds of them passed the budget
    the wire bytes are held to). And a v2 JSON body holds no more arrays than a request for the model can (16 MiB
    of `[],` parsed into 650 MB of lists before its shape was checked)."""
    args = ["--model", f"fake={bundle}", "--backend", "fake", "--max-body-bytes", str(1 << 20),
            "--max-buffered-bytes", str(2 << 20), "--receive-timeout-s", "5"]
    with start_server(args, tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        inflating = gzip.compress(b"\0" * ((1 << 20) - 100))
        headers = {"content-type": "image/png", "content-encoding": "gzip"}
        assert client.post(CLASSIFY, content=inflating, headers=headers).status_code == 400  # fits: read, not an image
        stalled = _open_upload(server.url, 1 << 20, b"x" * ((1 << 20) - 10))  # holds half the budget
        time.sleep(0.3)
        r = client.post(CLASSIFY, content=inflating, headers=headers)
        assert r.status_code == 503 and "request bodies" in r.json()["error"] and r.headers["retry-after"]
        stalled.close()
        time.sleep(0.3)
        head = b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ['
        body = head + b"[]," * 300_000 + b"1]}]}"
        r = client.post("/v2/models/fake/infer", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "arrays and objects" in r.json()["error"]
    assert "Traceback" not in server.logs()


def test_connections_beyond_the_limit_get_a_503_they_can_read_but_probes_still_pass(bundle, tmp_path):
    args = ["--model", f"fake={bundle}", "--backend", "fake", "--max-connections", "3"]
    with start_server(args, tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        host, port = server.url.removeprefix("http://").split(":")
        port = int(port)
        idle = [socket.create_connection((host, port), timeout=10) for _ in range(3)]
        time.sleep(0.3)  # the server has taken all three
        # Health, readiness and metrics still answer (Kubernetes would restart a healthy pod, Prometheus mark it
        # down), one request per connection.
        for path in (b"/v2/health/live", b"/v2/health/ready", b"/metrics", b"/v2/models/fake/ready"):
            status, headers, _ = _read_response(_sent(host, port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"))
            assert status == 200 and headers["connection"] == "close", (path, status)
        # Anything else: a JSON 503 with Retry-After, readable although its body was never read (no reset).
        status, headers, body = _read_response(_sent(
            host, port, f"POST {CLASSIFY} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode() + b"x" * 5000))
        assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
        assert "connections" in json.loads(body)["error"]
        silent = socket.create_connection((host, port), timeout=10)  # beyond the limit, and saying nothing
        assert _read_response(silent)[0] == 503  # after PROBE_WAIT_S, not after the receive timeout
        # Idle sockets cannot hold the places for probes: a newcomer takes the place of the oldest silent one.
        held = [socket.create_connection((host, port), timeout=10) for _ in range(16)]
        time.sleep(0.3)
        assert _answers(host, port, b"GET /v2/health/live HTTP/1.0\r\n\r\n") == [200]
        assert _read_response(held[0])[0] == 503  # the oldest silent one gave up its place
        # Nor can sockets that send a byte now and then: a place goes to the newcomer until a request is complete.
        trickling = [_sent(host, port, b"G") for _ in range(16)]
        time.sleep(0.3)
        assert _answers(host, port, b"GET /v2/health/live HTTP/1.0\r\n\r\n") == [200]
        for sock in (*held, *trickling, idle.pop(), silent):
            sock.close()
        time.sleep(0.3)
        assert _answers(host, port, b"GET /v2/health/live HTTP/1.0\r\n\r\n") == [200]  # a place is free again
        for sock in idle:
            sock.close()
    assert '"max_connections": 3' in server.logs()
    refused = [e for e in map(json.loads, server.logs().splitlines()) if e.get("msg") == "refused"]
    assert {e["status"] for e in refused} == {503}


def _sent(host: str, port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(data)
    return sock


def _files_limit(n: int) -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))


@pytest.mark.parametrize("limit, wanted, result", [
    (64, None, 16),  # a fixed reserve of 256 left 1 connection at the default
    (64, 16, 16),
    (256, 1, 1),  # refused: '--max-connections 1 needs 257 open files ... lower --max-connections'
    (256, 205, "--max-connections 205 needs 257 open files, but the limit is 256 (hard limit 256): give 204 or "
               "less"),
    (40, None, "the open-file limit is 40 (hard limit 40), too few to serve a connection beside the model files and "
               "logs: raise it to at least 49 (ulimit -n)"),
    (100_000, None, 1000),
])
def test_the_connections_that_fit_a_small_open_file_limit(limit, wanted, result, monkeypatch):
    import resource

    from serve.errors import ServeError
    from serve.server import connection_limit

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (limit, limit))
    monkeypatch.setattr(resource, "setrlimit", lambda *_a: pytest.fail("raised past the hard limit"))
    if isinstance(result, int):
        assert connection_limit(wanted) == result
    else:
        with pytest.raises(ServeError) as info:
            connection_limit(wanted)
        assert str(info.value).startswith(result)


def test_the_connections_fitting_a_limit_are_the_most_that_fit():
    for limit in (49, 64, 65, 176, 177, 200, 1000, 1255, 1256, 50_000):
        fits = connections_fitting(limit)
        assert files_needed(fits) <= limit < files_needed(fits + 1), limit


def test_the_connection_limit_fits_the_open_file_limit(bundle, tmp_path):
    import functools
    import subprocess
    import sys

    def serve(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "serve", "--model", f"fake={bundle}", "--backend", "fake",
                                 "--port", "0", *extra], cwd=Path(__file__).resolve().parents[1], text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **fake_runtime.server_env(tmp_path)},
                                preexec_fn=functools.partial(_files_limit, 600))
    refused = serve("--max-connections", "550")
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "ulimit -n" in out and len(out.splitlines()) == 1, out
    # The default (1,000) shrinks to what 600 descriptors hold beside the reserve: the server starts. A SIGTERM
    # right after its "listening" line stops it cleanly (it used to be ignored until uvicorn took the signals over).
    started = serve()
    try:
        lines = []  # up to the "listening" line (the server runs on: its stdout does not end)
        for line in started.stdout:
            lines.append(json.loads(line))
            if lines[-1]["msg"] == "listening":
                break
        listening = lines[-1]
        assert listening["max_connections"] == connections_fitting(600) == 517  # 517 + 51 probes + 32 spare
        assert any(e["msg"] == "the open-file limit cuts the connections served at once" for e in lines)
        started.terminate()
        started.communicate(timeout=30)
        assert started.returncode == 0
    finally:
        started.kill()
