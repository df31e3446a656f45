"""Pins found missing by mutation testing: the dynamic batcher with requests of several images (each gets its own
rows back, no batch past max_batch, the batching window measured from a request's arrival), two v2 request
checks (an output the model does not have, a batch of zero), and the chunk-size line bound at its edge.

The batcher runs on its own (a model that echoes its input, so every answer names the rows it came from); the
HTTP checks run against the real app behind serve.httpproto's protocol, in process, on tests/fake_runtime.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import fake_runtime
import httpx
import numpy as np
import pytest
from test_serve_fixtures import in_process_server

from serve.batching import DynamicBatcher, NotReady
from serve.httpproto import MAX_CHUNK_LINE

INFER = "/v2/models/fake/infer"


# --- dynamic batcher -----------------------------------------------------------------------------------------


class Batches:
    """A BatchObserver that keeps (rows, requests) of every batch computed."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def queued(self, model: str, seconds: float) -> None:
        pass

    def batch(self, model: str, rows: int, seconds: float, requests: int = 1) -> None:
        self.seen.append((rows, requests))

    def timed_out(self, model: str) -> None:
        pass


def _request(i: int, rows: int) -> np.ndarray:
    """Request `i` of `rows` images: row j is (i, j), so an echoed answer says whose rows it holds."""
    return np.stack([np.full(rows, i), np.arange(rows)], axis=1).astype(np.float32)


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting for the batcher"
        await asyncio.sleep(0.002)


def test_multi_image_requests_in_shared_batches_get_their_own_rows_and_no_batch_passes_max_batch():
    """Requests of 1, 3, 2, 4, 3, 5, 2, 1 and 3 images queued together (behind a running batch, so the collector
    finds them all waiting) are merged into batches of at most max_batch rows, and each gets exactly its own rows,
    in order: a request after a multi-image one in the same batch once got its neighbour's logits (a 200 with
    another request's answer), and a request that overflowed the batch by one row was taken in."""
    max_batch, sizes = 6, [1, 3, 2, 4, 3, 5, 2, 1, 3]
    gate = threading.Event()
    calls: list[int] = []  # rows of every call to the model, as a fixed-profile engine would receive them

    def echo(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if x[0, 0] < 0:  # the blocker: holds the only inference slot until every request is queued
            gate.wait(10)
        return x.copy()

    seen = Batches()

    async def main() -> list[np.ndarray]:
        b = DynamicBatcher("m", echo, max_batch=max_batch, max_delay_s=0.05, max_queue=100, observer=seen)
        await b.start()
        blocker = asyncio.ensure_future(b.submit(np.array([[-1.0, 0.0]], np.float32)))
        await _until(lambda: calls == [1])
        pending = [asyncio.ensure_future(b.submit(_request(i, n))) for i, n in enumerate(sizes)]
        await _until(lambda: b.depth == len(sizes))
        gate.set()
        outs = await asyncio.gather(*pending)
        await blocker
        await b.close()
        return outs

    outs = asyncio.run(main())
    for i, (n, out) in enumerate(zip(sizes, outs, strict=True)):
        np.testing.assert_array_equal(out, _request(i, n), err_msg=f"request {i} of {n} images got other rows")
    merged = calls[1:]
    assert sum(merged) == sum(sizes) and max(merged) <= max_batch, calls
    assert any(requests >= 3 for _, requests in seen.seen), seen.seen  # multi-image requests really shared batches
    assert max_batch in merged, calls  # and batches filled up to the bound, not merely below it


def test_a_stall_refuses_the_request_held_over_from_the_stuck_batch_at_once():
    """max_batch 4: A (3 rows) hangs, B (3 rows) does not fit A's batch and is held over for the next one. When A's
    batch passes the timeout, B is refused (NotReady: 503) with what was queued, not left waiting for the stuck
    call (it held the drain and its client until the hung call returned)."""
    gate = threading.Event()

    def model(x: np.ndarray) -> np.ndarray:
        if x[0, 0] < 0:
            gate.wait(10)
        return x.copy()

    async def main() -> tuple[float, BaseException | None]:
        b = DynamicBatcher("m", model, max_batch=4, max_delay_s=0.5, max_queue=100, timeout_s=0.5)
        await b.start()
        with b.admit(3), b.admit(3):  # both admitted: the collector waits for B to gather A's batch
            a = asyncio.ensure_future(b.submit(np.full((3, 1), -1.0, np.float32)))
            held = asyncio.ensure_future(b.submit(np.ones((3, 1), np.float32)))
            start = time.perf_counter()
            done, _ = await asyncio.wait([held], timeout=5)
            waited = time.perf_counter() - start
            gate.set()
            with contextlib.suppress(Exception):
                await a
        await b.close()
        return waited, (held.exception() if done else None)

    waited, refused = asyncio.run(main())
    assert isinstance(refused, NotReady), refused
    assert waited < 3, f"the held-over request waited {waited:.2f} s"


def test_the_batching_window_runs_from_arrival_not_from_when_the_collector_takes_the_request():
    """A request that waited behind a running batch for longer than max_delay is dispatched as soon as a slot is
    free, even though another admitted request (still decoding) could join it: its window (max_delay after it was
    queued) is over. Measured from pickup, it waited a further full max_delay."""
    delay, held = 0.8, 0.9  # the blocker runs `held` s after the request is queued: past its whole window
    started, gate = threading.Event(), threading.Event()

    def model(x: np.ndarray) -> np.ndarray:
        if x[0, 0] < 0:
            started.set()
            gate.wait(10)
        return x.copy()

    async def main() -> float:
        b = DynamicBatcher("m", model, max_batch=8, max_delay_s=delay, max_queue=10)
        await b.start()
        blocker = asyncio.ensure_future(b.submit(np.array([[-1.0]], np.float32)))  # alone: no window
        await _until(started.is_set)  # computing: the only inference slot is taken
        # The late request and a companion admitted but not yet submitted (decoding): a companion is worth waiting
        # for while the window is open, so only the window's end dispatches the request.
        with b.admit(), b.admit():
            late = asyncio.ensure_future(b.submit(np.array([[7.0]], np.float32)))
            await asyncio.sleep(held)
            released = time.perf_counter()
            gate.set()
            await blocker
            out = await late
            waited = time.perf_counter() - released
        await b.close()
        assert float(out[0, 0]) == 7.0
        return waited

    waited = asyncio.run(main())
    # Dispatched at once: milliseconds, given half the window for a busy machine; a fresh window waits all of it.
    assert waited < delay / 2, f"the request waited {waited:.3f} s more after its {delay} s window had passed"


# --- over HTTP -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> Iterator[int]:
    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("pins") / "fake")
    with in_process_server(bundle) as p:
        yield p


