"""What a chunked body's framing costs the server (serve.httpproto), in process:

- the walk ahead of the parser (serve.chunked) takes a run of small chunks in a few Python steps, not ten or more per
  chunk, and uvicorn is handed the chunk data once per piece parsed, not once per chunk (it copies the whole body so
  far on each): a body of 1-byte chunks cost 0.2 CPU-s per MB, 100x a plain body, and one such upload stalled the
  event loop for every other client (p50 3 ms -> 1.7 s). CPU time is not asserted (shared cores); the Python steps
  and calls per chunk are;
- a body whose framing (size lines, extensions, the CRLF after each chunk's data) passes FRAMING_PER_BYTE bytes per
  byte of data plus FRAMING_SLACK is a JSON 400 as it arrives, closing the connection, counted with the app's
  answers; the chunkings ordinary clients send (httpx and http.client generators of 8-byte pieces, 2-byte chunks,
  a few thousand 1-byte chunks first, trailers) are answered."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator

import fake_runtime
import httpx
import pytest
import uvicorn
from test_serve_fixtures import in_process_server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from serve import chunked
from serve.chunked import ChunkSizes
from serve.http_limits import ConnectionLimits
from serve.httpproto import FRAMING_PER_BYTE, FRAMING_SLACK, HeaderBoundsProtocol

INFER = "/v2/models/fake/infer"
BODY = fake_runtime.request_body(1.0)  # a v2 JSON request, ~15 KB


def _chunked(data: bytes, sizes: Iterator[int], spell=lambda n: b"%x" % n) -> bytes:
    """`data` as chunks of the next size from `sizes` each (the last one what is left), each size line spelled by
    `spell`, then the last chunk and an empty trailer section."""
    out, at = [], 0
    while at < len(data):
        piece = data[at:at + next(sizes)]
        out.append(spell(len(piece)) + b"\r\n" + piece + b"\r\n")
        at += len(piece)
    return b"".join(out) + b"0\r\n\r\n"


def _reading(body: bytes) -> tuple[int, int, int]:
    """What a plain reading of the chunked `body` gives: the data's bytes, the framing's bytes (size lines and the
    CRLF after each chunk's data), and where the last chunk's size line ends."""
    data = framing = at = 0
    while True:
        lf = body.index(b"\n", at) + 1
        size = int(re.match(rb"[0-9a-fA-F]*", body[at:lf])[0], 16)
        framing += lf - at
        at = lf
        if not size:
            return data, framing, at
        data, framing, at = data + size, framing + 2, at + size + 2


def _small_chunks(rng: random.Random, n: int) -> bytes:
    """`n` chunks of 1 to 15 bytes of CR, LF and `0`, their size lines in either case, some with leading zeros or
    extensions."""
    out = []
    for _ in range(n):
        size = rng.randint(1, 15)
        line = (b"%x" if rng.random() < 0.5 else b"%X") % size
        if rng.random() < 0.1:
            line = b"00" + line
        if rng.random() < 0.1:
            line += b';a=b;q="x;y"'
        out.append(line + b"\r\n" + bytes(rng.choice(b"\r\n0") for _ in range(size)) + b"\r\n")
    return b"".join(out) + b"0\r\n\r\n"


def _python_lines(call) -> tuple[object, int]:
    """`call()`'s result, and the lines of serve.chunked's code it ran."""
    lines = 0

    def local(frame, event, arg):
        nonlocal lines
        lines += event == "line"
        return local

    before = sys.gettrace()  # a coverage tool's, say: put back after
    sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename == chunked.__file__ else None)
    try:
        return call(), lines
    finally:
        sys.settrace(before)


def test_a_run_of_small_chunks_costs_the_walk_a_few_python_steps_in_all():
    """40,000 chunks of 1 byte, or of 1 to 15 bytes spelled every way, in one read: a few dozen lines of Python
    (the walk ran about ten per chunk, 400,000), and the sizes and framing it tells are a plain reading's."""
    rng = random.Random(0)
    for body in (b"1\r\nx\r\n" * 40_000 + b"0\r\n\r\n", _small_chunks(rng, 40_000)):
        chunks = ChunkSizes()
        (end, announced), lines = _python_lines(lambda: chunks.feed(body))  # noqa: B023 - called at once
        assert lines < 60, lines
        data, framing, last = _reading(body)
        assert (end, announced, chunks.last) == (last, True, True)
        assert (chunks.announced, chunks.framing) == (data, framing)


def test_the_walk_agrees_with_a_plain_reading_however_the_body_is_cut():
    """Bodies mixing every kind of chunk (small runs, large chunks of CR and LF, leading zeros, extensions), fed
    whole, a byte at a time, or cut at random: the same sizes, framing and end of the last size line."""
    rng = random.Random(1)
    for trial in range(300):
        parts = []
        for _ in range(rng.randint(0, 12)):
            if rng.random() < 0.5:
                parts.append(_small_chunks(rng, rng.randint(1, 30))[:-5])  # without its last chunk
            else:
                size = rng.choice([16, 17, 255, 4096, rng.randint(16, 3000)])
                line = (b"0" * rng.randint(0, 3)) + (b"%x" % size) + (b";e=1" if rng.random() < 0.3 else b"")
                parts.append(line + b"\r\n" + bytes(rng.choice(b"\r\n") for _ in range(size)) + b"\r\n")
        body = b"".join(parts) + b"0\r\n" + (b"T: 1\r\n\r\n" if trial % 2 else b"\r\n")
        data, framing, last = _reading(body)
        for cuts in ([], list(range(1, len(body))), sorted(rng.sample(range(1, len(body)), min(len(body) - 1, 20)))):
            chunks, at, walked = ChunkSizes(), 0, 0
            for cut in [*cuts, len(body)]:
                pad = b"\r\n" * rng.randint(0, 2)  # bytes already parsed, before `at`
                end, _ = chunks.feed(pad + body[at:cut], len(pad))
                walked += end - len(pad)
                at = cut
                if chunks.last:
                    break
            assert (chunks.announced, chunks.framing, walked) == (data, framing, last), (trial, len(cuts))


async def _body_app(scope, receive, send) -> None:
    """Reads the body and answers its length."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def test_chunk_data_reaches_uvicorn_once_per_piece_and_costs_one_python_call_per_chunk(monkeypatch):
    """100,000 chunks of 2 bytes: uvicorn's on_body (which copies the whole body so far each time) runs about once
    per read, not once per chunk, and the connection's reads make about one Python call per chunk (the parser's
    on_body), not five (on_chunk_header, on_body twice, an event's set, on_chunk_complete)."""
    gathered = {"calls": 0, "bytes": 0}
    uvicorn_on_body = HttpToolsProtocol.on_body

    def counting_on_body(self, body: bytes) -> None:
        gathered["calls"] += 1
        gathered["bytes"] += len(body)
        uvicorn_on_body(self, body)

    monkeypatch.setattr(HttpToolsProtocol, "on_body", counting_on_body)
    counts = {"reads": 0, "calls": 0}

    class Counting(HeaderBoundsProtocol.configured(ConnectionLimits(10.0), access_log=False)):  # type: ignore[misc]
        def data_received(self, data: bytes) -> None:
            counts["reads"] += 1

            def profile(frame, event, arg):
                counts["calls"] += event == "call"

            before = sys.getprofile()
            sys.setprofile(profile)
            try:
                super().data_received(data)
            finally:
                sys.setprofile(before)

    n = 100_000
    body = b"2\r\nxy\r\n" * n + b"0\r\n\r\n"

    async def main() -> bytes:
        config = uvicorn.Config(_body_app, http=Counting, log_config=None, access_log=False, lifespan="off")
        config.load()
        state = ServerState()
        listener = await asyncio.get_running_loop().create_server(
            lambda: Counting(config=config, server_state=state, app_state={}), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.sockets[0].getsockname()[1])
        writer.write(b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 30)
        writer.close()
        listener.close()
        return answer

    answer = asyncio.run(main())
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'{"size": %d}' % (2 * n)), answer[-100:]
    assert gathered["bytes"] == 2 * n
    assert gathered["calls"] <= counts["reads"] + 2, (gathered, counts)
    assert counts["calls"] < 1.2 * n, counts


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> Iterator[int]:
    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("chunk_framing") / "fake")
    with in_process_server(bundle) as p:
        yield p


