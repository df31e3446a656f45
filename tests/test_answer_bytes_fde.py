"""Large answers (built in the decode pool, serve.routes.deps.answered) while their clients read slowly or leave: an
answer's bytes stay held in the decode budget until they are handed to the socket, so clients that never read bound
the server's memory by the budget (others wait, then get 503) and give it back when they go; a client that leaves
while its answer is being built is a disconnect (stage "answering"), a failed request in the v2 statistics, and a
build that has not started never runs. The app runs in this process (its budget and pool are read directly) behind
uvicorn and serve.httpproto's protocol; the backend is tests/fake_runtime.py with a 100,000-class head."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fake_runtime
import httpx
import pytest
from test_serve_fixtures import animal_pngs, serving_app
from test_top_k_bounds import wide_bundle

from models.bundle import MAX_CLASSES
from serve.app import create_app
from serve.http_limits import ConnectionLimits
from serve.imaging import BUDGET_PIXEL_BYTES
from serve.responses import HeldResponse
from serve.settings import Settings
from serve.workpool import Kept, PixelBudget

CLASSIFY = f"/v1/models/fake/classify?top_k={MAX_CLASSES}"  # a 6.3 MB answer, built in the decode pool
INFER, STATS = "/v2/models/fake/infer", "/v2/models/fake/stats"
SMALL_WINDOW = 4096  # a client's receive buffer: the kernel takes little of an answer its client does not read


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return wide_bundle(tmp_path_factory.mktemp("answer-bytes") / "fake", MAX_CLASSES)


class RecordingBudget(PixelBudget):
    """The real decode budget, recording every reservation asked of it (what an answer's build reserves)."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels)
        self.asked: list[int] = []

    def reserve(self, pixels: int, *args: Any, **kwargs: Any) -> Any:
        self.asked.append(pixels)
        return super().reserve(pixels, *args, **kwargs)


class Served:
    """An app served on 127.0.0.1:port, with the event loop it runs on."""

    def __init__(self, app: Any, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.app, self.port, self.loop = app, port, loop

    @property
    def budget(self) -> RecordingBudget:
        return self.app.state.pixel_budget

    def on_loop(self, coro: Any) -> Any:
        """Run `coro` on the server's event loop; its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=30)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{self.port}{path}", timeout=30, **kw)

    def metric(self, pattern: str) -> float:
        """The value of the /metrics sample whose line matches `pattern` (0 when absent)."""
        m = re.search(rf"^{pattern} (\S+)$", self.get("/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0


@contextlib.contextmanager
def serving(bundle: Path, send_s: float = 30.0, **settings: Any) -> Iterator[Served]:
    """`bundle` on the fake runtime, served in this process with `settings` (and `send_s` for a client to take
    none of an answer), its budget a RecordingBudget."""
    with fake_runtime.registered():
        config = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False, **settings)
        app = create_app(config)
        app.state.pixel_budget = RecordingBudget(config.decode_budget_pixels)
        with serving_app(app, ConnectionLimits(send_s, 200)) as (port, server):
            yield Served(app, port, server.servers[0].get_loop())


def _until(done: Callable[[], object], seconds: float = 20) -> bool:
    """Poll `done()` until it is true or `seconds` pass; whether it became true."""
    end = time.monotonic() + seconds
    while not done():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def _request(path: str, body: bytes, content_type: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
             *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _png_request(*headers: str, version: str = "1.1") -> bytes:
    request = _request(CLASSIFY, animal_pngs(1)[0], "image/png", *headers)
    return request.replace(b" HTTP/1.1\r\n", f" HTTP/{version}\r\n".encode(), 1)


def _v2_body() -> dict:
    """One row ranked whole (100,000 entries): a small JSON body (an 8 KB upload is read at once)."""
    return {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0] * 3072}],
            "outputs": [{"name": "logits", "parameters": {"classification": MAX_CLASSES}}]}


def _v2_request(*headers: str) -> bytes:
    return _request(INFER, json.dumps(_v2_body()).encode(), "application/json", *headers)


def _slow_reader(port: int, request: bytes) -> socket.socket:
    """A client that sends `request` and reads none of its answer (yet): a small receive window."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_WINDOW)
    s.connect(("127.0.0.1", port))
    s.sendall(request)
    return s


def _status_line(s: socket.socket) -> bytes:
    """The answer's status line as far as it has arrived, read without taking it off the socket."""
    try:
        return s.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def _read_answer(s: socket.socket) -> tuple[bytes, bytes]:
    """The whole answer on `s` (Content-Length framed): its head and its body."""
    s.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(1 << 20)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
    while len(body) < length:
        chunk = s.recv(1 << 20)
        assert chunk, "the connection closed before the answer's end"
        body += chunk
    return head, body


# --- (1) an answer's bytes stay held in the decode budget until they are sent -----------------------------------------


def test_unread_large_answers_stay_in_the_decode_budget_until_read_then_arrive_whole(bundle):
    with serving(bundle) as srv:
        reference = srv.post(CLASSIFY, content=animal_pngs(1)[0], headers={"content-type": "image/png"})
        assert reference.status_code == 200
        assert _until(lambda: srv.budget.used == 0)  # a client that reads gives its answer's bytes back
        readers = [_slow_reader(srv.port, _png_request()) for _ in range(3)]
        try:
            assert _until(lambda: all(_status_line(s) == b"HTTP/1.1 200" for s in readers), 60)
            time.sleep(0.3)  # what the kernel takes of an answer is in by now
            # The bodies not yet read (the kernel takes a few hundred KB of each at most) are held.
            body_pixels = len(reference.content) // BUDGET_PIXEL_BYTES
            assert srv.budget.used >= 3 * body_pixels * 0.8, (srv.budget.used, body_pixels)
            for s in readers:  # read at last: the same bytes, and the budget given back
                head, body = _read_answer(s)
                assert body == reference.content
        finally:
            for s in readers:
                s.close()
        assert _until(lambda: srv.budget.used == 0), srv.budget.used


# An answer that ends its connection is held as long: uvicorn closes the transport in the answer's last send, and a
# closing transport still holds what it has not sent (they were released at once: every such client got its 200).
ENDINGS = {"keep-alive": ((), "1.1"), "connection-close": (("Connection: close",), "1.1"), "http/1.0": ((), "1.0")}


@pytest.mark.parametrize("ending", ENDINGS)
def test_clients_that_never_read_large_answers_get_503_once_the_budget_holds_theirs_and_free_it_when_gone(bundle,
                                                                                                         ending):
    # 8 M pixels (40 MB): one answer's build (6.9 M) fits beside one unread answer's bytes (1.3 M) only if ...
    # it does not: every client after the first that does not read waits, then gets 503, instead of more memory.
    headers, version = ENDINGS[ending]
    with serving(bundle, max_image_pixels=1_000_000, decode_budget_pixels=8_000_000, decode_threads=4) as srv:
        clients = [_slow_reader(srv.port, _png_request(*headers, version=version)) for _ in range(4)]
        try:
            assert _until(lambda: all(_status_line(s).startswith(b"HTTP/1.1 ") for s in clients), 60)
            statuses = sorted(_status_line(s)[9:] for s in clients)
            assert statuses == [b"200", b"503", b"503", b"503"], statuses
            assert srv.budget.used > 0  # the one answer given, not read, is held
        finally:
            for s in clients:
                s.close()  # gone without reading
        assert _until(lambda: srv.budget.used == 0), srv.budget.used
        again = srv.post(CLASSIFY, content=animal_pngs(1)[0], headers={"content-type": "image/png"})
        assert again.status_code == 200 and len(again.json()["predictions"]) == MAX_CLASSES
        assert _until(lambda: srv.budget.used == 0), srv.budget.used


def test_an_unread_large_answer_ends_its_request_once_written_freeing_its_body_budget(bundle):
    """Held is the answer's memory, not its request: once the answer is written the request is done (not in flight,
    its body's place in --max-buffered-bytes free for others' uploads), while its bytes wait in the decode budget
    for the client. (Held in the request, an unread answer kept its upload counted and made others' uploads 503.)"""
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (320, 320, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(noise).save(png, "PNG")
    upload = png.getvalue()  # ~300 KB: two do not fit the body budget below at once
    with serving(bundle, max_body_bytes=400_000, max_buffered_bytes=400_000) as srv:
        reader = _slow_reader(srv.port, _request(CLASSIFY, upload, "image/png"))
        try:
            assert _until(lambda: _status_line(reader) == b"HTTP/1.1 200", 60)
            assert _until(lambda: srv.metric("vitc_in_flight_requests") == 0)
            assert srv.budget.used > 0  # its answer, unread, still held
            other = srv.post("/v1/models/fake/classify?top_k=1", content=upload, headers={"content-type": "image/png"})
            assert other.status_code == 200, other.text
        finally:
            reader.close()
        assert _until(lambda: srv.budget.used == 0), srv.budget.used


def test_a_compressed_v2_json_answer_is_held_until_read_and_arrives_as_the_identity_one(bundle):
    # FP32 outputs in JSON, 4 rows x 100,000 values: 7.6 MB, 3.4 MB gzipped (more than the kernel takes unread).
    body = {"inputs": [{"name": "input", "shape": [4, 3, 32, 32], "datatype": "FP32",
                        "data": [(i * 7) % 10 for i in range(4 * 3072)]}]}
    with serving(bundle) as srv:
        plain = srv.post(INFER, json=body, headers={"accept-encoding": "identity"})
        assert plain.status_code == 200
        reader = _slow_reader(srv.port, _request(INFER, json.dumps(body).encode(), "application/json",
                                                 "Accept-Encoding: gzip"))
        try:
            assert _until(lambda: _status_line(reader) == b"HTTP/1.1 200", 60)
            time.sleep(0.3)
            held = srv.budget.used
            head, packed = _read_answer(reader)
            assert re.search(rb"(?im)^content-encoding: gzip\r?$", head)
            assert gzip.decompress(packed) == plain.content
            assert held * BUDGET_PIXEL_BYTES >= len(packed), (held, len(packed))  # the bytes it sends, held
        finally:
            reader.close()
        assert _until(lambda: srv.budget.used == 0), srv.budget.used


def test_a_kept_reservation_outlives_its_block_until_released_and_a_job_released_early_gives_its_own_back():
    budget = PixelBudget(100)
    kept = Kept(budget)
    with budget.reserve(40, kept=kept):
        pass
    assert budget.used == 40  # handed on: held past the block
    kept.shrink(10)
    assert budget.used == 10  # the answer's bytes, not the peak of building it
    kept.release()
    kept.release()
    assert budget.used == 0
    abandoned = Kept(budget)
    abandoned.release()  # its client left while the job ran
    with budget.reserve(40, kept=abandoned):
        assert budget.used == 40
    assert budget.used == 0
    failed = Kept(budget)
    with pytest.raises(ValueError), budget.reserve(40, kept=failed):
        raise ValueError("the build failed")
    assert budget.used == 0


def test_a_client_reading_a_large_answer_slowly_gets_all_of_it_past_the_send_limit(bundle):
    """The send limit is on a client that takes none of an answer: one that keeps reading a large answer (written
    whole) for longer than the limit gets all of it (it was cut off mid-answer, logged 200)."""
    with serving(bundle, send_s=0.5) as srv:
        reference = srv.post(CLASSIFY, content=animal_pngs(1)[0], headers={"content-type": "image/png"}).content
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(_png_request())
        s.settimeout(30)
        data, start = b"", time.monotonic()
        try:
            while chunk := s.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data and len(data.partition(b"\r\n\r\n")[2]) >= len(reference):
                    break
                time.sleep(0.02)  # about 3 MB/s: the answer takes a few times the limit
        finally:
            s.close()
        assert time.monotonic() - start > 1.0  # the test is what it says: the read outlasted the limit
        assert data.partition(b"\r\n\r\n")[2] == reference


HTTP = {"type": "http"}  # the scope of a request outside serve.httpproto (nothing says when it is sent)


def test_a_held_response_releases_when_its_sending_is_cancelled_or_fails():
    async def stalled(message: dict) -> None:  # a transport that never drains
        if message["type"] == "http.response.body":
            await asyncio.Event().wait()

    async def broken(message: dict) -> None:
        raise OSError("connection reset")

    async def main() -> list[str]:
        released: list[str] = []
        sending = asyncio.ensure_future(HeldResponse(b"x" * 10, lambda: released.append("cancelled"))(HTTP, None,
                                                                                                         stalled))
        await asyncio.sleep(0.01)
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        with contextlib.suppress(OSError):
            await HeldResponse(b"x", lambda: released.append("failed"))(HTTP, None, broken)
        return released

    assert asyncio.run(main()) == ["cancelled", "failed"]


def test_a_held_response_is_released_by_its_connection_once_sent_not_when_it_is_collected():
    """The answer is written whole (one body message, its Content-Length), and its memory stays held until the
    connection says the client has taken it, also after the response object itself is gone."""
    import gc

    sent: list[dict] = []
    waiting: list[Callable[[], None]] = []

    async def send(message: dict) -> None:
        sent.append(message)

    released: list[bool] = []
    body = bytes(range(256)) * 1000
    answer = HeldResponse(body, lambda: released.append(True), media_type="application/json")
    asyncio.run(answer({"type": "http", "vitc.when_sent": waiting.append}, None, send))
    assert (b"content-length", str(len(body)).encode()) in sent[0]["headers"]
    assert [m["body"] for m in sent[1:]] == [body] and len(waiting) == 1
    del answer
    gc.collect()
    assert released == []  # the request is done, its answer not yet taken
    waiting.pop()()
    assert released == [True]


# --- (2) a client that leaves while its answer is built -------------------------------------------------------------


@contextlib.contextmanager
def _pool_taken(srv: Served) -> Iterator[None]:
    """The decode pool's only thread busy for the block (a job that waits for the block's end)."""
    gate = threading.Event()
    job = srv.on_loop(srv.app.state.work_pool.run(gate.wait, 60))
    assert _until(lambda: srv.app.state.work_pool.in_flight == 1)
    try:
        yield
    finally:
        gate.set()
        job.result(30)


def _hanging_request() -> bytes:
    """A v2 request whose row the fake runtime computes only once the hang file is gone; its small answer (binary,
    uncompressed) is built on the event loop."""
    data = [fake_runtime.HANG] + [0] * 3071
    body = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": data}],
            "parameters": {"binary_data_output": True}}
    return _request(INFER, json.dumps(body).encode(), "application/json", "Accept-Encoding: identity")


@contextlib.contextmanager
def _answer_waiting_for_the_pool(srv: Served, request: bytes, hang: Path) -> Iterator[socket.socket]:
    """A client that sent `request`, whose answer's build now waits for the decode pool's only thread (taken for
    the block); its rows waited behind a hanging batch (the model runs one at a time) while the pool was taken."""
    hang.touch()
    blocker = _slow_reader(srv.port, _hanging_request())
    client = socket.socket()
    try:
        assert _until(lambda: srv.metric(r'vitc_queue_depth\{model="fake"\}') == 0 and srv.metric(
            r'vitc_in_flight_requests') == 1)  # the hanging row is being computed
        client.connect(("127.0.0.1", srv.port))
        client.sendall(request)
        assert _until(lambda: srv.metric(r'vitc_queue_depth\{model="fake"\}') == 1)  # decoded, its rows queued
        with _pool_taken(srv):
            hang.unlink()  # the hanging batch ends; this one's rows are computed, and its answer is to be built
            assert _until(lambda: srv.app.state.work_pool.in_flight == 2)  # the blocker and this answer's build
            yield client
        assert _read_answer(blocker)[0].startswith(b"HTTP/1.1 200")
    finally:
        hang.unlink(missing_ok=True)
        blocker.close()
        client.close()


def _pool_drained(srv: Served) -> None:
    """Wait until every job given to the pool before now has run (it runs them in order)."""
    srv.on_loop(srv.app.state.work_pool.run(lambda: None)).result(30)


def _stats(srv: Served) -> dict[str, int]:
    inference = srv.get(STATS).json()["model_stats"][0]["inference_stats"]
    return {k: inference[k]["count"] for k in ("success", "fail")}


@pytest.fixture
def hang(tmp_path, monkeypatch) -> Path:
    """The fake runtime's hang switch (read at each inference, in this process)."""
    monkeypatch.setenv("FAKE_RUNTIME_HANG", str(tmp_path / "hang"))
    return tmp_path / "hang"


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_client_leaving_while_its_answer_waits_is_a_disconnect_and_the_build_never_runs(bundle, hang, version):
    request = _png_request() if version == "v1" else _v2_request()
    gone = 'vitc_client_disconnects_total{model="fake",stage="answering"}'
    with serving(bundle, decode_threads=1, parallel=1) as srv:
        with _answer_waiting_for_the_pool(srv, request, hang) as client:
            asked = len(srv.budget.asked)  # the decodes and parses so far
            client.close()
            assert _until(lambda: srv.metric(re.escape(gone)) == 1, 10), srv.get("/metrics").text[-3000:]
        _pool_drained(srv)
        # The abandoned build was cancelled before it started: it reserved nothing, and took no thread's time.
        assert srv.budget.asked[asked:] == []
        assert srv.budget.used == 0
        assert srv.app.state.work_pool.in_flight == 0
        assert srv.metric(r'vitc_client_disconnects_total\{model="fake",stage="(upload|queued|computing)"\}') == 0


def test_a_v2_client_leaving_while_its_answer_is_built_is_a_failed_request_in_the_statistics(bundle, hang):
    closed = r'vitc_requests_total\{endpoint="/v2/models/\{name\}/infer",model="fake",status="499"\}'
    with serving(bundle, decode_threads=1, parallel=1) as srv:
        before = _stats(srv)
        with _answer_waiting_for_the_pool(srv, _v2_request(), hang) as client:
            client.close()
            _until(lambda: srv.metric(closed) == 1, 3)  # seen while its build still waits (once the fix is in)
        assert _until(lambda: srv.metric(closed) == 1, 10), srv.get("/metrics").text[-3000:]
        # The hanging request answered is a success; the one whose client left, a failure.
        assert _stats(srv) == {"success": before["success"] + 1, "fail": before["fail"] + 1}
        _pool_drained(srv)
        assert _until(lambda: srv.budget.used == 0), srv.budget.used


def test_a_held_answer_never_sent_gives_its_budget_back_once():
    """A HeldResponse whose task is cancelled before it is sent still gives its memory back (once), and one sent
    gives it back once, not again when it is collected."""
    import gc

    from serve.responses import HeldResponse

    calls: list[int] = []
    unsent = HeldResponse(b"x" * 10, lambda: calls.append(1), media_type="application/json")
    del unsent
    gc.collect()
    assert calls == [1]

    async def sent() -> None:
        answer = HeldResponse(b"y" * 10, lambda: calls.append(2), media_type="application/json")
        messages: list[dict] = []

        async def send(message: dict) -> None:
            messages.append(message)

        await answer({"type": "http"}, None, send)
        assert b"".join(m.get("body", b"") for m in messages[1:]) == b"y" * 10

    asyncio.run(sent())
    gc.collect()
    assert calls == [1, 2]
