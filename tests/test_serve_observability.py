"""What an operator sees of a running server: a stalled model's log lines, gauge and counter, and its probes'
backoff; access-log lines bounded whatever the request; no uvicorn warning a client can trigger at will; histogram
buckets up to the timeouts; process metrics; the protocol-refusal counter; which requests the statistics count as
failed; loads, failed loads and unloads in the log. The backend is tests/fake_runtime.py."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_fixtures import animal_pngs, client_of, fake_server, start_server

from serve.launch import ServerProcess
from serve.metrics import Metrics

V2 = "/v2/models/fake/infer"
CLASSIFY = "/v1/models/fake/classify"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("observe") / "fake")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    with fake_server(bundle, tmp_path_factory.mktemp("observe-server"), "--max-queue-size", "4") as s:
        yield s


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with client_of(server) as c:
        yield c


def _tensor(first: float = 0.25, shape: tuple[int, ...] = (1, 3, 32, 32), value: float = 0.25,
            datatype: str = "FP32") -> dict:
    x = np.full(shape, value, np.float32)
    x.flat[0] = first
    return {"inputs": [{"name": "input", "shape": list(shape), "datatype": datatype, "data": x.ravel().tolist()}]}


def _entries(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]


def _sample(client: httpx.Client, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        return s.recv(4096)


def test_metrics_have_buckets_up_to_the_timeouts_process_metrics_and_protocol_refusals():
    m = Metrics()
    m.protocol_refused(431)
    m.protocol_refused(431)
    m.protocol_refused(418)  # not an answer of serve.httpproto: counted, under a bounded label
    seconds = {"vitc_request_duration_seconds": m.latency.labels("x", "e"), "vitc_queue_duration_seconds":
               m.queue.labels("x"), "vitc_preprocess_duration_seconds": m.preprocess.labels("x"),
               "vitc_compute_duration_seconds": m.compute.labels("x")}
    for histogram in seconds.values():
        histogram.observe(45.0)  # between the default inference (30 s) and receive (60 s) timeouts
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    for name in seconds:
        bounds = {s.labels["le"]: s.value for s in families[name].samples if s.name.endswith("_bucket")}
        assert bounds["30.0"] == 0 and bounds["60.0"] == 1, (name, bounds)
    refusals = {s.labels["status"]: s.value for s in families["vitc_protocol_refusals"].samples
                if s.name == "vitc_protocol_refusals_total"}
    assert refusals == {"400": 0, "408": 0, "414": 0, "431": 2, "501": 0, "503": 0, "505": 0, "other": 1}
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds", "process_cpu_seconds",
                 "python_gc_collections", "python_info"):
        assert name in families, name


def test_access_log_fields_a_client_controls_are_bounded(server, client):
    path = "/v1/models/" + "%01" * 19000 + "/classify"
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 1\r\n"
    assert _raw(server.port, (head + "X-Request-Id: " + "r" * 5000 + "\r\n\r\nx").encode()).startswith(
        b"HTTP/1.1 404")
    assert client.post(CLASSIFY, content=animal_pngs(1)[0], headers={"content-type": "image/png"}).status_code == 200
    end = time.monotonic() + 10  # the access line is written once the answer is sent: it may trail the client
    while f'"path": "{CLASSIFY}"' not in server.logs() and time.monotonic() < end:
        time.sleep(0.05)
    lines = [line for line in server.logs().splitlines() if '"vitc.access"' in line]
    long = [json.loads(line) for line in lines if "\\u0001" in line]
    assert len(long) == 1 and len(max(lines, key=len)) < 4096  # 252 KB before: a shipper splits it at 16 KiB
    entry = long[0]
    assert entry["path"] == ("/v1/models/" + "\x01" * 19000)[:256] and entry["path_length"] == 11 + 19000 + 9
    assert entry["model"] == "_unknown" and entry["status"] == 404 and len(entry["request_id"]) == 64
    ok = [json.loads(line) for line in lines if f'"path": "{CLASSIFY}"' in line][-1]
    assert ok["model"] == "fake" and "path_length" not in ok


def test_a_log_line_stays_short_whatever_text_reaches_it():
    from serve.logs import JsonFormatter

    record = logging.LogRecord("vitc.serve", logging.ERROR, __file__, 1, "unhandled error", (), None)
    record.detail = "a client's bytes in an exception message: " + "\x01" * 100_000 + " (the end)"
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert len(line) < 16384 and entry["msg"] == "unhandled error"
    assert entry["detail"].startswith("a client's bytes") and entry["detail"].endswith("(the end)")
    assert "characters cut" in entry["detail"]


def test_a_malformed_request_writes_no_uvicorn_warning(server):
    for request in (b"GET / HTTP/1.1\r\n\r\n", b"BREW / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01garbage\r\n\r\n"):
        assert _raw(server.port, request).startswith(b"HTTP/1.1 ")
    time.sleep(0.2)
    warnings = [e for e in _entries(server) if e["logger"] == "uvicorn.error" and e["level"] == "warning"]
    assert not warnings, warnings


def test_statistics_count_valid_requests_only_the_same_way_on_v1_and_v2(client):
    def fails() -> int:
        return client.get("/v2/models/fake/stats").json()["model_stats"][0]["inference_stats"]["fail"]["count"]

    before = fails()
    png = {"content-type": "image/png"}
    refused = [
        client.post(CLASSIFY, content=b"\x89PNG\r\n\x1a\nnot an image", headers=png),  # does not decode
        client.post(CLASSIFY, files=[("file", ("a.png", animal_pngs(1)[0], "image/png")),
                                     ("file", ("b.png", b"junk", "image/png"))]),  # one part does not decode
        client.post(CLASSIFY, content=animal_pngs(1)[0], headers=png, params={"top_k": 11}),  # 10 classes
        client.post(CLASSIFY, content=animal_pngs(1)[0], headers=png, params={"top_k": 0}),
        client.post(V2, json=_tensor(shape=(2, 3, 32, 31))),  # wrong shape
        client.post(V2, json=_tensor(datatype="FP64")),  # wrong datatype
        # more images than --max-queue-size 4: it can never be admitted
        client.post(CLASSIFY, files=[("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(animal_pngs(5))]),
    ]
    assert [r.status_code for r in refused] == [400, 400, 422, 422, 400, 400, 413], [r.text for r in refused]
    assert fails() == before  # a client's invalid request is no failed inference (as Triton counts)
    counted = client.post(V2, json=_tensor(value=3e38))  # valid, but the model's outputs overflow
    assert counted.status_code == 422, counted.text
    assert fails() == before + 1


def test_a_multipart_request_counts_each_file_alike_in_success_queue_and_compute(client):
    def inference_stats() -> dict:
        return client.get("/v2/models/fake/stats").json()["model_stats"][0]["inference_stats"]

    before = inference_stats()
    r = client.post(CLASSIFY, files=[("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(animal_pngs(3))])
    assert r.status_code == 200, r.text
    after = inference_stats()
    grown = {k: after[k]["count"] - before[k]["count"] for k in ("success", "queue", "compute_infer")}
    assert grown == {"success": 3, "queue": 3, "compute_infer": 3}, grown


def test_a_stalled_model_is_logged_gauged_counted_and_probed_with_backoff(bundle, tmp_path):
    """With a timeout no call can meet, every probe times out: they must pause between tries (they ran back to
    back, a core busy for nothing), and the stall must show in the log and the metrics."""
    env = fake_runtime.server_env(tmp_path)
    computed = tmp_path / "computed.log"
    with start_server(["--model", f"fake={bundle}", "--backend", "fake", "--inference-timeout-s", "0.000001",
                       "--parallel", "1", "--no-access-log"],
                      tmp_path / "server.log", env) as server:
        client = httpx.Client(base_url=server.url, timeout=30)
        assert _sample(client, "vitc_model_ready", model="fake") == 1
        assert _sample(client, "vitc_inference_timeouts_total", model="fake") == 0
        done = len(computed.read_text().split()) if computed.exists() else 0
        r = client.post(V2, json=_tensor(first=1.0))
        assert r.status_code == 504, r.text
        time.sleep(3.0)
        probes = computed.read_text().split()[done:].count("0")  # a probe is a row of zeros
        assert 1 <= probes <= 5, probes  # thousands without a pause after a probe that timed out
        assert client.get("/v2/health/ready").status_code == 400
        assert _sample(client, "vitc_model_ready", model="fake") == 0
        assert _sample(client, "vitc_inference_timeouts_total", model="fake") == 1
        stalled = [e for e in _entries(server) if e["msg"] == "model stalled"]
        assert len(stalled) == 1 and stalled[0]["level"] == "warning"  # seen at --log-level warning too
        assert stalled[0]["model"] == "fake" and stalled[0]["timeout_s"] == 1e-6
        t0 = time.monotonic()
    assert server.proc.returncode == 0 and time.monotonic() - t0 < 10  # a pause between probes ends at shutdown


@contextlib.contextmanager
def _records(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records `name` logs meanwhile (a handler of its own: the server's loggers may not propagate)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_unloads_and_failed_loads_are_logged(tmp_path):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path / "fake")
    with fake_runtime.registered(), _records("vitc.serve") as records:
        settings = Settings(model_control_mode="explicit",
                            models=[f"fake={bundle}"], backend="fake", access_log=False, graceful_timeout_s=5)
        with TestClient(create_app(settings)) as c:
            assert c.post("/v2/repository/models/fake/unload").status_code == 200
            (bundle / fake_runtime.WEIGHTS).write_bytes(b"tampered")
            r = c.post("/v2/repository/models/fake/load")
            assert r.status_code == 400
            assert c.post("/v2/repository/models/" + "x" * 100 + "/load").status_code == 400  # not a known model
    logged = [(r.levelname, r.getMessage(), getattr(r, "model", None)) for r in records]
    assert ("INFO", "unloaded", "fake") in logged
    failed = [r for r in records if r.getMessage() == "load failed"]
    assert len(failed) == 1, logged  # a name a client made up is answered, not logged
    assert failed[0].levelname == "WARNING" and failed[0].model == "fake"
    # The log names the file where it lies, for the operator; the answer within the bundle, for the client.
    assert str(bundle / fake_runtime.WEIGHTS) in failed[0].reason
    assert failed[0].reason.replace(f"{bundle}/", "") == r.json()["error"]
