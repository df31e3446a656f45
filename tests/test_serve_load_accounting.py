"""Requests under load are answered and counted as what happened to them: an answer already computed is sent even
when the work pool is full (uncompressed, rather than a 503 that would have it computed again); a v2 body refused
because the pool is full is a failed request in the model's statistics, as on /v1; and a client that leaves is a
"queued" disconnect only when its rows were dropped before a batch took them ("computing" once one did)."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve_fixtures import client_of, fake_server

V2 = "/v2/models/fake/infer"
BUSY = "decoding jobs in progress"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The legacy bundle plus one servable fake artifact."""
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("load_accounting") / "fake")


@contextlib.contextmanager
def _app(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app on the fake runtime, its work pool one thread and no queue (one held job fills it); the backend logs
    what it computes and hangs on HANG rows while tmp_path/hang exists."""
    from serve.app import create_app
    from serve.settings import Settings

    monkeypatch.setenv("FAKE_RUNTIME_LOG", str(tmp_path / "computed.log"))
    monkeypatch.setenv("FAKE_RUNTIME_HANG", str(tmp_path / "hang"))
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False, parallel=1,
                            decode_threads=1, decode_queue=0)
        with TestClient(create_app(settings)) as c:
            yield c


@contextlib.contextmanager
def _pool_full(c: TestClient) -> Iterator[None]:
    """The app's work pool full for the block: its one thread holds a job, run from the app's loop as a request's."""
    started, gate = threading.Event(), threading.Event()

    def held() -> None:
        started.set()
        gate.wait(30)

    job = c.portal.start_task_soon(c.app.state.work_pool.run, held)
    try:
        assert started.wait(10)
        yield
    finally:
        gate.set()
        job.result(10)


def _computed(tmp_path: Path) -> list[float]:
    """The first value of every row the fake backend computed."""
    log = tmp_path / "computed.log"
    return [float(v) for v in log.read_text().split()] if log.exists() else []


def _wait_until(condition: Callable[[], bool]) -> None:
    """Poll `condition` until it holds (10 s at most), then assert it."""
    end = time.monotonic() + 10
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)
    assert condition()


def _stats(c: TestClient | httpx.Client) -> tuple[int, int, int]:
    """The model's (success, fail, inference_count) in /v2/models/fake/stats."""
    s = c.get("/v2/models/fake/stats").json()["model_stats"][0]
    return s["inference_stats"]["success"]["count"], s["inference_stats"]["fail"]["count"], s["inference_count"]


def _expected(bundle: Path, body: bytes) -> np.ndarray:
    """What the fake backend answers for a v2 JSON request body."""
    tensor = json.loads(body)["inputs"][0]
    x = np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])
    return fake_runtime.logits(np.load(bundle / fake_runtime.WEIGHTS), x)


def _logits(r: httpx.Response) -> np.ndarray:
    """The logits of a v2 JSON answer."""
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _answered_while_pool_full(c: TestClient, tmp_path: Path, body: bytes) -> httpx.Response:
    """`body` sent asking for gzip; parsed while the pool is free, its inference held until the pool is full, so
    that its answer, computed, finds the pool full when it is compressed."""
    (tmp_path / "hang").touch()
    answers: list[httpx.Response] = []
    asker = threading.Thread(target=lambda: answers.append(c.post(V2, content=body,
                                                                  headers={"accept-encoding": "gzip"})))
    asker.start()
    _wait_until(lambda: fake_runtime.HANG in _computed(tmp_path))  # parsed, and in the backend
    with _pool_full(c):
        (tmp_path / "hang").unlink()
        asker.join(30)
    return answers[0]


def test_a_computed_v2_answer_is_sent_uncompressed_when_the_work_pool_is_full(bundle, tmp_path, monkeypatch):
    body = fake_runtime.request_body(fake_runtime.HANG, rows=2)
    with _app(bundle, tmp_path, monkeypatch) as c:
        r = _answered_while_pool_full(c, tmp_path, body)
        # Not a 503 to retry (a retry computes it again): the answer, as it is, which every client reads.
        assert r.status_code == 200, r.text
        assert "content-encoding" not in r.headers and r.headers["vary"] == "Accept-Encoding"
        np.testing.assert_allclose(_logits(r), _expected(bundle, body), rtol=1e-5, atol=1e-6)
        assert _stats(c) == (1, 0, 2)  # one success counted, one sent
        # An idle pool still compresses it (a small answer, on the loop).
        again = c.post(V2, content=fake_runtime.request_body(1.0), headers={"accept-encoding": "gzip"})
        assert again.status_code == 200 and again.headers["content-encoding"] == "gzip"


