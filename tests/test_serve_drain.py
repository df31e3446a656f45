"""Every admitted request is answered, and the process ends, however a drain runs out: a reload or unload whose
drain ends while a batch computes, a SIGTERM while a backend call is hung or a load is in progress. And a request
larger than the model's bound is a client error, not a 503 to retry for ever. Real server processes of
tests/fake_runtime.py, whose rows hang on demand (HANG while the hang file exists) and whose loads block while
$FAKE_RUNTIME_LOAD_HANG exists."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from test_serve_fixtures import animal_pngs, client_of, fake_server

from serve.batching import BatcherClosed, DynamicBatcher

V2 = "/v2/models/fake/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("drain") / "fake")


def _metric(client: httpx.Client, name: str) -> float:
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(name)]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def _entries(log: str) -> list[dict]:
    return [json.loads(ln) for ln in log.splitlines() if ln.startswith("{")]


@pytest.mark.parametrize("action", ["load", "unload"])
def test_a_batch_still_computing_when_the_drain_runs_out_is_answered_503(bundle, tmp_path, action):
    """The old version's close() cancelled the batch's task past the drain, and its requests were never answered:
    no 504 (the task enforcing the inference timeout was gone), no 503, the in-flight gauge raised for good."""
    (tmp_path / "hang").touch()
    try:
        with fake_server(bundle, tmp_path, "--graceful-timeout-s", "0.3", "--parallel", "1", "--model-control-mode",
                         "explicit") as server, client_of(server) as client, ThreadPoolExecutor(1) as pool:
            hung = pool.submit(client.post, V2, content=fake_runtime.request_body(fake_runtime.HANG), timeout=10)
            end = time.monotonic() + 5
            while fake_runtime.HANG not in _computed(tmp_path) and time.monotonic() < end:
                time.sleep(0.02)
            assert client.post(f"/v2/repository/models/fake/{action}").status_code == 200
            r = hung.result(timeout=15)  # without the fix: httpx.ReadTimeout after 10 s
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["error"] == "model 'fake' shut down while this request ran"
            assert _metric(client, "vitc_in_flight_requests") == 0  # the /metrics request itself is not counted
            (tmp_path / "hang").unlink()
            if action == "load":  # the new version serves
                assert client.post(V2, content=fake_runtime.request_body(1.0)).status_code == 200
    finally:
        (tmp_path / "hang").unlink(missing_ok=True)


def _computed(tmp_path: Path) -> list[float]:
    log = tmp_path / "computed.log"
    return [float(v) for v in log.read_text().split()] if log.exists() else []


def test_a_close_that_is_cancelled_or_runs_out_still_answers_every_request():
    """However close() ends (its own task cancelled, as a shutdown cancels a retiring version's), no request is left
    waiting: the one computing and the ones queued behind it all get BatcherClosed."""
    import threading

    gate = threading.Event()

    def blocked(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        return x.sum(axis=1, keepdims=True)

    async def main() -> list[object]:
        b = DynamicBatcher("m", blocked, max_batch=1, max_delay_s=0, max_queue=10, parallel=1)
        await b.start()
        pending = [asyncio.ensure_future(b.submit(np.ones((1, 2), np.float32))) for _ in range(3)]
        await asyncio.sleep(0.05)  # the first is computing, two are queued
        closing = asyncio.ensure_future(b.close(timeout=10))
        await asyncio.sleep(0.05)
        closing.cancel()
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 2)
        gate.set()
        return results

    results = asyncio.run(main())
    assert all(isinstance(r, BatcherClosed) for r in results), results
    assert [str(r).split(" shut down ")[1] for r in results] == [
        "while this request ran", "before this request ran", "before this request ran"]


def _stop_within(server, seconds: float) -> tuple[int, float]:  # noqa: ANN001 - serve.launch.ServerProcess
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(seconds)
    except Exception:
        server.proc.kill()
        server.proc.wait()
        raise AssertionError(f"still running {seconds:g} s after SIGTERM") from None
    return code, time.monotonic() - t0


@pytest.mark.parametrize("graceful", ["0.5", "4"])
def test_sigterm_ends_the_process_while_a_backend_call_is_hung(bundle, tmp_path, graceful):
    """The 504 was answered, but the pool's hung worker thread was joined at interpreter exit: the process lived
    on until the call returned, or until it was killed. And the models' drain waited a second full
    --graceful-timeout-s for that call, whose request had its answer already: one budget for the stop, not two."""
    (tmp_path / "hang").touch()
    try:
        with fake_server(bundle, tmp_path, "--inference-timeout-s", "0.3", "--graceful-timeout-s", graceful,
                         "--parallel", "1") as server, client_of(server) as client:
            r = client.post(V2, content=fake_runtime.request_body(fake_runtime.HANG))
            assert r.status_code == 504, r.text
            code, took = _stop_within(server, 15)
            assert code == 0 and took < 3, (code, took)
    finally:
        (tmp_path / "hang").unlink(missing_ok=True)
    warnings = [e for e in _entries(server.logs()) if e["msg"] == "exiting without waiting for work still running"]
    assert [(e["level"], e["abandoned"]) for e in warnings] == [
        ("warning", ["a backend call of model 'fake' still running"])]
    assert any(e["msg"] == "stopped" for e in _entries(server.logs()))  # the normal shutdown ran first


def test_sigterm_ends_the_process_while_a_load_is_in_progress(bundle, tmp_path, monkeypatch):
    """The load ran in the loop's default executor, which asyncio.run waits for at exit: a minute-long load (a
    TensorRT engine build) held the process past any stop timeout. It answers 503 and exits, saying what it left."""
    loading = tmp_path / "load-hang"
    monkeypatch.setenv("FAKE_RUNTIME_LOAD_HANG", str(loading))  # the server process inherits it
    try:
        with fake_server(bundle, tmp_path, "--graceful-timeout-s", "0.5", "--model-control-mode",
                         "explicit") as server, client_of(server) as client, ThreadPoolExecutor(1) as pool:
            loading.touch()
            load = pool.submit(client.post, "/v2/repository/models/fake/load", timeout=20)
            end = time.monotonic() + 5
            while loading.read_text() != "loading" and time.monotonic() < end:
                time.sleep(0.02)
            assert loading.read_text() == "loading", "the load never started"
            code, took = _stop_within(server, 8)
            assert code == 0 and took < 4, (code, took)
            r = load.result(timeout=5)
            assert r.status_code == 503 and r.json()["error"] == "the server is shutting down", r.text
            assert r.headers.get("retry-after") == "1"  # as every other 503: another replica takes the retry
    finally:
        loading.unlink(missing_ok=True)
    entries = _entries(server.logs())
    warnings = [e for e in entries if e["msg"] == "exiting without waiting for work still running"]
    assert [e["abandoned"] for e in warnings] == [["a load still running"]]
    # The drain's documented end, not a fault to page anyone for: uvicorn's error is logged as a warning.
    cut = [e for e in entries if "timeout graceful shutdown exceeded" in e["msg"]]
    assert [e["level"] for e in cut] == ["warning"], cut


def test_normal_shutdown_exits_quietly(bundle, tmp_path):
    """No thread left over: no warning, exit 0, as before."""
    with fake_server(bundle, tmp_path, "--graceful-timeout-s", "0.5") as server, client_of(server) as client:
        assert client.post(V2, content=fake_runtime.request_body(1.0)).status_code == 200
        code, _ = _stop_within(server, 8)
    assert code == 0
    assert not [e for e in _entries(server.logs()) if e["level"] == "warning"]


def test_a_request_larger_than_the_queue_bound_is_413_not_a_retryable_503(bundle, tmp_path):
    """It can never fit, so Retry-After made clients retry it for ever; it is the request's own size, so the
    statistics do not count it as a failed inference; the config advertises the batch the server takes."""
    with fake_server(bundle, tmp_path, "--max-queue-size", "4") as server, client_of(server) as client:
        def fails() -> int:
            return client.get("/v2/models/fake/stats").json()["model_stats"][0]["inference_stats"]["fail"]["count"]

        before = fails()
        files = [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(animal_pngs(5))]
        for r, n in ((client.post(V2, content=fake_runtime.request_body(1.0, rows=8)), 8),
                     (client.post("/v1/models/fake/classify", files=files), 5)):
            assert r.status_code == 413 and "retry-after" not in r.headers, r.text
            assert r.json()["error"] == (f"a request of {n} images can never fit model 'fake''s limit of 4 images in "
                                         "progress: split the request, or raise --max-queue-size")
        assert fails() == before
        assert client.get("/v2/models/fake/config").json()["max_batch_size"] == 4
        assert client.post(V2, content=fake_runtime.request_body(1.0, rows=4)).status_code == 200


def test_a_queue_bound_below_the_batch_is_the_one_largest_request_everywhere(bundle, tmp_path):
    """--max-queue-size 3 under --max-batch-size 4: /v1, /v2 config and the batch-size refusal all say 3."""
    with fake_server(bundle, tmp_path, "--max-batch-size", "4", "--max-queue-size", "3") as server, \
            client_of(server) as client:
        info = client.get("/v1/models/fake").json()
        assert info["max_batch"] == info["input"]["max_batch"] == 3
        assert client.get("/v2/models/fake/config").json()["max_batch_size"] == 3
        too_many = client.post(V2, content=fake_runtime.request_body(1.0, rows=5))
        assert too_many.status_code == 400 and "outside 1..3" in too_many.json()["error"], too_many.text
        assert client.post(V2, content=fake_runtime.request_body(1.0, rows=4)).status_code == 413
        assert client.post(V2, content=fake_runtime.request_body(1.0, rows=3)).status_code == 200


def test_a_stop_that_cancels_a_computing_request_logs_no_unretrieved_error(bundle, tmp_path):
    """The handler cancelled at the end of uvicorn's drain left its submit task to be failed by the batcher's close:
    asyncio then logged "Task exception was never retrieved" with a traceback at error level on every such stop."""
    (tmp_path / "hang").touch()
    try:
        with fake_server(bundle, tmp_path, "--inference-timeout-s", "20", "--graceful-timeout-s", "0.5",
                         "--parallel", "1") as server:
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(httpx.post, server.url + V2, content=fake_runtime.request_body(
                    fake_runtime.HANG), timeout=30)
                time.sleep(1.0)  # computing (hung) by now
                code, _ = _stop_within(server, 15)
                answer = pending.result()
            assert code == 0 and answer.status_code == 503, (code, answer.text)
    finally:
        (tmp_path / "hang").unlink(missing_ok=True)
    unretrieved = [e for e in _entries(server.logs()) if "never retrieved" in e["msg"]]
    assert not unretrieved, unretrieved
