"""Benchmark honesty (hCN): the open loop reports what the server served, not the rate it was offered; load-test
latencies can be recomputed from the file; thin percentiles are marked; the README's benchmark text matches the
committed results. The load loops run against a stand-in server in this process whose capacity is known: one
request at a time, a fixed time each."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from stand_in_http import StandInHandler, stand_in_server

from benchmarks import e2e, load, report
from benchmarks.loadgen import Endpoint, LoadResult, closed_loop, open_loop

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = (REPO / "README.md").read_text()
SERVICE_S = 0.025  # the stand-in's time per request, one at a time: it serves at most 40 requests a second
CAPACITY_RPS = 1 / SERVICE_S


@contextmanager
def _one_at_a_time(service_s: float = SERVICE_S) -> Iterator[str]:
    """A stand-in server that answers one request at a time, each after `service_s`; its URL."""
    worker = threading.Lock()  # one worker: connections are accepted in threads, served in turn

    class Handler(StandInHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.read_body()
            with worker:
                time.sleep(service_s)
            self.send_body(b"{}")

    with stand_in_server(Handler, "/classify") as url:
        yield url


# --- 1. the open loop's throughput is what was served ----------------------------------------------------------------

def test_an_open_loop_offered_three_times_the_capacity_reports_what_was_served():
    """A server doing 380 req/s closed-loop was reported serving 1203 req/s open-loop: every request scheduled in
    the window that succeeded, however late, was divided by the window."""
    rate = 3 * CAPACITY_RPS
    with _one_at_a_time() as url:
        s = open_loop(Endpoint(url), [b"x"], rate=rate, seconds=1.0, warmup_s=0.25).summary()
    assert s["ok"] > 0 and s["errors"] == {}
    assert s["throughput_rps"] <= 0.7 * rate, s["throughput_rps"]
    assert s["offered_rps"] == pytest.approx(s["scheduled"] / s["seconds"])  # the arrivals scheduled in the window
    assert s["scheduled"] == s["requests"] == s["ok"]
    assert s["throughput_rps"] <= 0.7 * s["offered_rps"] and s["fell_behind"] is True
    # Close to what the server can do: never above its capacity (bar a margin), and not a small fraction of it.
    assert 0.3 * CAPACITY_RPS <= s["throughput_rps"] <= 1.2 * CAPACITY_RPS, s["throughput_rps"]
    # The time it took: from the window's start until the last of its requests was answered, longer than the window.
    assert s["served_s"] > 1.5 * s["seconds"]
    assert s["throughput_rps"] == pytest.approx(s["ok"] / s["served_s"], rel=1e-3)  # served_s: rounded to 1 ms


def test_an_open_loop_the_server_keeps_up_with_reports_about_the_offered_rate():
    rate = CAPACITY_RPS / 4
    with _one_at_a_time() as url:
        # 3 s: "fell behind" needs the last answer more than 0.3 s late, far beyond a 25 ms service on a busy machine
        s = open_loop(Endpoint(url), [b"x"], rate=rate, seconds=3.0, warmup_s=0.25).summary()
    assert s["ok"] > 0 and s["errors"] == {}
    assert s["fell_behind"] is False and s["throughput_rps"] >= 0.7 * s["offered_rps"]
    assert s["served_s"] >= s["seconds"]  # at least the window


def test_the_closed_loop_reports_no_more_than_the_server_serves():
    """The closed loop keeps its definition (successes sent in the window / the window): each client sends only
    after its answer, so the requests still answered after the window are as many as the warm-up's answered in it."""
    with _one_at_a_time() as url:
        s = closed_loop(Endpoint(url), [b"x"], concurrency=8, seconds=1.0, warmup_s=0.25).summary()
    assert 0.3 * CAPACITY_RPS <= s["throughput_rps"] <= 1.2 * CAPACITY_RPS, s["throughput_rps"]
    assert s["offered_rps"] is None and s["fell_behind"] is None
    assert s["throughput_rps"] == pytest.approx(s["ok"] / s["seconds"])


