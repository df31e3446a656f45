"""Faults a real server must survive: a hung backend, clients that leave, overload by many-file requests, hostile
images and tensors. The backend is tests/fake_runtime.py, plugged into the server process with VITC_RUNTIMES, so
it can hang or go slow on demand (steered by the input's first value)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import fake_runtime
import httpx
import pytest
from test_serve_fixtures import animal_pngs, start_server

V2 = "/v2/models/fake/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The legacy bundle plus one servable fake artifact."""
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("faults") / "fake")


def _computed(tmp_path: Path) -> list[float]:
    log = tmp_path / "computed.log"
    return [float(v) for v in log.read_text().split()] if log.exists() else []


def _metric(client: httpx.Client, prefix: str) -> float:
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(prefix)]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def test_a_hung_backend_answers_504_goes_unready_and_recovers(bundle, tmp_path):
    env = fake_runtime.server_env(tmp_path)
    (tmp_path / "hang").touch()
    with start_server(["--model", f"fake={bundle}", "--backend", "fake", "--inference-timeout-s", "0.5",
                       "--parallel", "1"], tmp_path / "server.log", env) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        assert client.post(V2, content=fake_runtime.request_body(1.0)).status_code == 200
        t0 = time.monotonic()
        r = client.post(V2, content=fake_runtime.request_body(fake_runtime.HANG))
        assert r.status_code == 504 and "longer than 0.5 s" in r.json()["error"], r.text
        assert time.monotonic() - t0 < 5
        # While the call is stuck the model is not ready and refuses work at once (no queueing behind it).
        assert client.get("/v2/health/ready").status_code == 400
        assert client.get("/v2/models/fake/ready").json()["ready"] is False
        r = client.post(V2, content=fake_runtime.request_body(2.0))
        assert r.status_code == 503 and r.headers["retry-after"] and "not ready" in r.json()["error"]
        (tmp_path / "hang").unlink()  # the backend call returns; a probe batch succeeds; ready again
        end = time.monotonic() + 10
        while client.get("/v2/health/ready").status_code != 200 and time.monotonic() < end:
            time.sleep(0.05)
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post(V2, content=fake_runtime.request_body(3.0)).status_code == 200
        assert 2.0 not in _computed(tmp_path), "a refused request was computed"
        # The operator sees it: a warning when the model stalled, a line when it recovered, a timeout counted.
        assert _metric(client, 'vitc_inference_timeouts_total{model="fake"}') == 1
        assert _metric(client, 'vitc_model_ready{model="fake"}') == 1
        entries = [json.loads(ln) for ln in server.logs().splitlines() if ln.startswith("{")]
        stalled = [e for e in entries if e["msg"] == "model stalled"]
        recovered = [e for e in entries if e["msg"] == "model recovered"]
        assert [(e["level"], e["model"], e["timeout_s"]) for e in stalled] == [("warning", "fake", 0.5)]
        assert [(e["level"], e["model"], e["probes"]) for e in recovered] == [("info", "fake", 1)]
        assert 0 < recovered[0]["stalled_s"] < 15
        t0 = time.monotonic()
    assert server.proc.returncode == 0 and time.monotonic() - t0 < 10
    assert "Traceback" not in server.logs()