def test_a_computed_v2_answer_is_sent_uncompressed_when_no_thread_can_compress_it(bundle, tmp_path, monkeypatch):
    from serve.routes import v2

    body = fake_runtime.request_body(fake_runtime.HANG)
    with _app(bundle, tmp_path, monkeypatch) as c:
        monkeypatch.setattr(v2, "INLINE_COMPRESSION", 0)  # every answer's compression goes to a decode thread
        (tmp_path / "hang").touch()
        answers: list[httpx.Response] = []
        asker = threading.Thread(target=lambda: answers.append(c.post(V2, content=body,
                                                                      headers={"accept-encoding": "deflate"})))
        asker.start()
        _wait_until(lambda: fake_runtime.HANG in _computed(tmp_path))
        monkeypatch.setattr(c.app.state.work_pool._pool, "submit", _no_thread)  # a pids limit reached meanwhile
        (tmp_path / "hang").unlink()
        asker.join(30)
        r = answers[0]
        assert r.status_code == 200, r.text
        assert "content-encoding" not in r.headers and r.headers["vary"] == "Accept-Encoding"
        np.testing.assert_allclose(_logits(r), _expected(bundle, body), rtol=1e-5, atol=1e-6)
        assert _stats(c) == (1, 0, 1)


def _no_thread(*_args: object, **_kw: object) -> None:
    """A thread that cannot start (a pids limit), as Python says it."""
    raise RuntimeError("can't start new thread")


def _png() -> bytes:
    """A small valid PNG for /v1."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 60, 200)).save(buf, "PNG")
    return buf.getvalue()


def test_a_v2_body_refused_because_the_work_pool_is_full_is_a_failed_request(bundle, tmp_path, monkeypatch):
    with _app(bundle, tmp_path, monkeypatch) as c:
        warm_up = len(_computed(tmp_path))  # the start's warm-up batch
        # Invalid bodies count nowhere: malformed JSON (refused by the parser), a wrong shape (after it).
        assert c.post(V2, content=b'{"inputs": [').status_code == 400
        wrong = fake_runtime.request_body(1.0).replace(b"[1, 3, 32, 32]", b"[1, 3, 16, 64]")
        assert c.post(V2, content=wrong).status_code == 400
        assert _stats(c) == (0, 0, 0)
        with _pool_full(c):
            r = c.post(V2, content=fake_runtime.request_body(1.0, rows=3))
            assert r.status_code == 503 and BUSY in r.json()["error"] and r.headers["retry-after"] == "1"
            assert _stats(c) == (0, 1, 0)  # a valid request refused for load: one failed request, no inference
            # /v1 counts the same refusal the same way.
            r = c.post("/v1/models/fake/classify", content=_png(), headers={"content-type": "image/png"})
            assert r.status_code == 503 and BUSY in r.json()["error"]
            assert _stats(c) == (0, 2, 0)
        assert c.post(V2, content=fake_runtime.request_body(1.0, rows=3)).status_code == 200
        assert _stats(c) == (1, 2, 3)
    assert _computed(tmp_path)[warm_up:] == [1.0, 1.0, 1.0]  # only the request answered was computed


def _sent(port: int, body: bytes) -> socket.socket:
    """A connection that has sent a whole v2 request and will reset (not close gently) when closed."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(f"POST {V2} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return s


def _metric(c: httpx.Client, prefix: str) -> float:
    """The sum of the /metrics samples whose line starts with `prefix`."""
    lines = [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith(prefix)]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def test_a_disconnect_is_queued_only_when_no_batch_took_its_rows(bundle, tmp_path):
    (tmp_path / "hang").touch()
    gone = 'vitc_client_disconnects_total{model="fake",stage="%s"}'
    with fake_server(bundle, tmp_path, "--parallel", "1", "--max-queue-delay-ms", "0") as server, \
            client_of(server) as c:
        warm_up = len(_computed(tmp_path))  # the start's warm-up batch
        computing = _sent(server.port, fake_runtime.request_body(fake_runtime.HANG))
        _wait_until(lambda: fake_runtime.HANG in _computed(tmp_path))  # its batch runs, held by the backend
        queued = _sent(server.port, fake_runtime.request_body(11.0))
        _wait_until(lambda: _metric(c, 'vitc_queue_depth{model="fake"}') == 1)  # waiting behind that batch
        computing.close()
        queued.close()
        _wait_until(lambda: _metric(c, "vitc_client_disconnects_total") == 2)
        assert _metric(c, gone % "computing") == 1  # taken into a batch: computed all the same
        assert _metric(c, gone % "queued") == 1
        assert _metric(c, 'vitc_queue_depth{model="fake"}') == 0  # left: not waiting, though the batch still runs
        (tmp_path / "hang").unlink()
        assert c.post(V2, content=fake_runtime.request_body(1.0)).status_code == 200  # after the held batch
        assert _computed(tmp_path)[warm_up:] == [fake_runtime.HANG, 1.0]  # the queued rows were dropped, never computed
        assert _stats(c) == (1, 2, 1)
        assert _metric(c, "vitc_client_disconnects_total") == 2