def _open_doc(**level: object) -> dict:
    """An end-to-end document with one closed level and the given open level."""
    closed = {"mode": "closed", "concurrency": 1, "throughput_rps": 40.0, "ok": 400, "errors": {}, "error_rate": 0.0,
              "client_cpu_s": 0.1, "latency_ms": {"p50": 3.0, "p90": 4.0, "p99": 5.0, "n": 400},
              "server_timing_ms": {}}
    open_ = {**closed, "mode": "open", "concurrency": None, "target_rate": 120.0, **level}
    return {"closed": [closed], "open": open_, "single_stream": None, "bare": None, "overhead": None}


def test_the_e2e_report_shows_offered_and_achieved_and_says_when_the_server_fell_behind():
    result = LoadResult("open", None, 120.0, 2.0, latencies_s=[0.5] * 240, scheduled=240, last_answer_s=6.0)
    s = result.summary()
    assert s["offered_rps"] == pytest.approx(120.0) and s["throughput_rps"] == pytest.approx(40.0)
    assert s["served_s"] == pytest.approx(6.0) and s["fell_behind"] is True
    doc = _open_doc(**s)
    text = e2e.format_e2e(doc)
    line = next(x for x in text.splitlines() if x.startswith("open loop (Poisson 120.0/s)"))
    assert "offered 120.0 req/s" in line and "achieved 40.0 req/s" in line
    assert "the server fell behind" in line and "67 % below" in line
    assert re.search(r"open\s+Poisson 120.0/s\s+40.0\s", text)  # the table's req/s is the achieved rate
    assert line in e2e.markdown_e2e({**doc, **_md_fields()})


def test_an_open_loop_that_kept_up_is_not_said_to_fall_behind():
    s = LoadResult("open", None, 100.0, 2.0, latencies_s=[0.01] * 200, scheduled=204, last_answer_s=2.01).summary()
    assert s["throughput_rps"] == pytest.approx(200 / 2.01) and s["fell_behind"] is False
    line = next(x for x in e2e.format_e2e(_open_doc(**s)).splitlines() if x.startswith("open loop"))
    assert "fell behind" not in line and "offered 102.0 req/s" in line


def _md_fields() -> dict:
    return {"server_model": {"name": "m"}, "url": "http://127.0.0.1:9", "created": "2026-01-01T00:00:00Z",
            "host": "h", "argv": ["x"], "environment": {"cpu": {"model": "cpu"}},
            "config": {"images": 1, "image_bytes_mean": 1.0, "duration_s": 2.0, "warmup_s": 0.5}}


# --- 3. load-test latencies can be recomputed; the throughput axis starts at 0; thin percentiles are marked ----------

ANSWER = b'{"model": "m", "predictions": [{"label": "cat", "index": 0, "score": 1.0}]}'
INFO = {"name": "m", "variant": "vit_c_micro", "runtime": "onnxruntime", "precision": "fp32", "device": "cpu",
        "max_batch": 8, "source": {"sha256": "0" * 64}}