def _post_raw(port: int, body: bytes) -> tuple[bytes, dict[str, str], bytes, float]:
    """POST the chunked `body` (sent from a thread: the server may answer and close before it is all sent): the
    answer's status line, headers and body, and the seconds it took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(head + body)

    started = time.monotonic()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    took = time.monotonic() - started
    top, _, rest = data.partition(b"\r\n\r\n")
    status, *lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
    while len(rest) < int(headers["content-length"]):
        piece = sock.recv(65536)
        assert piece
        rest += piece
    sock.close()
    sender.join(10)
    return status.encode(), headers, rest, took


def _series(port: int, name: str) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return {labels: float(v) for labels, v in re.findall(rf"^{name}(\{{.*\}}) (\S+)$", text, re.M)}


def test_framing_past_its_bound_is_a_json_400_at_once_closing_the_connection(port):
    """1-byte chunks (5 bytes of framing a byte) and 1-byte chunks with 100-byte extensions, 3 MB each, and a body of
    1-byte chunks short enough to arrive whole: refused as they arrive, before the parser is given the framing past
    the bound, with the reason, `connection: close`, counted among the app's 400s."""
    before = _series(port, "vitc_requests_total")
    payloads = {"1-byte chunks": b"1\r\nx\r\n" * 500_000,
                "extensions": (b"1;e=" + b"a" * 100 + b"\r\nx\r\n") * 28_000,
                "a whole body in a read or two": b"1\r\nx\r\n" * 60_000 + b"0\r\n\r\n"}
    for name, body in payloads.items():
        status, headers, payload, took = _post_raw(port, body)
        assert status.startswith(b"HTTP/1.1 400 "), (name, status, payload)
        assert headers.get("connection") == "close", (name, headers)
        reason = json.loads(payload)["error"]
        assert reason.startswith("chunked body framing too large") and "send larger chunks" in reason, reason
        assert f"at most {FRAMING_PER_BYTE} per byte + {FRAMING_SLACK}" in reason, reason
        framing, data = map(int, re.findall(r"(\d+) bytes", reason)[:2])
        assert framing > FRAMING_PER_BYTE * data + FRAMING_SLACK
        assert framing < FRAMING_PER_BYTE * data + FRAMING_SLACK + (1 << 20), reason  # within about a read
        assert took < 5, (name, took)
    after = _series(port, "vitc_requests_total")
    added = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0) and "/metrics" not in k}
    assert added == {'{endpoint="/v2/models/{name}/infer",model="fake",status="400"}': 3.0}, added
    # One line too long is still told as such (MAX_CHUNK_LINE), not as framing past the bound.
    status, _, payload, _ = _post_raw(port, b"10;" + b"a" * 200_000)
    assert status.startswith(b"HTTP/1.1 400 ") and "longer than 4096 bytes" in json.loads(payload)["error"], payload


