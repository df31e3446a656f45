"""The load tools against faulty servers (hDN -> fDO): an overloaded open loop reports the answers that came and the
requests it could not send, in bounded memory; a non-finite Server-Timing duration is skipped, never the run; a server
that trickles its answer ends by a whole-request deadline; the end-to-end results record the command used; SIGHUP
stops `benchmarks.load --start` like SIGTERM. Stand-in servers on free loopback ports (in this process, or in a child
for the signal); each test takes a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from stand_in_http import StandInHandler, stand_in_server

from benchmarks import e2e, load, loadgen
from benchmarks.latency import main as latency_main
from benchmarks.loadgen import Client, Endpoint, open_loop, parse_server_timing

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
INFO = {"name": "m", "variant": "vit_c_micro", "runtime": "onnxruntime", "precision": "fp32", "device": "cpu",
        "max_batch": 8, "source": {"sha256": "0" * 64}}
ANSWER = b'{"model": "m", "predictions": [{"label": "cat", "index": 0, "score": 0.9}]}'  # vitc's classify answer
ENV = {"host": "vm", "cpu": {"model": "test CPU", "usable_cpus": 2, "flags": []}, "load_average": [1.0, 1.0, 1.0],
       "versions": {"python": "3.11"}, "git": {}}
HANG_S = 30  # a run that has not ended by then hangs (a generous bound: each run here takes a few seconds)


@contextmanager
def fault_server(mode: str = "ok", service_s: float = 0.0, parallel: int = 64) -> Iterator[tuple[str, list[int]]]:
    """A vitc stand-in (after hDN's fake.py): /v1/models, /v1/models/m, /metrics and classify; its URL and the count
    of classify answers it sent. Modes: "ok"; "stnan" / "stinf" (Server-Timing durations nan / 1e999); "hang" (no
    answer until the test ends); "trickle" (GET /v1/models), "trickle_post" (classify) and "trickle_metrics" (every
    /metrics after the first): a 100000-byte answer one byte every 0.2 s. `parallel` classify requests at a time,
    `service_s` each."""
    answered, lock, done = [0], threading.Lock(), threading.Event()
    working = threading.Semaphore(parallel)
    metrics_reads = [0]

    class Handler(StandInHandler):
        def trickle(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            while not done.wait(0.2):
                self.wfile.write(b" ")
                self.wfile.flush()
            self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == "/metrics":
                metrics_reads[0] += 1
                if mode == "trickle_metrics" and metrics_reads[0] > 1:
                    return self.trickle()
                return self.send_body(b"# TYPE vitc_batch_size histogram\n")
            if self.path == "/v1/models" and mode == "trickle":
                return self.trickle()
            doc = {"/v1/models": {"models": [INFO]}, "/v1/models/m": INFO}.get(self.path)
            self.send_body(json.dumps(doc).encode()) if doc else self.send_body(b"{}", 404)

        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            if mode == "trickle_post":
                return self.trickle()
            if mode == "hang":
                done.wait(HANG_S)
                return
            with working:
                time.sleep(service_s)
            timing = {"stnan": "compute;dur=nan, decode;dur=1", "stinf": "compute;dur=1e999, decode;dur=1"}
            self.send_body(ANSWER, headers={"Server-Timing": timing.get(mode, "compute;dur=1.0")})
            with lock:
                answered[0] += 1

    with stand_in_server(Handler) as url:
        try:
            yield url, answered
        finally:
            done.set()  # the handlers still waiting or trickling end before the server shuts down


@pytest.fixture
def no_survey(monkeypatch):
    """No machine survey (3 s a run, and not what these tests are about): a fixed environment."""
    monkeypatch.setattr("benchmarks.machine.environment", lambda _gpus: json.loads(json.dumps(ENV)))


def _ends(call: Callable[[], object], within: float = HANG_S) -> object:
    """`call()` run in a thread: its result, or a failure when it has not ended `within` seconds (it hangs)."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)
    thread.start()
    thread.join(within)
    assert not thread.is_alive(), f"still running after {within} s: it hangs"
    assert out, "it raised (see the thread's traceback above)"
    return out[0]


# --- 2. the open loop under overload --------------------------------------------------------------------------------

@pytest.fixture
def small_client(monkeypatch):
    """An open loop of 8 connections and 8 arrivals waiting at most (the shipped 256 behave alike, in more threads)."""
    monkeypatch.setattr(loadgen, "MAX_CONCURRENCY", 8)
    monkeypatch.setattr(loadgen, "BACKLOG", 8, raising=False)
    monkeypatch.setattr(loadgen, "TIMEOUT_S", 2.0)
    monkeypatch.setattr(loadgen, "JOIN_GRACE_S", 0.5)


def test_an_overloaded_open_loop_counts_the_answers_that_came_and_the_requests_it_could_not_send(small_client):
    """--rate 100000 reported 0 successes and "no answer" for all 1,666,933 requests (more than the 1,500,191
    scheduled) while the server answered 33,700: the window's arrivals waited behind the whole warm-up backlog."""
    with fault_server(service_s=0.01, parallel=2) as (url, answered):  # about 200 answers a second
        s = open_loop(Endpoint(url), [b"x"], rate=4000.0, seconds=1.0, warmup_s=0.3).summary()
        served = answered[0]
    assert s["ok"] > 0 and s["problem"] is None, s
    assert s["ok"] <= served
    failed = sum(s["errors"].values())
    # Every arrival scheduled in the window is counted once: answered, failed or never sent; the warm-up's in none.
    assert s["requests"] == s["ok"] + failed and s["requests"] + s["dropped"] == s["scheduled"], s
    assert s["dropped"] > 0 and s["client_saturated"] is True
    assert "no answer" not in s["errors"]
    line = " ".join(e2e.open_loop_lines({"open": s}))
    # The server (about 200 a second) was slower than the rate: it fell behind, and that is why arrivals were not sent.
    assert "the server fell behind" in line and f"{s['dropped']} of the {s['scheduled']} requests" in line, line
    assert "the client, not the server, was the limit" not in line


def test_the_open_loop_memory_does_not_grow_with_rate_times_duration(small_client, monkeypatch):
    """Every arrival was drawn up front and queued without bound: 1.05 GB of client memory at --duration 15."""
    monkeypatch.setattr(loadgen, "TIMEOUT_S", 1.0)
    with fault_server("hang") as (url, _):
        tracemalloc.start()
        try:
            s = open_loop(Endpoint(url), [b"x"], rate=20000.0, seconds=1.0, warmup_s=0.2).summary()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert s["scheduled"] > 10000 and s["dropped"] > 0.9 * s["scheduled"], s
    assert s["requests"] + s["dropped"] == s["scheduled"]
    assert peak < 2_000_000, peak  # the old queue held every one of the ~24000 arrivals: several MB


def test_a_level_where_nothing_could_be_sent_says_why():
    r = loadgen.LoadResult("open", None, 100.0, 1.0, scheduled=100, dropped=100)
    assert r.problem() == "no request succeeded: 100 x not sent: client saturated"
    r.warmup_errors = {"no answer": 8}
    assert r.problem() == "no request succeeded: 8 x no answer (all during the warm-up); 100 x not sent: " \
                          "client saturated"


# --- 3. a non-finite Server-Timing duration -------------------------------------------------------------------------

def test_non_finite_server_timing_durations_are_skipped():
    assert parse_server_timing("compute;dur=nan, decode;dur=1.5") == {"decode": 1.5}
    assert parse_server_timing("a;dur=inf, b;dur=-inf, c;dur=1e999, d;dur=NaN, e;dur=2") == {"e": 2.0}


@pytest.mark.parametrize("mode", ["stnan", "stinf"])
def test_the_load_test_keeps_a_run_whose_server_timing_is_not_finite(mode, tmp_path, no_survey, capsys):
    """"error: http://...: samples must be finite", exit 2 and nothing written, for every level measured."""
    out = tmp_path / "l.json"
    with fault_server(mode) as (url, _):
        code = load.main(["--url", url, "--concurrency", "1", "2", "--duration", "0.3", "--warmup", "0",
                          "--images", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    levels = json.loads(out.read_text())["models"][0]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2] and all(lv["ok"] > 0 for lv in levels)


def test_the_end_to_end_mode_keeps_a_run_whose_server_timing_is_not_finite(tmp_path, no_survey, capsys):
    with fault_server("stnan") as (url, _):
        code = latency_main(["--http", url, "--quick", "--concurrency", "1", "--duration", "0.3", "--rate", "5",
                             "--no-plots", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(next(tmp_path.glob("*-http.json")).read_text())
    for level in [*doc["closed"], doc["open"]]:
        assert level["ok"] > 0 and set(level["server_timing_ms"]) == {"decode"}, level["server_timing_ms"]


def test_the_concurrency_1_comparison_skips_a_non_finite_compute_stage():
    """single_stream summarised every stage: a nan compute stage raised "samples must be finite"."""
    with fault_server("stinf") as (url, _):
        endpoint = e2e.classify_endpoint(url, "m", "image/png", None)
        single = e2e.single_stream(endpoint, [b"a"], None, [], rounds=2, slice_s=0.1)
    assert single["server_ok"] > 0 and set(single["server_timing_ms"]) == {"decode"}
    assert single["round_overhead_ms"] == []  # no compute stage to pair with: "not measurable", not a crash


# --- 6. a server that trickles its answer ---------------------------------------------------------------------------

@pytest.fixture
def short_deadlines(monkeypatch):
    monkeypatch.setattr(loadgen, "GET_TIMEOUT_S", 1.0, raising=False)
    monkeypatch.setattr(loadgen, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(loadgen, "JOIN_GRACE_S", 0.5)


def test_the_load_test_gives_up_on_a_server_that_trickles_its_model_list(short_deadlines, tmp_path, no_survey,
                                                                          capsys):
    """GET /v1/models at one byte every 2 s: `benchmarks.load` was still waiting after 60 s (a per-read timeout)."""
    with fault_server("trickle") as (url, _):
        code = _ends(lambda: load.main(["--url", url, "--concurrency", "1", "--duration", "0.3", "--images", "2",
                                        "--out", str(tmp_path / "t.json")]))
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(f"{url}: the answer did not complete within 1 s")


def test_the_load_test_marks_a_level_after_which_metrics_trickle(short_deadlines, tmp_path, no_survey, capsys):
    out = tmp_path / "t.json"
    with fault_server("trickle_metrics") as (url, _):
        code = _ends(lambda: load.main(["--url", url, "--concurrency", "1", "2", "--duration", "0.3", "--warmup", "0",
                                        "--images", "2", "--out", str(out)]))
    assert code == 1
    (model,) = json.loads(out.read_text())["models"]
    (level,) = model["levels"]
    assert level["ok"] > 0 and model["not_run"] == [2]
    assert level["problem"].endswith("(GET /metrics after it: the answer did not complete within 1 s)")


def test_the_end_to_end_mode_gives_up_on_a_server_that_trickles_its_model_list(short_deadlines, tmp_path, no_survey,
                                                                                capsys):
    with fault_server("trickle") as (url, _):
        code = _ends(lambda: latency_main(["--http", url, "--quick", "--concurrency", "1", "--duration", "0.3",
                                           "--no-plots", "--out", str(tmp_path)]))
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(f"GET {url}/v1/models: the answer did not complete within 1 s")


def _post_once(url: str) -> str | None:
    """One classify request's outcome (the client closed in the same thread: closing it from another while it
    reads would wait for the reader)."""
    client = Client(Endpoint(url + "/v1/models/m/classify"))
    try:
        return client.post(b"x")
    finally:
        client.close()


def test_a_classify_answer_that_trickles_ends_by_the_request_deadline(short_deadlines):
    with fault_server("trickle_post") as (url, _):
        assert _ends(lambda: _post_once(url)) == "TimeoutError"


def test_the_concurrency_1_comparison_ends_on_a_server_that_trickles(short_deadlines):
    """single_stream's requests had no deadline at all: it waited as long as the server kept sending."""
    with fault_server("trickle_post") as (url, _):
        endpoint = e2e.classify_endpoint(url, "m", "image/png", None)
        single = _ends(lambda: e2e.single_stream(endpoint, [b"a"], None, [], rounds=1, slice_s=0.05))
    assert single["server_ok"] == 0 and set(single["errors"]) == {"TimeoutError"}


# --- 7. the command recorded ----------------------------------------------------------------------------------------

def test_the_end_to_end_results_record_the_command_actually_used(tmp_path):
    """`python -m benchmarks.latency --http ...` was recorded as `python benchmarks/latency.py --http ...`."""
    with fault_server() as (url, _):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--http", url, "--quick", "--concurrency",
                               "1", "--duration", "0.3", "--rate", "50", "--no-plots", "--out", str(tmp_path)],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(next(tmp_path.glob("*-http.json")).read_text())
    assert doc["argv"][:4] == ["python", "-m", "benchmarks.latency", "--http"]
    md = next(tmp_path.glob("*-http.md")).read_text()
    assert f"Command: `python -m benchmarks.latency --http {url} --quick" in md


# --- 5. SIGHUP stops `benchmarks.load --start` like SIGTERM ----------------------------------------------------------

# `python -m benchmarks.load --start` run as the program, its server a stand-in in the same process (no bundle to
# export): the stand-in's "start" and "stop" are written to argv[1]; "measuring" is printed at the first request.
STARTED = """
import json, sys, threading
sys.path.insert(0, sys.argv[2])
from stand_in_http import StandInHandler, stand_in_server
import serve.launch
from benchmarks import load
from models import cli
INFO = json.loads(sys.argv[3])
ANSWER = sys.argv[4].encode()
marks = open(sys.argv[1], "a")
first = threading.Event()
class Handler(StandInHandler):
    def do_GET(self):
        self.send_body(b"" if self.path == "/metrics" else json.dumps({"models": [INFO]}).encode())
    def do_POST(self):
        self.read_body()
        if not first.is_set():
            first.set()
            print("measuring", flush=True)
        self.send_body(ANSWER)
class Server:
    def __init__(self, url):
        self.url = url
    def stop(self):
        marks.write("stop\\n"); marks.flush()
        return 0
with stand_in_server(Handler) as url:
    def start(args, log_path, env=None):
        marks.write("start\\n"); marks.flush()
        return Server(url)
    serve.launch.start = start
    load.request_bodies = lambda n, **kw: [b"a"]
    load._checked = lambda args: (url, ["b"])
    load.served_names = lambda specs: {}
    cli.run(lambda: load.main(["--start", "--concurrency", "1", "--duration", "30", "--warmup", "0", "--images", "1",
                               "--out", sys.argv[5]]), load.PROG)
"""


def test_sighup_stops_a_started_load_test_like_sigterm(tmp_path):
    """A closed terminal (SIGHUP) killed it silently (exit 129) and left its temporary log directory behind."""
    marks, temp = tmp_path / "marks", tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", STARTED, str(marks), str(TESTS), json.dumps(INFO), ANSWER.decode(),
                             str(tmp_path / "l.json")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(temp)},
                            # A terminal's run: SIGHUP as by default, even when the tests run under nohup (whose
                            # ignored SIGHUP the run inherits, and then rightly runs on).
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "measuring"
        assert [p.name for p in temp.iterdir()][0].startswith("vitc-load-")  # its log directory, while it runs
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "python -m benchmarks.load: terminated"
    assert marks.read_text().split() == ["start", "stop"]  # the server was stopped
    assert list(temp.iterdir()) == []  # and its log directory removed
    assert not (tmp_path / "l.json").exists()  # nothing half-measured is written


@pytest.mark.parametrize("loop", ["closed", "open"])
def test_an_interrupted_load_loop_stops_its_workers_at_once(loop):
    """Ctrl-C / SIGTERM / SIGHUP raised in the main thread: the workers went on loading the server until the window's
    end (30 s here) while the command was stopping."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    with fault_server(service_s=0.01) as (url, answered):
        run = (lambda: loadgen.closed_loop(Endpoint(url), [b"x"], 2, 30.0, warmup_s=0)) if loop == "closed" else \
            (lambda: open_loop(Endpoint(url), [b"x"], 50.0, 30.0, warmup_s=0))
        t0 = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        try:
            with pytest.raises(KeyboardInterrupt):
                run()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        stopped_at = answered[0]
        time.sleep(1.0)  # a worker still running would answer on
        assert answered[0] - stopped_at <= 2, (stopped_at, answered[0])
    assert time.monotonic() - t0 < HANG_S
