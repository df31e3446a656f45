"""A client may half-close its connection after its HTTP/1.1 requests (HTTP/1.1 allows it; `nc -N`, some proxies and
load tools do): what it sent whole is answered, then the connection closes. One that closes entirely and leaves is
still a disconnect (its queued work dropped, 499 counted and logged), and so is any EOF while an HTTP/1.0 request is
owed (no probe can tell, and HTTP/1.0 peers such as nginx's upstreams close entirely). No status the client was
never sent is logged."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path

import fake_runtime
import httpx
import pytest
from test_serve_fixtures import fake_server

from serve.metrics import Metrics
from serve.middleware import AccessLogMiddleware

V2 = "/v2/models/fake/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("half") / "fake")


def _request(body: bytes, request_id: str, version: str = "1.1") -> bytes:
    host = "Host: x\r\n" if version == "1.1" else ""
    return (f"POST {V2} HTTP/{version}\r\n{host}X-Request-Id: {request_id}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _half_closed(port: int, raw: bytes) -> bytes:
    """Send `raw`, half-close, and read until the server closes (a timeout fails the test)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def _answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in `data`: (status, headers, body), each body framed by its Content-Length."""
    out = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        n = int(headers.get("content-length", 0))
        out.append((int(status_line.split()[1]), headers, data[:n]))
        data = data[n:]
    return out


def _logged(server, request_id: str) -> list[int]:
    """The statuses the access log gives the requests sent with `request_id`."""
    entries = [json.loads(ln) for ln in server.logs().splitlines() if ln.startswith("{")]
    return [e["status"] for e in entries if e["msg"] == "request" and e.get("request_id") == request_id]


def _computed(tmp_path: Path) -> list[float]:
    log = tmp_path / "computed.log"
    return [float(v) for v in log.read_text().split()] if log.exists() else []


def test_requests_sent_whole_are_answered_after_a_half_close(bundle, tmp_path):
    ok, bad = fake_runtime.request_body(1.0), b'{"a":'
    with fake_server(bundle, tmp_path) as server:
        cases = {
            "ok": (_request(ok, "ok"), [200]),
            "bad-json": (_request(bad, "bad-json"), [400]),
            "pipelined": (_request(ok, "pipelined") + _request(bad, "pipelined") + _request(ok, "pipelined"),
                          [200, 400, 200]),
        }
        for name, (raw, statuses) in cases.items():
            t0 = time.monotonic()
            answers = _answers(_half_closed(server.port, raw))
            assert [a[0] for a in answers] == statuses, (name, answers)
            assert time.monotonic() - t0 < 5, name  # closed once answered, not at the keep-alive timeout
            assert answers[-1][1]["connection"] == "close", name
            if statuses[0] == 200:
                assert json.loads(answers[0][2])["outputs"][0]["name"] == "logits"
        time.sleep(0.2)
        for name, (_, statuses) in cases.items():
            assert _logged(server, name) == statuses, name
        metrics = httpx.get(f"{server.url}/metrics").text.splitlines()
        assert not [ln for ln in metrics if ln.startswith("vitc_client_disconnects_total") or 'status="499"' in ln]


def test_a_half_closed_request_waiting_for_the_backend_is_answered(bundle, tmp_path):
    with fake_server(bundle, tmp_path, "--parallel", "1", "--max-queue-delay-ms", "0") as server:
        t0 = time.monotonic()
        answers = _answers(_half_closed(server.port, _request(fake_runtime.request_body(fake_runtime.SLOW),
                                                              "slow")))
        assert 0.9 < time.monotonic() - t0 < 8
        # An interim 1xx may come first (HTTP/1.1 clients take them); the answer is the final one.
        assert [a[0] for a in answers if a[0] >= 200] == [200] and all(100 <= a[0] < 200 for a in answers[:-1])
        assert answers[-1][1]["connection"] == "close"
        time.sleep(0.2)
        assert _logged(server, "slow") == [200]
        assert fake_runtime.SLOW in _computed(tmp_path)


def _eof_while_queued(server, tmp_path: Path, version: str, half: bool) -> bytes:
    """Queue a request of HTTP `version` behind a slow batch, then close the connection (`half`: only the sending
    side, reading what the server sends until it closes); what the client read."""

    async def scenario() -> bytes:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
            slow = asyncio.create_task(ac.post(V2, content=fake_runtime.request_body(fake_runtime.SLOW)))
            end = time.monotonic() + 10
            while fake_runtime.SLOW not in _computed(tmp_path) and time.monotonic() < end:
                await asyncio.sleep(0.01)  # the slow batch holds the backend a second
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(_request(fake_runtime.request_body(11.0), "left", version))
            await writer.drain()
            await asyncio.sleep(0.1)  # queued behind the slow batch
            got = b""
            if half:
                writer.write_eof()
                got = await asyncio.wait_for(reader.read(), 10)  # until the server closes
            writer.close()  # the client leaves: EOF, then a reset for whatever the server sends
            assert (await slow).status_code == 200
            return got

    return asyncio.run(scenario())


def _assert_disconnected(server, tmp_path: Path) -> None:
    """The request sent as "left" was a disconnect: logged 499, never computed, counted once."""
    end = time.monotonic() + 5
    while not _logged(server, "left") and time.monotonic() < end:
        time.sleep(0.05)
    assert _logged(server, "left") == [499]
    assert 11.0 not in _computed(tmp_path), "the departed client's rows were computed"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'vitc_client_disconnects_total{model="fake",stage="queued"} 1.0' in metrics
    assert httpx.post(f"{server.url}{V2}", content=fake_runtime.request_body(1.0)).status_code == 200


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_a_client_that_closes_entirely_while_queued_is_still_a_disconnect(bundle, tmp_path, version):
    """A full close sends the same EOF as a half-close: the server must still tell that nobody is listening (for
    HTTP/1.1 by a probe; HTTP/1.0, as nginx speaks to its upstreams by default, by the EOF itself)."""
    with fake_server(bundle, tmp_path, "--parallel", "1", "--max-queue-delay-ms", "0") as server:
        _eof_while_queued(server, tmp_path, version, half=False)
        _assert_disconnected(server, tmp_path)


def test_an_http10_half_close_is_a_disconnect(bundle, tmp_path):
    """No interim answer may go to HTTP/1.0, so a half-close cannot be told from a departure: the EOF means the
    client left (its queued work dropped, 499), and the connection closes at once with nothing sent."""
    with fake_server(bundle, tmp_path, "--parallel", "1", "--max-queue-delay-ms", "0") as server:
        assert _eof_while_queued(server, tmp_path, "1.0", half=True) == b""
        _assert_disconnected(server, tmp_path)


def test_a_status_never_sent_is_logged_as_499():
    """When the client left before any of the answer went out (the protocol says so in the scope), the access log
    and the request counter say 499, not the status the app chose."""
    metrics = Metrics()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vitc.access")
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO

    async def refuse(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def nothing(message) -> None:
        pass

    try:
        app = AccessLogMiddleware(refuse, metrics=metrics, known_models=lambda: {"m"})
        for gone in (True, False):
            scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": [],
                     "client": ("127.0.0.1", 1), "vitc.unanswered": lambda gone=gone: gone}
            asyncio.run(app(scope, None, nothing))
    finally:
        logger.removeHandler(handler)
        logger.level = old_level
    assert [r.status for r in records] == [499, 400]
    counted = {s.labels["status"]: s.value for m in metrics.registry.collect() if m.name == "vitc_requests"
               for s in m.samples if s.name == "vitc_requests_total"}
    assert counted == {"499": 1.0, "400": 1.0}