def test_the_chunkings_ordinary_clients_send_are_answered(port):
    """The v2 request as httpx and http.client (requests) stream a generator of 8-byte pieces, in 2-byte chunks
    (2.5 bytes of framing a byte: what the bound lets through), as 5,000 1-byte chunks then one chunk, and with
    trailers: each answered as the plain request is."""
    expected = httpx.post(f"http://127.0.0.1:{port}{INFER}", content=BODY).json()

    def pieces(size: int) -> Iterator[bytes]:
        return (BODY[i:i + size] for i in range(0, len(BODY), size))

    r = httpx.post(f"http://127.0.0.1:{port}{INFER}", content=pieces(8), timeout=20)
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 200 and r.json() == expected, r.text
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("POST", INFER, body=pieces(8), encode_chunked=True)
    answer = conn.getresponse()
    assert answer.status == 200 and json.loads(answer.read()) == expected
    conn.close()
    first = b"1\r\n" + b"\r\n1\r\n".join(BODY[i:i + 1] for i in range(5000)) + b"\r\n"
    for name, body in {"2-byte chunks": _chunked(BODY, iter(lambda: 2, 0)),
                       "1-byte chunks first": first + _chunked(BODY[5000:], iter(lambda: len(BODY), 0)),
                       "trailers": _chunked(BODY, iter(lambda: 1000, 0))[:-2] + b"X-T: 1\r\nX-U: 2\r\n\r\n"}.items():
        status, _, payload, _ = _post_raw(port, body)
        assert status.startswith(b"HTTP/1.1 200 ") and json.loads(payload) == expected, (name, status, payload)


def test_chunk_data_the_server_has_no_memory_to_gather_is_a_503(port, monkeypatch):
    """uvicorn gathers chunk data once per piece now, outside the parser: running out of memory there is still the
    503 + Retry-After that it was inside the parser, closing the connection."""
    from serve.httpproto import OUT_OF_MEMORY

    def no_memory(self, body: bytes) -> None:
        raise MemoryError

    monkeypatch.setattr(HttpToolsProtocol, "on_body", no_memory)
    status, headers, payload, _ = _post_raw(port, _chunked(BODY, iter(lambda: 100, 0)))
    monkeypatch.undo()
    assert status.startswith(b"HTTP/1.1 503 "), (status, payload)
    assert headers["retry-after"] == "1" and headers["connection"] == "close"
    assert json.loads(payload) == {"error": OUT_OF_MEMORY}