def _v2(port: int, body: dict) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}{INFER}", content=json.dumps(body).encode(), timeout=20)


def _image_input(rows: int) -> dict:
    return {"name": "input", "shape": [rows, 3, 32, 32], "datatype": "FP32", "data": [0.25] * (rows * 3 * 32 * 32)}


def test_v2_asking_for_an_output_the_model_does_not_have_is_a_400_naming_it(port):
    """As Triton answers: an unknown requested output is refused, not answered with the model's one output under
    its own name (a client looking the asked-for output up by name finds nothing in a 200)."""
    output = httpx.get(f"http://127.0.0.1:{port}/v2/models/fake", timeout=20).json()["outputs"][0]["name"]
    asked = _v2(port, {"inputs": [_image_input(1)], "outputs": [{"name": output}]})
    assert asked.status_code == 200 and asked.json()["outputs"][0]["name"] == output, asked.text[:300]
    r = _v2(port, {"inputs": [_image_input(1)], "outputs": [{"name": "probs"}]})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    reason = r.json()["error"]
    assert "'probs'" in reason and output in reason, reason


def test_v2_a_batch_of_zero_images_is_a_400_with_a_json_reason(port):
    r = _v2(port, {"inputs": [_image_input(0)]})
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    reason = r.json()["error"]
    assert "batch size 0" in reason, reason


def _unfinished_chunk_line(port: int, line: bytes) -> socket.socket:
    """A connection that has sent a chunked v2 request's head and `line`, the start of a chunk-size line, with no
    LF yet (what the line bound counts)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + line)
    return sock


def _answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """The status line and body of the answer on `sock` (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    top, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(v) for k, _, v in (ln.partition(b":") for ln in top.split(b"\r\n")[1:])
                  if k.strip().lower() == b"content-length")
    while len(rest) < length:
        piece = sock.recv(65536)
        assert piece
        rest += piece
    return top.split(b"\r\n")[0], rest


def test_a_chunk_size_line_just_past_its_bound_is_refused_and_one_at_it_is_served(port):
    """The bound is MAX_CHUNK_LINE bytes of an unfinished line: one byte more is a JSON 400 at once (without the
    rest of the line ever coming); a line of exactly MAX_CHUNK_LINE bytes (an extension a client may send) reads on
    to a 200."""
    body = fake_runtime.request_body(1.0)
    head = b"%x;e=" % len(body)
    over = _unfinished_chunk_line(port, head + b"a" * (MAX_CHUNK_LINE + 1 - len(head)))
    try:
        over.settimeout(10)  # refused as it arrives: it never waits for the line's end
        status, payload = _answer(over)
    except TimeoutError:
        pytest.fail(f"a {MAX_CHUNK_LINE + 1}-byte chunk-size line was not refused")
    finally:
        over.close()
    assert status.startswith(b"HTTP/1.1 400 "), (status, payload[:300])
    assert f"longer than {MAX_CHUNK_LINE} bytes" in json.loads(payload)["error"], payload[:300]

    at = _unfinished_chunk_line(port, head + b"a" * (MAX_CHUNK_LINE - len(head)))
    try:
        time.sleep(0.2)  # let the server read the unfinished line on its own, as the bound counts it
        at.sendall(b"\r\n" + body + b"\r\n0\r\n\r\n")
        status, payload = _answer(at)
    finally:
        at.close()
    assert status.startswith(b"HTTP/1.1 200 "), (status, payload[:300])
    assert len(json.loads(payload)["outputs"][0]["data"]) > 0
