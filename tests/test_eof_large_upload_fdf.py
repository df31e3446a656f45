"""A client that leaves (FIN or reset) or half-closes right after sending a request whose body is larger than
uvicorn's flow-control high-water mark (64 KiB) is noticed while its image is decoded, as one with a small body is:
uvicorn pauses reading past that mark, and only the app's `receive` resumed it, so the EOF waited unread in the
kernel until the answer was computed (logged 200, no disconnect counted, no interim `100 Continue`)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import struct
import time
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import fake_server

V1 = "/v1/models/fake/classify"
# One decode thread, so that the request under test waits for another one's decode too (its own takes about 0.5 s
# here): well past the 0.2 s in which an EOF is told from a departure; no draft decoding, whatever the host measures.
TAIL = 200 * 1024
ARGS = ("--decode-threads", "1", "--jpeg-draft", "never", "--max-queue-delay-ms", "0")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("eof-large") / "fake")


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A 6000x6000 JPEG (about 7 MB: far past 64 KiB), slow to decode."""
    ramp = (np.arange(6000) * 7 % 256).astype(np.uint8)
    pixels = np.empty((6000, 6000, 3), np.uint8)
    pixels[..., 0], pixels[..., 1] = ramp[None, :], ramp[:, None]
    pixels[..., 2] = ramp[None, :] + ramp[:, None]  # wraps around: a pattern, not a flat area
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def _request(body: bytes, request_id: str) -> bytes:
    return (f"POST {V1} HTTP/1.1\r\nHost: x\r\nX-Request-Id: {request_id}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _send(s: socket.socket, raw: bytes) -> None:
    """Send `raw`, its last TAIL bytes on their own once the server has read the rest: they arrive in one read, past
    uvicorn's 64 KiB mark (a fast client's upload fills the server's reads of 256 KiB; the rare last read under the
    mark left reading on, and the client's EOF seen)."""
    s.sendall(raw[:-TAIL])
    time.sleep(0.2)
    s.sendall(raw[-TAIL:])


def _answers(data: bytes) -> list[tuple[int, dict[str, str]]]:
    """The responses in `data` (interim ones too): (status, headers), each body framed by its Content-Length."""
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        out.append((int(status_line.split()[1]), headers))
        data = data[int(headers.get("content-length", 0)):]
    return out


def _logged(server, request_id: str) -> list[int]:
    """The statuses the access log gives the requests sent with `request_id`, once there is one (5 s at most)."""
    end = time.monotonic() + 5
    while True:
        entries = [json.loads(ln) for ln in server.logs().splitlines() if ln.startswith("{")]
        found = [e["status"] for e in entries if e["msg"] == "request" and e.get("request_id") == request_id]
        if found or time.monotonic() > end:
            return found
        time.sleep(0.05)


def _disconnects(server) -> dict[str, float]:
    """vitc_client_disconnects_total of the fake model, by stage."""
    lines = httpx.get(f"{server.url}/metrics").text.splitlines()
    return {ln.split('stage="')[1].split('"')[0]: float(ln.split()[-1]) for ln in lines
            if ln.startswith('vitc_client_disconnects_total{model="fake"')}


def _behind_another(server, photo: bytes, client) -> bytes:
    """Run `client` (given the port; it returns what it read) while another client's request of `photo` holds the
    one decode thread (that one is answered 200); what `client` read."""

    async def scenario() -> bytes:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
            ahead = asyncio.create_task(ac.post(V1, content=photo, headers={"content-type": "image/jpeg"}))
            await asyncio.sleep(0.2)  # its upload (7 MB over loopback) is done: its decode has begun
            got = await asyncio.to_thread(client, server.port)
            assert (await ahead).status_code == 200
            return got

    return asyncio.run(scenario())


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_that_leaves_after_a_large_upload_is_a_disconnect(bundle, tmp_path, photo, how):
    """It leaves while its image waits for the decode thread (FIN right after its request; or a reset once the server
    has read it all): logged 499 and counted as one disconnect at stage "decoding" (its image never decoded, its rows
    never queued), not answered 200 for nobody."""

    def leave(port: int) -> bytes:
        s = socket.create_connection(("127.0.0.1", port))
        _send(s, _request(photo, "left"))
        if how == "reset":
            time.sleep(0.2)  # the server has the whole body (and decodes): then the reset
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        return b""

    with fake_server(bundle, tmp_path, *ARGS) as server:
        _behind_another(server, photo, leave)
        assert _logged(server, "left") == [499]
        # Seen gone as it leaves, before its decode starts: nothing decoded or computed for nobody.
        assert _disconnects(server) == {"decoding": 1.0}
        assert httpx.post(f"{server.url}{V1}", content=photo, headers={"content-type": "image/jpeg"},
                          timeout=30).status_code == 200


def test_a_half_close_after_a_large_upload_gets_the_interim_answer(bundle, tmp_path, photo):
    """The documented probe: a request still unanswered 0.1 s after the EOF gets `100 Continue` first, then its
    answer (the client is still there), and the connection closes."""

    def half_close(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(20)
            _send(s, _request(photo, "half"))
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data

    with fake_server(bundle, tmp_path, *ARGS) as server:
        answers = _answers(_behind_another(server, photo, half_close))
        assert [status for status, _ in answers] == [100, 200], answers
        assert answers[-1][1]["connection"] == "close"
        assert _logged(server, "half") == [200]
        assert not _disconnects(server)


def test_a_request_pipelined_behind_a_large_upload_is_answered_after_it(bundle, tmp_path, photo):
    """Reading on once a large body is whole does not start the request pipelined behind it early: both are
    answered, in order, on the same connection."""
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Request-Id: next\r\nConnection: close\r\n\r\n"
    with fake_server(bundle, tmp_path, *ARGS) as server, socket.create_connection(("127.0.0.1", server.port)) as s:
        s.settimeout(20)
        s.sendall(_request(photo, "first") + ready)
        data = b""
        while chunk := s.recv(65536):  # until the server closes, after the second answer
            data += chunk
        assert [(status, h["x-request-id"]) for status, h in _answers(data)] == [(200, "first"), (200, "next")]
        assert _logged(server, "first") == [200]
