"""The end-to-end mode and the load test against servers that fail or are not vitc: every level that failed is saved,
named and shown by kind, the plots survive a run without a success, a foreign model list is one line (exit 2), results
are never written over, and the concurrency-1 overhead is paired per round with an interval (or "not measurable").
Stand-in servers in this process on free loopback ports; each test takes a second or two."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from stand_in_http import StandInHandler, stand_in_server

from benchmarks import e2e, load, overhead
from benchmarks.latency import main as latency_main
from benchmarks.loadgen import Endpoint

INFO = {"name": "m", "variant": "vit_c_micro", "runtime": "onnxruntime", "precision": "fp32", "device": "cpu",
        "max_batch": 8, "source": {"sha256": "0" * 64}}
ENV = {"host": "vm", "cpu": {"model": "test CPU", "usable_cpus": 2, "flags": []}, "load_average": [1.0, 1.0, 1.0],
       "versions": {"python": "3.11", "numpy": "2.0"}, "git": {"commit": "abcdef012345" + "0" * 28, "dirty": True}}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# vitc's /v1 classify answer: the tools count a 200 without this shape as an error
ANSWER = b'{"model": "m", "predictions": [{"label": "cat", "index": 0, "score": 1.0}]}'


@contextmanager
def stub(status=lambda n: 200, models: object = None, info: dict | None = None,  # noqa: ANN001
         timing: str | None = None) -> Iterator[str]:
    """A stand-in server: GET /v1/models answers `models` (default: vitc's shape), /v1/models/m `info`, /metrics
    nothing; POST answers `status(n)` for its n-th request, with a Server-Timing header `timing` if given."""
    count, lock = [0], threading.Lock()
    info = info or INFO

    class Handler(StandInHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            doc = {"/v1/models": {"models": [info]} if models is None else models, "/v1/models/m": info}
            if self.path == "/metrics":
                return self.send_body(b"")
            self.send_body(json.dumps(doc[self.path]).encode()) if self.path in doc else self.send_body(b"{}", 404)

        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            with lock:
                count[0] += 1
                code = status(count[0])
            self.send_body(ANSWER, code, {"Server-Timing": timing} if timing and code == 200 else None)

    with stand_in_server(Handler) as url:
        yield url


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    """No dataset decoding and no machine survey (seconds each): two tiny bodies and a fixed environment."""
    monkeypatch.setattr(e2e, "request_bodies", lambda n, **_kw: [b"a", b"b"])
    monkeypatch.setattr(load, "request_bodies", lambda n, **_kw: [b"a", b"b"])
    monkeypatch.setattr("benchmarks.machine.environment", lambda _gpus: json.loads(json.dumps(ENV)))


def _load(url: str, out: Path, *more: str) -> int:
    return load.main(["--url", url, "--concurrency", "1", "--duration", "0.3", "--warmup", "0", "--images", "2",
                      "--out", str(out), *more])


# --- 1. the load test: a level without a success is saved, named, and exits 1 ---------------------------------------

def test_a_load_level_where_every_request_failed_is_saved_and_named(tmp_path, capsys):
    """A level with no success crashed markdown() (None p50) before the save, and the progress showed only 503s."""
    out = tmp_path / "l500.json"
    with stub(status=lambda n: 500) as url:
        assert _load(url, out) == 1
    captured = capsys.readouterr()
    doc = json.loads(out.read_text())  # saved
    (level,) = doc["models"][0]["levels"]
    assert level["p50_ms"] is None and level["other_errors"]["HTTP 500"] > 0
    assert level["problem"].startswith("no request succeeded:") and "HTTP 500" in level["problem"]
    assert (tmp_path / "l500.png").read_bytes()[:8] == PNG_MAGIC
    row = r"\| m \| onnxruntime fp32 \| 1 \| - \| - \| - \| 0 \| 0 \| \d+ \(HTTP 500 ×\d+\) \| - \|"
    assert re.search(row, captured.out)
    assert re.search(r"c=1 .* errors \d+ \(HTTP 500 ×\d+\)", captured.err)  # the progress line
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("python -m benchmarks.load: error: 1 of 1 load levels failed: m c=1: no request succeeded")


def test_the_load_report_shows_every_kind_of_error():
    level = {"concurrency": 4, "p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 30.0, "throughput_rps": 50.0, "ok": 95,
             "http_503": 1, "other_errors": {"HTTP 429": 3, "ConnectionResetError": 1}, "mean_batch_size": 2.0}
    doc = {"models": [{"name": "m", "runtime": "onnxruntime", "precision": "fp32", "levels": [level]}]}
    kinds = "5 (HTTP 429 ×3, HTTP 503 ×1, ConnectionResetError ×1)"
    assert f"| 95 | {kinds} | 2.0 |" in load.markdown(doc)
    assert f"errors {kinds}" in load.format_level(level)
    assert load.failed_levels(doc) is None


# --- 3. a server that is not vitc: one line, exit 2, in both tools ---------------------------------------------------

NOT_VITC = [
    ({"models": ["m"]}, 'a model entry without a "name": "m"'),  # KServe v1
    ({"models": [{"id": "m"}]}, 'a model entry without a "name": {"id": "m"}'),
    ([], "a JSON array"),
    ({"models": "m"}, '"models" as a JSON string'),
    ({"data": []}, 'an object without a "models" list'),
]


@pytest.mark.parametrize("models, says", NOT_VITC)
def test_a_server_that_is_not_vitc_is_one_line_and_exit_2(models, says, tmp_path, capsys):
    with stub(models=models) as url:
        assert _load(url, tmp_path / "l.json") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"python -m benchmarks.load: error: the server at {url} does not answer like a vitc server: "
                       f'GET /v1/models gave {says}, expected {{"models": [{{"name": ...}}, ...]}}']
        assert latency_main(["--http", url, "--quick", "--no-plots", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "does not answer like a vitc server" in err[0] and says in err[0]
    assert not list(tmp_path.iterdir())


def test_a_model_description_that_is_not_vitc_is_refused():
    with stub(info=["m"], models={"models": [{"name": "m"}]}) as url, pytest.raises(e2e.NotVitcServer):
        e2e.model_info(e2e.E2EConfig(url=url))


# --- 5. the load test never writes over a file ------------------------------------------------------------------------

def _fake_doc(*_args: object, **_kwargs: object) -> dict:
    return {"models": [{"name": "m", "runtime": "onnxruntime", "precision": "fp32", "levels": [
        {"concurrency": 1, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "throughput_rps": 9.0, "ok": 9,
         "http_503": 0, "other_errors": {}, "mean_batch_size": 1.0}]}], "machine": {"cpus": 2}}


def test_load_out_must_be_a_json_path(tmp_path, monkeypatch, capsys):
    """`--out X.png` wrote the JSON to X.png and then replaced it with the plot."""
    monkeypatch.setattr(load, "_measure", lambda *_: pytest.fail("measured"))
    assert load.main(["--url", "http://127.0.0.1:9", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m benchmarks.load: error: --out {tmp_path / 'x.png'} must end in .json (the plot is written beside "
        "it as .png)"]


def test_load_results_never_replace_a_file(tmp_path, monkeypatch, capsys):
    """`--out X.json` replaced the user's X.png, and the default results file was replaced by every run."""
    monkeypatch.setattr(load, "_measure", _fake_doc)
    (tmp_path / "notes.png").write_bytes(b"precious")
    assert load.main(["--url", "http://127.0.0.1:9", "--out", str(tmp_path / "notes.json")]) == 0
    assert (tmp_path / "notes.png").read_bytes() == b"precious" and not (tmp_path / "notes.json").exists()
    assert json.loads((tmp_path / "notes-2.json").read_text())["models"][0]["name"] == "m"
    assert (tmp_path / "notes-2.png").read_bytes()[:8] == PNG_MAGIC
    assert "never overwritten" in capsys.readouterr().err
    monkeypatch.setattr(load, "RESULTS", tmp_path / "results")
    for _ in range(2):
        assert load.main(["--url", "http://127.0.0.1:9"]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "load-onnxruntime-2.json", "load-onnxruntime-2.png", "load-onnxruntime.json", "load-onnxruntime.png"]


# --- 11. ports of the servers the tools start ------------------------------------------------------------------------

def test_load_port_reaches_the_started_server_and_needs_start(tmp_path, monkeypatch, capsys):
    seen = []

    def start(args, *_a, **_k):
        seen.append(args)
        raise RuntimeError("stopped here")

    assert load.main(["--url", "http://127.0.0.1:9", "--port", "20057"]) == 2
    assert "--port applies to --start only" in capsys.readouterr().err
    monkeypatch.setattr("serve.launch.start", start)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the kept (empty) log directory lands here
    monkeypatch.setattr(load, "_checked", lambda args: ("http://127.0.0.1:9", ["b"]))
    assert load.main(["--start", "--port", "20057", "--server-arg=--port=1", "--out", str(tmp_path / "x.json")]) == 2
    assert seen[0][-2:] == ["--port", "20057"]  # after --server-arg: the last one wins in the server's parser


def test_overhead_port_gives_each_server_its_own_port(monkeypatch):
    ports = []

    class Stop(Exception):
        pass

    class FakeServer:
        def __init__(self, kind, bundle, backend="onnxruntime", log_dir=None, port=None):  # noqa: ANN001
            ports.append((kind, backend, port))
            self.cold_start_s = 0.1

        def startup(self) -> dict:
            return {}

        def stop(self, keep_log: bool = False) -> None:
            pass

    monkeypatch.setattr(overhead, "Server", FakeServer)
    monkeypatch.setattr(overhead, "request_image", lambda: b"png")
    monkeypatch.setattr("models.bundle.read_manifest", lambda _p: SimpleNamespace(model="vit_c_micro"))
    monkeypatch.setattr(overhead, "bare_backend", lambda *_a, **_k: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        overhead.run(Path("b"), 1, 0.1, 0.1, 1, 1, ["onnxruntime", "openvino"], log=lambda _m: None, port=20050)
    assert ports == [("vitc", "onnxruntime", 20050), ("vitc", "openvino", 20050), ("naive", "onnxruntime", 20050),
                     ("vitc", "onnxruntime", 20051), ("vitc", "openvino", 20052)]


def test_overhead_refuses_a_port_in_use_before_starting_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(overhead, "check_bundle", lambda _b: None)
    monkeypatch.setattr(overhead, "run", lambda *_a, **_k: pytest.fail("started"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        code = overhead.main(["--bundle", str(tmp_path), "--out", str(tmp_path / "r"), "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]


# --- 2 and 4b. the end-to-end mode: a run without a success writes its report; errors are named -----------------------

def test_e2e_where_every_request_failed_writes_markdown_and_plot(tmp_path):
    """The plot's log scale of nothing raised, so the Markdown was never written."""
    with stub(status=lambda n: 500) as url:
        doc = e2e.run_e2e(e2e.E2EConfig(url=url, concurrency=(1,), duration=0.3, warmup=0.05), log=lambda _m: None)
    json_path, md_path, png_path = e2e.write_e2e_reports(doc, tmp_path)
    assert png_path.read_bytes()[:8] == PNG_MAGIC and json.loads(json_path.read_text())["closed"][0]["ok"] == 0
    md = md_path.read_text()
    assert re.search(r"- errors at closed c=1: HTTP 500 ×\d+", md) and f"![{png_path.name}]" in md
    # The provenance the latency report gives: library versions and the commit.
    assert "- Versions: python 3.11, numpy 2.0; git abcdef012345 (dirty)" in md


def test_e2e_errors_during_the_concurrency_1_comparison_are_shown(tmp_path):
    """429s in the turn-taking comparison were in the JSON only; the overhead came from the successes silently."""
    with stub(status=lambda n: 429 if n % 4 == 0 else 200) as url:
        endpoint = Endpoint(f"{url}/v1/models/m/classify")
        single = e2e.single_stream(endpoint, [b"a"], lambda x: x, [np.zeros(1)], rounds=2, slice_s=0.15)
    failed = single["errors"]["HTTP 429"]
    assert failed > 0 and single["server_requests"] == single["server_ok"] + failed
    doc = _doc(single)
    text = e2e.format_e2e(doc)
    assert f"errors during the concurrency-1 comparison: HTTP 429 ×{failed}" in text
    assert (f"computed from a subset: the {single['server_ok']} of {single['server_requests']} requests that "
            f"succeeded ({failed} failed: HTTP 429 ×{failed})") in text
    assert re.search(rf"turns\s+c=1\s+-\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+{single['server_ok']}\s+{failed} \(", text)


def _doc(single: dict, bare_b1_ips: float = 400.0) -> dict:
    """A results document around a single_stream result, with a bare runtime and one closed level."""
    closed = {"mode": "closed", "concurrency": 1, "throughput_rps": 100.0, "ok": 100, "errors": {}, "error_rate": 0.0,
              "client_cpu_s": 0.1, "latency_ms": {"p50": 3.0, "p90": 4.0, "p99": 5.0}, "server_timing_ms": {}}
    doc = {"closed": [closed], "open": {**closed, "mode": "open", "target_rate": 70.0}, "single_stream": single,
           "bare": {"runtime": "onnxruntime", "precision": "fp32", "infer_b1_ms": single["bare_ms"],
                    "preprocess_ms": {"p50": 0.5}, "throughput_ips_by_batch": {"1": bare_b1_ips},
                    "best_throughput_ips": bare_b1_ips, "best_batch": 1}}
    doc["overhead"] = e2e.overhead(doc)
    return doc


# --- 7. the concurrency-1 overhead: paired per round, with its interval -----------------------------------------------

@pytest.mark.parametrize("rounds, measurable, problem", [
    ([4.0, 4.3, 4.5, 4.8, 4.1, 4.2], True, None),
    ([-11.2, -7.4, 4.5, 5.8], False, "its interval straddles zero"),
    ([-3.0, -2.0, -2.5], False, "negative: the server came out faster than what it runs"),
    ([1.0, 5.0, 9.0], False, "its interval is wider than the overhead itself"),
    ([4.0], False, "a single round"),
])
def test_the_overhead_is_measurable_only_with_a_tight_positive_interval(rounds, measurable, problem):
    o = e2e.paired_overhead(rounds)
    assert o["c1_overhead_ms"] == pytest.approx(float(np.median(rounds)))
    assert o["c1_overhead_measurable"] is measurable and o["c1_overhead_problem"] == problem
    assert o["c1_overhead_interval"] == ("95% CI" if len(rounds) >= 6 else
                                         f"range of {len(rounds)} round{'s' if len(rounds) > 1 else ''}")


def _single(rounds: list[list[float]], errors: dict | None = None) -> dict:
    bare = [b for b, _ in rounds]
    served = [s for _, s in rounds]
    return {"rounds": len(rounds), "slice_s": 0.25, "reference": "bare", "errors": errors or {},
            "server_ok": 40, "server_requests": 40 + sum((errors or {}).values()), "round_p50_ms": rounds,
            "round_overhead_ms": [s - b for b, s in rounds],
            "bare_ms": {"p50": float(np.median(bare))}, "server_ms": {"p50": float(np.median(served)), "p90": 1,
                                                                      "p99": 1},
            "server_timing_ms": {"compute": {"p50": 1.84}}}


def test_a_sign_changing_overhead_is_not_measurable_here():
    """The review's run: round medians [bare, server] whose pooled medians gave -6.67 ms, printed as a figure."""
    doc = _doc(_single([[11.95, 3.07], [6.23, 3.01], [10.23, 3.01], [2.16, 8.96]]))
    o = doc["overhead"]
    assert o["c1_overhead_ms"] == pytest.approx(np.median([3.07 - 11.95, 3.01 - 6.23, 3.01 - 10.23, 8.96 - 2.16]))
    assert o["c1_overhead_interval_ms"] == pytest.approx([3.07 - 11.95, 8.96 - 2.16])  # the 4 rounds' range
    assert not o["c1_overhead_measurable"] and o["c1_overhead_beyond_preprocess_ms"] is None
    line = next(x for x in e2e.overhead_lines(doc) if x.startswith("server overhead at concurrency 1"))
    assert "not measurable here (median of the rounds" in line and "range of 4 rounds" in line
    assert "+-" not in line and "straddles zero" in line


def test_a_steady_overhead_is_stated_with_its_interval():
    rounds = [[10.0, 14.0 + d] for d in (0.0, 0.3, 0.5, 0.8, 0.1, 0.2)]
    doc = _doc(_single(rounds), bare_b1_ips=100.0)
    o = doc["overhead"]
    assert o["c1_overhead_measurable"] and o["c1_overhead_ms"] == pytest.approx(4.25)
    lines = e2e.overhead_lines(doc)
    line = next(x for x in lines if x.startswith("server overhead at concurrency 1"))
    assert "paired per round, 6 rounds): +4.25 ms (95% CI +4.00 to +4.80 ms), +3.75 ms beyond preprocessing" in line
    # The bare batch-1 figure timed alone afterwards is labelled as such; they agree here (10 ms both).
    assert "in turns with the server (the overhead's reference)" in lines[0] and "b1 10.00 ms per call" in lines[0]
    assert not any(x.startswith("the two bare batch-1 figures differ") for x in lines)


def test_bare_figures_that_disagree_are_reconciled_in_words():
    doc = _doc(_single([[9.72, 3.04]] * 4), bare_b1_ips=410.3)
    assert any(x.startswith("the two bare batch-1 figures differ 4.0x (9.72 ms in turns, 2.44 ms alone)")
               for x in e2e.overhead_lines(doc))


# --- hAX 3. a compiled torch server is not compiled a second time in-process ------------------------------------------

def test_a_compiled_torch_server_is_compared_with_its_own_compute_stage(tmp_path, monkeypatch):
    info = {**INFO, "runtime": "torch", "execution": {"compiled": True, "batch_buckets": [1, 2, 4, 8]}}
    monkeypatch.setattr(e2e, "bundle_mismatch", lambda *_a: None)
    monkeypatch.setattr(e2e, "open_bare", lambda *_a: pytest.fail("opened the compiled model a second time"))
    with stub(info=info, timing="compute;dur=0.01, total;dur=0.02") as url:
        doc = e2e.run_e2e(e2e.E2EConfig(url=url, bundle=tmp_path, concurrency=(1,), duration=0.2, warmup=0.05,
                                        quick=True), log=lambda _m: None)
    assert doc["bare"] is None and "compiled" in doc["bare_skipped"]
    single, o = doc["single_stream"], doc["overhead"]
    assert single["reference"] == e2e.COMPUTE_REFERENCE and single["bare_ms"] is None
    assert len(single["round_overhead_ms"]) == 4 and all(r[0] == pytest.approx(0.01) for r in single["round_p50_ms"])
    # Each request's latency minus its own compute stage.
    assert o["c1_overhead_ms"] == pytest.approx(float(np.median(single["round_overhead_ms"])))
    assert o["c1_overhead_ms"] > 0 and "saturation_fraction_of_bare" not in o
    text = e2e.format_e2e(doc)
    assert "bare runtime not opened in-process: the server runs torch compiled" in text
    assert "reference: its own compute stage per request" in text and "no bare runtime to compare it with" in text
    assert e2e.write_e2e_reports(doc, tmp_path, plots=False)[1].read_text().count("compute stage") >= 2


def test_an_eager_torch_server_is_still_compared_with_the_bare_runtime():
    assert e2e.bare_skip_reason({**INFO, "runtime": "torch", "execution": {"compiled": False}}) is None
    assert e2e.bare_skip_reason({**INFO, "execution": {"compiled": True}}) is None  # onnxruntime: never compiled