def test_a_client_that_leaves_has_its_queued_work_dropped(bundle, tmp_path):
    args = ["--model", f"fake={bundle}", "--backend", "fake", "--parallel", "1", "--max-queue-delay-ms", "0"]
    with start_server(args, tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        client = httpx.Client(base_url=server.url, timeout=30)

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as ac:
                # holds the backend 1 s
                slow = asyncio.create_task(ac.post(V2, content=fake_runtime.request_body(fake_runtime.SLOW)))
                end = time.monotonic() + 10
                while fake_runtime.SLOW not in _computed(tmp_path) and time.monotonic() < end:
                    await asyncio.sleep(0.01)  # until the slow batch is running
                body = fake_runtime.request_body(11.0)
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(f"POST {V2} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                await asyncio.sleep(0.3)  # queued behind the slow batch
                writer.close()  # the client leaves
                assert (await slow).status_code == 200

        asyncio.run(scenario())
        end = time.monotonic() + 5
        while _metric(client, 'vitc_client_disconnects_total{model="fake",stage="queued"}') < 1 \
                and time.monotonic() < end:
            time.sleep(0.05)
        assert _metric(client, 'vitc_client_disconnects_total{model="fake",stage="queued"}') == 1
        assert fake_runtime.SLOW in _computed(tmp_path)  # the log sees what the backend computes
        assert 11.0 not in _computed(tmp_path), "the departed client's rows were computed"
        # A client that leaves mid-upload: counted, no 500, no error in the log.
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(f"POST {V2} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode() + b"{" * 100)
        end = time.monotonic() + 5
        while _metric(client, 'vitc_client_disconnects_total{model="fake",stage="upload"}') < 1 \
                and time.monotonic() < end:
            time.sleep(0.05)
        assert _metric(client, 'vitc_client_disconnects_total{model="fake",stage="upload"}') == 1
        assert _metric(client, 'vitc_requests_total{endpoint="/v2/models/{name}/infer",model="fake",status="500"}') == 0
        assert client.post(V2, content=fake_runtime.request_body(1.0)).status_code == 200
    assert "unhandled error" not in server.logs()


def test_admission_counts_every_image_of_a_request(bundle, tmp_path):
    pngs = animal_pngs(5)
    with start_server(["--model", f"fake={bundle}", "--backend", "fake", "--max-queue-size", "4"],
                      tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        files = [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
        r = client.post("/v1/models/fake/classify", files=files)
        # More than the bound can never fit: 413 (the request's size), not a 503 to retry.
        assert r.status_code == 413 and "5 images can never fit" in r.json()["error"]
        ok = client.post("/v1/models/fake/classify", files=files[:4])
        assert ok.status_code == 200 and len(ok.json()) == 4
        r = client.post(V2, content=fake_runtime.request_body(1.0, rows=5))
        assert r.status_code == 413
        assert client.post(V2, content=fake_runtime.request_body(1.0, rows=4)).status_code == 200


def _png(w: int, h: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = (b"\0" + b"\x80" * w) * h
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def test_hostile_images_and_tensors_get_4xx_with_strict_json(bundle, tmp_path):
    with start_server(["--model", f"fake={bundle}", "--backend", "fake", "--decode-budget-pixels", "40000000"],
                      tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        client = httpx.Client(base_url=server.url, timeout=60)
        # Extreme aspect ratios under the pixel limit: answered, and cheaply (only the crop's footprint is resized).
        for w, h in ((2, 1_000_000), (1_000_000, 2), (16, 2_500_000)):
            t0 = time.monotonic()
            r = client.post("/v1/models/fake/classify", content=_png(w, h), headers={"content-type": "image/png"})
            assert r.status_code == 200, (w, h, r.text)
            assert time.monotonic() - t0 < 5
        bodies = {
            "int8 out of range": ('{"inputs":[{"name":"input","shape":[1],"datatype":"INT8","data":[300]}]}', 400),
            "integer beyond every float": ('{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":['
                                           + "9" * 400 + "]}]}", 400),
            "integer of 5000 digits": ('{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":['
                                       + "9" * 5000 + "]}]}", 400),
            "deep nesting": ("[" * 100_000 + "]" * 100_000, 400),
            "65 dimensions": ('{"inputs":[{"name":"input","shape":' + json.dumps([1] * 65)
                              + ',"datatype":"FP32","data":[1]}]}', 400),
            "huge zero-size shape": ('{"inputs":[{"name":"input","shape":[9223372036854775808,0],"datatype":"FP32",'
                                     '"data":[]}]}', 400),
            "NaN": ('{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[NaN]}]}', 400),
            "beyond FP32": ('{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32","data":['
                            + ",".join(["1e39"] * 3072) + "]}]}", 400),
            "finite but overflowing the model": ('{"inputs":[{"name":"input","shape":[1,3,32,32],"datatype":"FP32",'
                                                 '"data":[' + ",".join(["3e38"] * 3072) + "]}]}", 422),
        }
        for name, (body, status) in bodies.items():
            r = client.post(V2, content=body)
            assert r.status_code == status, (name, r.status_code, r.text[:200])
            json.loads(r.text, parse_constant=lambda c, name=name: pytest.fail(f"{name}: {c} in the response"))
            assert r.json()["error"]
        # A request id whose 64-character cut would end in a space is still a legal header.
        r = client.get("/v2/health/ready", headers={"X-Request-Id": "a" * 63 + " tail"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "a" * 63 + "t"
        # gzip of 200 MB of zeros: refused at the body limit, decompressed off the event loop.
        bomb = zlib.compress(b"\0" * (200 << 20), 9)
        r = client.post(V2, content=bomb, headers={"content-encoding": "deflate"})
        assert r.status_code == 413 and "decompressed body" in r.json()["error"]
        assert _metric(client, "vitc_requests_total{") > 0 and client.get("/v2/health/ready").status_code == 200
        statuses = [ln for ln in client.get("/metrics").text.splitlines()
                    if ln.startswith("vitc_requests_total") and 'status="5' in ln and not ln.endswith(" 0.0")]
        assert not statuses, statuses
    assert "Traceback" not in server.logs()


def test_a_full_model_answers_503_at_once_and_sigterm_loses_no_admitted_request(bundle, tmp_path):
    """A hung first batch holds the model; 30 more requests against a 20-image bound: the 19 that fit wait, 11 get
    503 + Retry-After at once; SIGTERM while 20 are in progress answers every one of them, then exits 0."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "hang").touch()
    server = start_server(["--model", f"fake={bundle}", "--backend", "fake", "--max-queue-size", "20", "--parallel",
                           "1", "--inference-timeout-s", "60"], tmp_path / "server.log",
                          fake_runtime.server_env(tmp_path))
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        pool = ThreadPoolExecutor(31)
        first = pool.submit(client.post, V2, content=fake_runtime.request_body(fake_runtime.HANG))
        time.sleep(0.5)  # the hung batch is running
        end = time.monotonic() + 20
        rest = [pool.submit(client.post, V2, content=fake_runtime.request_body(float(i))) for i in range(30)]
        while sum(f.done() for f in rest) < 11 and time.monotonic() < end:
            time.sleep(0.02)
        refused = [f.result() for f in rest if f.done()]
        assert len(refused) == 11 and all(r.status_code == 503 for r in refused)
        assert all(r.headers["retry-after"] == "1" and "retry" in r.json()["error"] for r in refused)
        assert _metric(client, 'vitc_queue_depth{model="fake"}') == 19
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        (tmp_path / "hang").unlink()  # the hung batch returns; the queued ones run; the server drains and exits
        answers = [first.result(timeout=60)] + [f.result(timeout=60) for f in rest]
        pool.shutdown()
        assert server.proc.wait(30) == 0, server.logs()[-2000:]
    finally:
        server.stop()
    assert sum(r.status_code == 200 for r in answers) == 20 and sum(r.status_code == 503 for r in answers) == 11
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/v2/health/live", timeout=2)
