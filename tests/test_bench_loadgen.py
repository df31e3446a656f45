"""The HTTP load generator counts every request it sent: failures from the warm-up that surface in the window, requests
still unanswered when it stops waiting, and a level where nothing succeeded says so; a dead server is not hammered.
Stand-in servers in this process on free loopback ports; timeouts shortened so each test takes about a second."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from stand_in_http import StandInHandler, stand_in_server

from benchmarks import loadgen
from benchmarks.loadgen import Endpoint, closed_loop, open_loop


@contextmanager
def _server(answer) -> Iterator[str]:  # noqa: ANN001 - answer(n) -> HTTP status, or None: never answer
    """A stand-in server whose POST answers with `answer(n)` for its n-th request (1-based); its URL."""
    count = [0]
    lock = threading.Lock()
    release = threading.Event()

    class Handler(StandInHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.read_body()
            with lock:
                count[0] += 1
                status = answer(count[0])
            if status is None:
                release.wait(30)
                return
            self.send_body(b"{}", status)

    with stand_in_server(Handler, "/classify") as url:
        try:
            yield url
        finally:
            release.set()  # the handlers left waiting end before the server shuts down


@pytest.fixture
def short_timeouts(monkeypatch):
    monkeypatch.setattr(loadgen, "TIMEOUT_S", 0.6)
    monkeypatch.setattr(loadgen, "JOIN_GRACE_S", 0.3, raising=False)


def test_a_warm_up_request_that_times_out_in_the_window_is_an_error(short_timeouts):
    """A server that never answers was reported as 0 ok, 0 errors: the only request went out in the warm-up and
    timed out after the window, so it was dropped with the warm-up."""
    with _server(lambda n: None) as url:
        s = closed_loop(Endpoint(url), [b"x"], concurrency=1, seconds=0.3, warmup_s=0.2).summary()
    assert s["ok"] == 0 and s["errors"] == {"TimeoutError": 1} and s["requests"] == 1 and s["error_rate"] == 1.0
    assert s["problem"] == "no request succeeded: 1 x TimeoutError" and s["latency_ms"] is None


def test_failures_that_surface_during_the_warm_up_are_reported_apart():
    """The window's numbers stay the window's, but the warm-up's failures are not hidden either."""
    with _server(lambda n: 500 if n <= 2 else 200) as url:
        s = closed_loop(Endpoint(url), [b"x"], concurrency=1, seconds=0.3, warmup_s=0.3).summary()
    assert s["warmup_errors"] == {"HTTP 500": 2} and s["errors"] == {} and s["ok"] > 0 and s["problem"] is None
    samples = s["latency_samples_ms"]  # the raw latencies, to recompute the percentiles from
    assert samples["n"] == s["ok"] == len(samples["values"].split()) and samples["every"] == 1
    assert max(map(float, samples["values"].split())) == pytest.approx(s["latency_ms"]["max"], rel=1e-4)


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_requests_still_unanswered_when_the_generator_stops_waiting_are_counted(mode, short_timeouts, monkeypatch):
    """Work still stuck when join() gave up was never merged or counted (nor were a stuck worker's earlier
    successes); the open loop joined each worker with its own timeout, which added up."""
    release = threading.Event()
    answered = [0]

    def post(self, body: bytes) -> str | None:  # every third request hangs past any timeout, the others succeed
        answered[0] += 1
        self.answered = True
        if answered[0] % 3 == 0:
            release.wait(30)
        return None

    monkeypatch.setattr(loadgen.Client, "post", post)
    endpoint = Endpoint("http://127.0.0.1:9/unused")
    t0 = time.perf_counter()
    if mode == "closed":
        result = closed_loop(endpoint, [b"x"], concurrency=2, seconds=0.3, warmup_s=0.0)
    else:
        result = open_loop(endpoint, [b"x"], rate=20.0, seconds=0.5, warmup_s=0.0)
    took = time.perf_counter() - t0
    s = result.summary()
    stuck = s["errors"].get("no answer", 0)
    assert stuck >= 1 and set(s["errors"]) == {"no answer"}, s["errors"]
    assert s["ok"] >= 1 and s["requests"] == s["ok"] + stuck
    assert took < 0.5 + 0.6 + 0.3 + 1.0, took  # one shared deadline, not one per worker
    release.set()  # the stuck requests now finish: too late, nothing changes
    time.sleep(0.2)
    assert result.summary()["errors"] == s["errors"] and result.summary()["ok"] == s["ok"]


def test_a_dead_server_is_retried_with_back_off_not_in_a_busy_loop():
    """Against a closed port the closed loop made about 15,000 failed connects a second on the cores it shares
    with the server; every attempt is still counted."""
    with socket.socket() as taken:  # bound, never listening: connections are refused, and the port stays ours
        taken.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{taken.getsockname()[1]}/classify"
        result = closed_loop(Endpoint(url), [b"x"], concurrency=2, seconds=0.6, warmup_s=0.0)
    s = result.summary()
    assert set(s["errors"]) == {"ConnectionRefusedError"} and s["ok"] == 0
    assert s["requests"] == result.sent and 2 <= result.sent <= 30, result.sent
    assert s["problem"].startswith("no request succeeded: ")


def test_the_problem_line_names_what_happened():
    r = loadgen.LoadResult("closed", 1, None, 1.0)
    assert r.problem() == "no request was sent"
    r.sent = 3
    assert r.problem() == "no request was answered"
    r.warmup_errors = {"HTTP 503": 3}
    assert r.problem() == "no request succeeded: 3 x HTTP 503 (all during the warm-up)"
    r.errors = {"HTTP 500": 2, "HTTP 429": 5}
    assert r.problem() == "no request succeeded: 5 x HTTP 429, 2 x HTTP 500"
    r.latencies_s = [0.01]
    assert r.problem() is None
