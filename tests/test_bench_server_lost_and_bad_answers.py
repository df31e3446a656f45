"""The load test and the end-to-end mode against a server that dies mid-run or answers 200 with something that is not a
classification: the levels measured before the server went away are saved, the level it went away in is marked, the
rest are listed as not run, and the run exits 1 with one line (not exit 2 "no server ... pass --start"); a 200 whose
body is not vitc's answer counts as an error ("bad answer: ...") in both tools. Stand-in servers on loopback ports
20130-20139; each test takes a second or two."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
from stand_in_http import StandInHandler, stand_in_server

from benchmarks import e2e, load
from benchmarks.latency import main as latency_main
from benchmarks.loadgen import Client, Endpoint

INFO = {"name": "m", "variant": "vit_c_micro", "runtime": "onnxruntime", "precision": "fp32", "device": "cpu",
        "max_batch": 8, "source": {"sha256": "0" * 64}}
ENV = {"host": "vm", "cpu": {"model": "test CPU", "usable_cpus": 2, "flags": []}, "load_average": [1.0, 1.0, 1.0],
       "versions": {"python": "3.11"}, "git": {}}
ANSWER = {"model": "m", "predictions": [{"label": "cat", "index": 3, "score": 0.9}]}  # vitc's /v1 classify answer
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DYING_PORT, STARTED_PORT, ANSWER_PORT = 20130, 20131, 20132

# A vitc stand-in in its own process that dies (os._exit, as a kill -9 or a crash) at the first POST after its
# `n`-th GET /metrics: the load test reads /metrics once before its first level and once after each level, so with
# n = 2 the first level completes and the server goes away at the first request of the second.
DYING = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port, n = int(sys.argv[1]), int(sys.argv[2])
info = json.loads(sys.argv[3])
answer = json.dumps(json.loads(sys.argv[4])).encode()
reads = [0]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send(self, body):
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/metrics":
            reads[0] += 1
            return self.send(b"")
        self.send(json.dumps({"models": [info]} if self.path == "/v1/models" else info).encode())
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if reads[0] >= n:
            os._exit(1)
        self.send(answer)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    """No dataset decoding and no machine survey (seconds each): two tiny bodies and a fixed environment."""
    monkeypatch.setattr(e2e, "request_bodies", lambda n, **_kw: [b"a", b"b"])
    monkeypatch.setattr(load, "request_bodies", lambda n, **_kw: [b"a", b"b"])
    monkeypatch.setattr("benchmarks.machine.environment", lambda _gpus: json.loads(json.dumps(ENV)))


@contextmanager
def dying_server(port: int, reads: int = 2) -> Iterator[str]:
    """The stand-in above on `port`; its URL once it listens. Killed at the end if it is still alive."""
    proc = subprocess.Popen([sys.executable, "-c", DYING, str(port), str(reads), json.dumps(INFO), json.dumps(ANSWER)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the stand-in server did not listen on port {port}")
                time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


@contextmanager
def answering(port: int, body: bytes) -> Iterator[str]:
    """A vitc stand-in in this process whose every POST answers HTTP 200 with `body`."""

    class Handler(StandInHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_body(b"" if self.path == "/metrics" else
                           json.dumps({"models": [INFO]} if self.path == "/v1/models" else INFO).encode())

        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            self.send_body(body)

    with stand_in_server(Handler, port=port) as url:
        yield url


def _load(url: str, out, *more: str) -> int:  # noqa: ANN001
    return load.main(["--url", url, "--concurrency", "1", "2", "4", "--duration", "0.3", "--warmup", "0",
                      "--images", "2", "--out", str(out), *more])


LOST = ("m c=2: the server went away during this level (GET /metrics after it: Connection refused); "
        "not run after it: m c=4")


# --- 1. a server that goes away mid-run ------------------------------------------------------------------------------

def test_a_server_that_dies_mid_run_keeps_the_levels_before_it_and_exits_1(tmp_path, capsys):
    """The /metrics read after the level raised URLError: exit 2 "no server ... pass --start", nothing written."""
    out = tmp_path / "l.json"
    with dying_server(DYING_PORT) as url:
        assert _load(url, out) == 1
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())  # saved
    (model,) = doc["models"]
    first, lost = model["levels"]
    assert first["concurrency"] == 1 and first["ok"] > 0 and first["problem"] is None  # kept, as measured
    assert lost["concurrency"] == 2 and lost["problem"].startswith("the server went away during this level")
    assert model["not_run"] == [4] and doc["server_lost"] == "m c=2"
    assert (tmp_path / "l.png").read_bytes()[:8] == PNG_MAGIC
    assert "Not run, the server having gone away during m c=2: m c=4" in captured.out  # the Markdown says so too
    err = captured.err.strip().splitlines()
    assert err[-1] == f"python -m benchmarks.load: error: 2 of 3 load levels failed: {LOST}"
    assert "--start" not in captured.err and "no server at" not in captured.err


def test_a_started_server_that_dies_mid_run_is_saved_and_exits_1_without_the_start_hint(tmp_path, monkeypatch,
                                                                                        capsys):
    """With --start the same crash said "pass --start" (given) and exited 2; the finished level was lost."""
    out = tmp_path / "s.json"
    with dying_server(STARTED_PORT) as url:
        stopped = []
        server = SimpleNamespace(url=url, stop=lambda: stopped.append(1) or -9)  # as serve.launch's, killed -9
        monkeypatch.setattr("serve.launch.start", lambda *_a, **_k: server)
        monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the kept (empty) log directory lands here
        monkeypatch.setattr(load, "_checked", lambda args: (url, ["b"]))
        monkeypatch.setattr(load, "served_names", lambda specs: {})
        assert load.main(["--start", "--concurrency", "1", "2", "4", "--duration", "0.3", "--warmup", "0",
                          "--images", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    doc = json.loads(out.read_text())
    assert stopped and doc["server"]["exit_code"] == -9 and doc["models"][0]["levels"][0]["ok"] > 0
    assert err.strip().splitlines()[-1] == f"python -m benchmarks.load: error: 2 of 3 load levels failed: {LOST}"
    assert "pass --start" not in err


def test_a_started_server_that_cannot_be_reached_is_not_told_to_pass_start():
    exc = urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))
    url = "http://127.0.0.1:20133"
    assert load.server_problem(url, exc, started=True) == f"the server started at {url} stopped answering: " \
                                                          "Connection refused"
    assert load.server_problem(url, exc).endswith("(start one with `python -m serve`, or pass --start)")


# --- 6. a 200 that is not a classification is an error, in both tools ------------------------------------------------

@pytest.mark.parametrize("body, problem", [
    (b"not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", 'a JSON array, not an object with "predictions"'),
    (b'{"foo": 1}', 'no "predictions" list'),
    (b'{"predictions": {"label": "cat"}}', 'no "predictions" list'),
    (b'{"predictions": []}', '"predictions" is empty'),
    (b'{"predictions": [{"label": "cat"}]}', 'a prediction without a "label" and a "score"'),
    (b'{"predictions": [{"label": 3, "score": 0.5}]}', 'a prediction without a "label" and a "score"'),
    (b'{"predictions": [{"label": "cat", "score": "0.5"}]}', 'a prediction without a "label" and a "score"'),
    (json.dumps(ANSWER).encode(), None),
    (b'{"model": "m", "predictions": [{"label": "cat", "index": 0, "score": 1}]}', None),
])
def test_the_answer_check_names_what_is_wrong(body, problem):
    assert e2e.classify_answer_problem(body) == problem


def test_the_load_test_counts_a_200_that_is_not_a_classification_as_an_error(tmp_path, capsys):
    out = tmp_path / "bad.json"
    with answering(ANSWER_PORT, b"not json") as url:
        assert load.main(["--url", url, "--concurrency", "1", "--duration", "0.3", "--warmup", "0", "--images", "2",
                          "--out", str(out)]) == 1
    (level,) = json.loads(out.read_text())["models"][0]["levels"]
    assert level["ok"] == 0 and level["other_errors"]["bad answer: not JSON"] > 0
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "python -m benchmarks.load: error: 1 of 1 load levels failed: m c=1: no request succeeded: ")
    with answering(ANSWER_PORT, json.dumps(ANSWER).encode()) as url:  # vitc's answer: a success
        assert load.main(["--url", url, "--concurrency", "1", "--duration", "0.3", "--warmup", "0", "--images", "2",
                          "--out", str(out)]) == 0


def test_the_end_to_end_mode_counts_a_wrong_shape_as_an_error(tmp_path, capsys):
    with answering(ANSWER_PORT, b'{"foo": 1}') as url:
        assert latency_main(["--http", url, "--quick", "--concurrency", "1", "--duration", "0.2", "--no-plots",
                             "--out", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert 'errors at closed c=1: bad answer: no "predictions" list ×' in captured.out
    doc = json.loads(next(tmp_path.glob("*-http.json")).read_text())
    assert doc["closed"][0]["ok"] == 0 and doc["closed"][0]["errors"]['bad answer: no "predictions" list'] > 0
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("python benchmarks/latency.py: error: 2 of 2 load levels failed: c=1: no request"), last


def test_an_endpoint_without_a_check_still_takes_any_200():
    """The check is the classify endpoint's: other endpoints (the overhead's hand-written server) are unchanged."""
    with answering(ANSWER_PORT, b"whatever") as url:
        plain, checked = Client(Endpoint(f"{url}/x")), Client(e2e.classify_endpoint(url, "m", "image/png", None))
        try:
            assert plain.post(b"a") is None and checked.post(b"a") == "bad answer: not JSON"
        finally:
            plain.close()
            checked.close()