@contextmanager
def _vitc_like() -> Iterator[str]:
    """A stand-in with vitc's /v1/models and classify answer and an empty /metrics; its base URL."""

    class Handler(StandInHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_body(b"" if self.path == "/metrics" else json.dumps({"models": [INFO]}).encode())

        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            time.sleep(0.002)
            self.send_body(ANSWER)

    with stand_in_server(Handler) as url:
        yield url


def test_load_levels_keep_their_latency_samples(tmp_path, monkeypatch):
    """The load test dropped latency_samples_ms, so its percentiles could not be recomputed from the file."""
    monkeypatch.setattr(load, "request_bodies", lambda n, **_kw: [b"a", b"b"])  # no dataset decoding
    out = tmp_path / "load.json"
    with _vitc_like() as url:
        assert load.main(["--url", url, "--concurrency", "1", "2", "--duration", "0.4", "--warmup", "0",
                          "--images", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema_version"] >= 5
    for level in doc["models"][0]["levels"]:
        samples = level["latency_samples_ms"]
        values = np.array(samples["values"].split(), dtype=float)
        assert samples["n"] == level["ok"] > 0 and samples["kept"] == values.size <= load.MAX_LEVEL_SAMPLES
        if samples["every"] == 1:
            for key, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99)):
                assert np.percentile(values, q) == pytest.approx(level[key], rel=1e-3, abs=1e-3)


def test_the_load_plot_throughput_axis_starts_at_zero():
    """275-315 req/s filled the whole panel, so a 13 % difference looked like a collapse."""
    levels = [{"concurrency": c, "p50_ms": 5.0, "p99_ms": 9.0, "throughput_rps": tp}
              for c, tp in ((1, 275.0), (4, 315.0), (16, 300.0))]
    fig = load.figure({"models": [{"name": "m", "levels": levels}], "machine": {"cpus": 2}})
    ax_tp = fig.axes[1]
    assert ax_tp.get_ylabel() == "throughput (requests/s)" and ax_tp.get_ylim()[0] == 0
    import matplotlib.pyplot as plt

    plt.close(fig)


def _level(ok: int) -> dict:
    return {"concurrency": 4, "p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 30.0, "throughput_rps": 50.0, "ok": ok,
            "http_503": 0, "other_errors": {}, "mean_batch_size": 2.0}


def test_the_load_report_marks_percentiles_from_too_few_samples():
    """p99 of 10 samples lies between the two largest: printed unmarked, it read like a measured tail."""
    doc = {"models": [{"name": "m", "runtime": "onnxruntime", "precision": "fp32",
                       "levels": [_level(8), _level(50), _level(500)]}]}
    md = load.markdown(doc)
    assert "| 10.0 | 20.0† | 30.0† | 50 | 8 |" in md  # p90 of 8, p99 of 8
    assert "| 10.0 | 20.0 | 30.0† | 50 | 50 |" in md  # p99 of 50
    assert "| 10.0 | 20.0 | 30.0 | 50 | 500 |" in md
    assert "† p90 from fewer than 10 samples, p99 from fewer than 100" in md
    assert "p99    30.0† ms" in load.format_level(_level(50)) and "†" not in load.format_level(_level(500))
    assert "†" not in load.markdown({"models": [{**doc["models"][0], "levels": [_level(500)]}]})


def test_the_e2e_report_names_its_thin_percentiles():
    doc = _open_doc(latency_ms={"p50": 3.0, "p90": 4.0, "p99": 5.0, "n": 55}, ok=55)
    text = e2e.format_e2e(doc)
    assert "p99 from fewer than 100 samples (it lies between the two largest): open Poisson 120.0/s (n=55)" in text
    assert "closed c=1" not in text.split("p99 from fewer")[1].splitlines()[0]  # 400 samples: unmarked
    assert "fewer than" not in e2e.format_e2e(_open_doc(latency_ms={"p50": 3.0, "p90": 4.0, "p99": 5.0, "n": 400}))


def test_the_latency_report_marks_p99_of_ten_calls():
    """Committed run 0217: "1gf openvino-int8 b32 879.2 / 943.6 / 950.5" from 10 calls each, printed as a p99."""
    doc = json.loads((RESULTS / "2026-11-25-0217-vm.json").read_text())
    cell = next(r for r in doc["results"] if r["target"] == "openvino-int8" and r["batch"] == 32
                and r["model"] == "vit_c_1gf")
    assert cell["reps"] < 100
    md = report.markdown(doc)
    assert "879.2 / 943.6 / 950.5†" in md and report.THIN_NOTE in md and report.THIN_NOTE in report.format_table(doc)
    big = next(r for r in doc["results"] if r["reps"] >= 100)
    lat = big["latency_ms"]
    assert f"{report._ms(lat['p50'])} / {report._ms(lat['p90'])} / {report._ms(lat['p99'])} |" in md


# --- 2. the README and the committed notes say what the committed data are ---------------------------------------

def _section(start: str, end: str) -> str:
    at = README.index(start)
    return README[at:README.index(end, at)]


def test_the_0143_run_intervals_are_called_10_90_ranges_not_cis():
    """README and the note said the 0143 intervals came from the medians' CIs; they are the 10-90 % range of
    per-round ratios the run did not save (its own footer, and stats.py at its commit, say so)."""
    doc = json.loads((RESULTS / "2026-11-25-0143-vm.json").read_text())
    res = {(r["pair"], r["model"], r["target"], r["batch"]): r["latency_ms"] for r in doc["results"]}
    differ = 0
    for q in doc["ratios"]:
        c, p = (res[(q["pair"], q[m], q["target"], q["batch"])] for m in ("c_model", "p_model"))
        from_cis = [c["ci95"][0] / p["ci95"][1], c["ci95"][1] / p["ci95"][0]]
        differ += not np.allclose(from_cis, q["interval"], rtol=1e-3)
    assert differ > len(doc["ratios"]) // 2  # so the stored intervals are not the medians' CIs
    md = (RESULTS / "2026-11-25-0143-vm.md").read_text()
    note = next(line for line in md.splitlines() if line.startswith("> Note"))
    text = " ".join(_section("Committed full run: `benchmarks/results/2026-11-25-0143-vm", "The second").split())
    for said in (note, text):
        assert "medians' CIs" not in said and "medians' confidence intervals" not in said, said
        assert re.search(r"10[-–]90 % range", said) and "not reproducible" in said, said
    assert "C faster by 8-20 %" not in note
    assert "10-90 % range of the per-round ratios" in md  # the footer, unchanged


def test_the_mini_table_matches_the_committed_run():
    doc = json.loads((RESULTS / "2026-12-05-0235-vm.json").read_text())
    p50 = {(r["model"].split("_")[1], r["target"]): r["latency_ms"]["p50"] for r in doc["results"] if r["batch"] == 1}
    names = {"onnxruntime fp32": "onnxruntime-fp32", "OpenVINO fp32": "openvino-fp32", "OpenVINO bf16":
             "openvino-bf16", "OpenVINO INT8": "openvino-int8", "torch fp32": "torch-fp32", "torch bf16": "torch-bf16"}
    table = _section("| runtime | C ms | P ms | C/P (batch", "\n\n")
    rows = {m[0]: m[1:] for m in re.findall(r"^\| ([\w ]+?) \| ([\d.]+) \| ([\d.]+) \|", table, re.M)}
    assert rows.keys() == names.keys()
    for name, (c_ms, p_ms) in rows.items():
        assert (c_ms, p_ms) == (f"{p50[('c', names[name])]:.2f}", f"{p50[('p', names[name])]:.2f}"), name
    b8 = max((q for q in doc["ratios"] if q["batch"] == 8), key=lambda q: q["interval"][1] - q["interval"][0])
    quoted = re.search(r"intervals up to ([\d.]+)[-–]([\d.]+) at batch 8", README)
    assert quoted and quoted.groups() == (f"{b8['interval'][0]:.2f}", f"{b8['interval'][1]:.2f}")


def test_the_serving_overhead_quotes_no_p90_figure_absent_from_the_results():
    """"671 vs 341 ms; with it 341-368 ms, below one stream's 384-409": no committed result holds these."""
    committed = " ".join(p.read_text() for p in RESULTS.glob("*.md"))
    text = " ".join(README.split())
    at = text.index("at most its share of the work waiting")
    clause = text[at:text.index(". ", text.index(")", at))]
    for number in re.findall(r"\b\d{3}\b", clause):
        assert re.search(rf"\b{number}(\.\d+)?\b", committed), (number, clause)
    assert "not kept" in clause
