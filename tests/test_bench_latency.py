"""`python benchmarks/latency.py --quick` end to end on the micro pair, its --http mode against a real server,
and its argument errors. Structure and sanity only: speed is never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_gpu_paths_static import cuda_skip_reason, skip_for, tensorrt_skip_reason

from benchmarks.latency import main

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "latency.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run from a fresh directory, on its defaults: the bundle cache and the results land under the
    directory it runs in (never in the checkout or an installed package). Its process result, cache and output."""
    here = tmp_path_factory.mktemp("bench-cwd")
    cache, out = here / "exports" / "bench", here / "exports" / "bench" / "results"
    # torch's OpenMP threads wait for work by spinning unless told otherwise: on a CPU shared with the other test
    # worker the spinning pool starved the busy one, and the run took twice as long (a policy the caller set is kept).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress"], cwd=here, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cache.is_dir() and out.is_dir(), sorted(str(p.relative_to(here)) for p in here.rglob("*"))[:20]
    return proc, cache, out


def _one(out: Path, pattern: str) -> Path:
    found = sorted(out.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {out}, found {[p.name for p in found]}"
    return found[0]


def test_quick_writes_json_markdown_and_plots(quick):
    proc, _, out = quick
    doc = json.loads(_one(out, "*-quick.json").read_text())
    md = _one(out, "*-quick.md").read_text()
    for name in ("*-quick-latency.png", "*-quick-ratio.png"):
        assert _one(out, name).read_bytes()[:8] == PNG_MAGIC
    assert doc["schema"] == "vitc-latency-benchmark" and doc["config"]["pairs"] == ["micro"]
    assert "C ms p50/p90/p99" in proc.stdout and "micro" in proc.stdout  # the terminal table
    assert "| micro | onnxruntime-fp32 | 1 |" in md and "## Cold start" in md and "-quick-ratio.png" in md


def test_quick_results_are_complete_and_sane(quick):
    _, _, out = quick
    doc = json.loads(_one(out, "*-quick.json").read_text())
    results, ratios = doc["results"], doc["ratios"]
    targets = {r["target"] for r in results}
    assert {"onnxruntime-fp32", "openvino-fp32", "openvino-int8", "torch-fp32"} <= targets
    assert {r["batch"] for r in results} == {1, 8}
    for r in results:
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert lat["ci95"][0] <= lat["p50"] <= lat["ci95"][1]
        assert r["reps"] >= 1 and r["threads"] >= 1
        assert r["macs_per_image"] == doc["models"][r["model"]]["macs_per_image"] > 0
        assert r["gflops"] == pytest.approx(2 * r["macs_per_image"] * r["batch"] / (lat["p50"] / 1e3) / 1e9)
        assert 0 < r["fraction_of_limit"] < 1.5, r
    # One C/P ratio per (target, batch): the median per-round ratio, inside its interval. --quick runs 2 rounds or
    # so, which give only a range and no firm verdict.
    assert len(ratios) == len(results) // 2
    for q in ratios:
        assert q["ratio"] == pytest.approx(float(np.median(q["round_ratios"])))
        assert q["interval"][0] <= q["ratio"] <= q["interval"][1]
        assert q["flagged"] == (abs(q["ratio"] - 1) > 0.05)
        n = len(q["round_ratios"])
        assert q["firm"] == (n >= 6) and q["interval_kind"].startswith("95% CI" if n >= 6 else f"range of {n} round")
        assert q["verdict"].removeprefix("indicative: " if n < 6 else "") in (
            "parity", "C slower", "C faster", "inconclusive")
    assert {c["model"] for c in doc["cold_start"]} == {"vit_c_micro", "vit_p_micro"}
    assert all(c["seconds"] > 0 for c in doc["cold_start"])
    assert doc["summary"]["micro"]["best_batch1"].keys() == {"vit_c_micro", "vit_p_micro"}
    int8 = doc["models"]["vit_c_micro"]["int8_parity"]
    assert int8["top1_agreement"] is not None and int8["timed"]
    assert int8["passes_serving_gate"] == (not int8["serving_gate_failures"])
    profiles = [b for b in doc["breakdown"] if "error" not in b]
    assert {(b["model"], b["target"]) for b in profiles} >= {("vit_c_micro", "openvino-fp32"),
                                                             ("vit_p_micro", "openvino-int8")}
    for b in profiles:
        assert 0 < b["matmul_ms"] <= b["profiled_ms"] and 0 < b["matmul_share"] <= 1 and b["gemm_gflops"] > 0


def test_quick_captures_environment_and_limit(quick):
    _, _, out = quick
    doc = json.loads(_one(out, "*-quick.json").read_text())
    env = doc["environment"]
    assert env["cpu"]["model"] and env["cpu"]["usable_cpus"] >= 1 and isinstance(env["cpu"]["flags"], list)
    assert {"python", "numpy", "onnxruntime", "openvino", "torch"} <= env["versions"].keys()
    assert len(env["git"]["commit"] or "") == (40 if (REPO / ".git").exists() else 0)  # an sdist has no commit
    assert env["threads"] >= 1 and len(env["load_average"]) == 3
    fp32 = doc["machine_limit"]["cpu"]["fp32"]
    assert fp32["native"] and fp32["gflops"] > 0 and fp32["by_library"]
    assert doc["machine_limit"]["cpu"]["bf16"]["native"] in (True, False)
    if not env["gpus"]:  # GPU targets are listed with their reason, not silently dropped
        reasons = {s["target"]: s["reason"] for s in doc["skipped"]}
        assert "no CUDA GPU" in reasons["onnxruntime-cuda-fp32"]
        assert {"tensorrt-fp16", "tensorrt-int8"} <= reasons.keys()


def test_http_mode_starts_a_server_and_compares_with_the_bare_runtime(quick, tmp_path, capsys):
    # In this process (the script's own start is the quick run's): the server it starts is a process of its own.
    _, cache, _ = quick
    bundle = cache / "vit_c_micro-random-init"
    rc = main(["--http", "start", "--bundle", str(bundle), "--quick", "--duration", "0.5", "--concurrency", "1,2",
               "--image-format", "jpeg", "--image-size", "48", "--server-args", "--max-queue-delay-ms 1 --threads 1",
               "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err[-3000:]
    doc = json.loads(_one(tmp_path, "*-http.json").read_text())
    assert _one(tmp_path, "*-http.png").read_bytes()[:8] == PNG_MAGIC
    md = _one(tmp_path, "*-http.md").read_text()
    assert "server overhead at concurrency 1" in md and "JPEG animals val images resized to 48x48" in md
    assert doc["url"].startswith("http://127.0.0.1:") and doc["server_started"]["backend"] == "onnxruntime"
    assert doc["server_started"]["settings"] == "--max-queue-delay-ms 1 --threads 1"
    assert doc["server_model"]["execution"]["threads_effective"] == 1  # the flags reached the server
    assert [r["concurrency"] for r in doc["closed"]] == [1, 2]
    for level in [*doc["closed"], doc["open"]]:
        assert level["ok"] > 0 and level["errors"] == {} and level["throughput_rps"] > 0
        assert level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        # Every answer's Server-Timing: the stages add up to no more than the server's total, itself <= the client's.
        st = level["server_timing_ms"]
        assert {"decode", "compute", "total"} <= st.keys(), st
        assert st["compute"]["p50"] <= st["total"]["p50"] <= level["latency_ms"]["p50"] * 1.05
    assert "Where the server's time goes" in md and "| c=1 |" in md
    assert doc["open"]["mode"] == "open" and doc["open"]["target_rate"] > 0
    assert doc["server_model"]["runtime"] == doc["bare"]["runtime"] == "onnxruntime"
    o = doc["overhead"]
    # Paired per round (each round's server p50 minus its bare p50), not a difference of two pooled medians.
    paired = [s - b for b, s in doc["single_stream"]["round_p50_ms"]]
    assert o["c1_overhead_ms"] == pytest.approx(float(np.median(paired)))
    assert o["saturation_fraction_of_bare"] > 0
    # The bare runtime runs as the server does: its --threads 1 (so no all-core latency session in either), and
    # the two are timed in turns at concurrency 1.
    bare = doc["bare"]
    assert bare["options"]["threads"] == 1 and bare["options_from"] == "the started server's settings"
    assert bare["differs"] == [] and bare["execution"]["latency_session"] is False
    assert bare["execution"] == doc["server_model"]["execution"]
    single = doc["single_stream"]
    assert single["rounds"] == len(single["round_p50_ms"]) == 4 and single["errors"] == {}
    assert o["c1_p50_ms"] == single["server_ms"]["p50"] and o["bare_infer_b1_p50_ms"] == single["bare_ms"]["p50"]
    assert "+-" not in md and f"{o['c1_overhead_ms']:+.2f} ms" in md and "same execution report" in md


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "nope"], "unknown pair 'nope'"),
    (["--batch-sizes", "0"], "expected integers in 1..1024"),
    (["--targets", "openvino-fp64"], "unknown target"),
    (["--http", "ftp://example.org"], "needs an http(s)://host"),
    (["--http", "start"], "--http start needs --bundle"),
    (["--http", "http://127.0.0.1:9", "--duration", "1"], "cannot reach the server"),
    (["--http", "http://127.0.0.1:9", "--server-args=--compile"], "--server-args applies to --http start only"),
    (["--parity-samples", "0"], "--parity-samples must be in 1..100000"),
    # Non-finite numbers: nan passes every `x <= 0` check (all comparisons with nan are false), inf means no limit.
    (["--cell-seconds", "nan"], "argument --cell-seconds: must be a number in (0, 3600], got nan"),
    (["--cell-seconds", "inf"], "argument --cell-seconds: must be a number in (0, 3600]"),
    (["--cell-seconds", "-1"], "argument --cell-seconds: must be a number in (0, 3600]"),
    (["--limit-seconds", "nan"], "argument --limit-seconds: must be a number"),
    (["--http", "start", "--duration", "nan"], "argument --duration: must be a number"),
    (["--http", "start", "--rate", "inf"], "argument --rate: must be a number"),
    (["--http", "start", "--rate", "ten"], "argument --rate: expected a number, got 'ten'"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flag, where", [("--out", "file"), ("--out", "file/sub"), ("--cache", "file"),
                                         ("--cache", "file/sub")])
def test_unusable_out_or_cache_is_refused_before_anything_runs(flag, where, tmp_path, capsys):
    """--out or --cache naming a file (or a path under one) used to fail with a bare OSError, --out only after the
    whole benchmark had run and its results were lost: now one line up front, saying what to give instead."""
    (tmp_path / "file").write_text("kept")
    other = "--cache" if flag == "--out" else "--out"
    argv = ["--quick", "--no-progress", flag, str(tmp_path / where), other, str(tmp_path / "other")]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python benchmarks/latency.py: error: {flag} {tmp_path / where}: "), err
    assert "give " in err[0] and "Errno" not in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing measured, exported or created
    assert (tmp_path / "file").read_text() == "kept"


def _must_not_measure(*_args, **_kwargs):
    raise AssertionError("the benchmark ran")


@pytest.mark.parametrize("argv, message", [
    # it ran the full default benchmark
    (["--pairs", ""], "python benchmarks/latency.py: error: --pairs '' names nothing; known pairs: 1gf, "),
    (["--pairs", " , "], "python benchmarks/latency.py: error: --pairs ' , ' names nothing"),
    (["--threads", "0"], "argument --threads: must be in 1..1024, got 0"),  # 0 meant "every CPU"
    (["--threads", "-2"], "argument --threads: must be in 1..1024, got -2"),
])
def test_arguments_that_name_nothing_are_refused(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.suite.run_suite", _must_not_measure)
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main([*argv, "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []  # the check that --out and --cache can be written left nothing behind


def test_an_out_that_cannot_be_created_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """/proc passed the os.access check (as root): the run measured for minutes, then failed to save."""
    monkeypatch.setattr("benchmarks.suite.run_suite", _must_not_measure)
    assert main(["--quick", "--cache", str(tmp_path), "--out", "/proc/vitc-bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python benchmarks/latency.py: error: --out /proc/vitc-bench: "), err


# A "measured" run without measuring: a copy of committed mini results (in tests/data: the sdist holds no results)
# stands in for run_suite's document.
_STUB_RUN = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
import benchmarks.suite
from benchmarks.latency import main
doc = json.load(open("tests/data/bench-results-mini.json"))
doc.pop("summary")
benchmarks.suite.run_suite = lambda cfg, log=None: doc
sys.exit(main(sys.argv[1:]))
"""


def test_a_file_size_limit_while_saving_is_one_line_naming_the_file_and_exit_1(tmp_path):
    """Under `ulimit -f` the measured run used to end 'error: [Errno 27] File too large', exit 2, nothing saved."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _STUB_RUN, "--pairs", "mini", "--no-progress", "--cache",
                           str(tmp_path / "cache"), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    json_path = out / "2026-12-05-0235-vm.json"
    assert err == [f"python benchmarks/latency.py: error: File too large: {json_path}: the measurements are printed "
                   "above"], err
    assert "C ms p50/p90/p99" in proc.stdout and "mini  onnxruntime-fp32" in proc.stdout  # the table was printed
    assert list(out.iterdir()) == []  # no temp file left behind


def test_started_server_options_and_execution_differences(monkeypatch):
    """The bare runtime of the end-to-end mode opens the artifact with the options the server's settings give."""
    from benchmarks.e2e import execution_differences, reported_options, started_options
    from runtimes import BackendOptions

    for var in ("VITC_THREADS", "VITC_PARALLEL", "VITC_OPENVINO_HINT", "VITC_DEVICE"):
        monkeypatch.delenv(var, raising=False)
    args = ["--model", "b", "--backend", "openvino", "--no-access-log"]
    assert started_options(args) == BackendOptions()
    assert started_options([*args, "--threads", "1", "--parallel", "2"]) == BackendOptions(threads=1, parallel=2)
    assert started_options([*args, "--threads", "1", "--openvino-hint", "latency"]) == \
        BackendOptions(threads=1, hint="latency")
    monkeypatch.setenv("VITC_THREADS", "3")  # the started server inherits the environment
    assert started_options(args).threads == 3
    assert reported_options({"execution": {"parallelism": 2, "threads_effective": 1}}) == [
        BackendOptions(parallel=2), BackendOptions(parallel=2, threads=1)]
    server = {"threads_effective": 1, "latency_session": False, "compile_seconds": {"1": 2.0}}
    bare = {"threads_effective": 1, "latency_session": True, "compile_seconds": {}}
    assert execution_differences(server, bare) == ["latency_session: server False, bare True"]
    assert execution_differences({"providers": ("CPU",)}, {"providers": ["CPU"]}) == []


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (none visible to torch)")
def test_quick_on_the_gpu_measures_the_cuda_limit_and_onnxruntime_cuda(quick, tmp_path):
    import runtimes

    reason = runtimes.get("onnxruntime").unavailable("cuda")
    if reason:
        pytest.skip(reason)
    _, cache, _ = quick
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--targets", "onnxruntime-cuda-fp32",
         "--cache", str(cache), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(_one(tmp_path, "*-quick.json").read_text())
    assert doc["machine_limit"]["cuda"]["fp32"]["gflops"] > 0
    cells = [r for r in doc["results"] if r["target"] == "onnxruntime-cuda-fp32"]
    assert cells and all(r["limit"] == "cuda fp32" and 0 < r["fraction_of_limit"] < 1.5 for r in cells)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (none visible to torch)")
def test_quick_on_torch_cuda_eager_and_compiled(quick, tmp_path):
    _, cache, _ = quick
    targets = "torch-cuda-fp32,torch-cuda-bf16,torch-cuda-bf16-nchw,torch-cuda-fp16-compiled"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--targets", targets,
         "--cache", str(cache), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(_one(tmp_path, "*-quick.json").read_text())
    assert {r["target"] for r in doc["results"]} == set(targets.split(",")), doc["skipped"]
    for r in doc["results"]:
        assert r["limit"] == f"cuda {r['precision']}" and 0 < r["fraction_of_limit"] < 1.5
        assert r["channels_last"] == (not r["target"].endswith("-nchw"))
        assert r["compiled"] == ("compiled" in r["target"])


@pytest.mark.tensorrt
@skip_for(tensorrt_skip_reason() or cuda_skip_reason())  # torch measures the machine's CUDA limit
def test_quick_on_tensorrt_fp16(quick, tmp_path):
    _, cache, _ = quick
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--targets", "tensorrt-fp16",
         "--cache", str(cache), "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(_one(tmp_path, "*-quick.json").read_text())
    cells = [r for r in doc["results"] if r["target"] == "tensorrt-fp16"]
    assert cells and all(r["limit"] == "cuda fp16" and r["fraction_of_limit"] > 0 for r in cells)


def test_cached_bundles_are_reused_only_while_fresh(quick):
    from benchmarks import bundles

    _, cache, _ = quick
    logged: list[str] = []
    prepared = bundles.prepare_model("micro", "vit_c_micro", cache=cache, targets=["onnx", "openvino-fp32"],
                                     max_batch=32, log=logged.append)
    assert logged == [] and prepared.bundle == cache / "vit_c_micro-random-init" and prepared.stem == "conv"
    assert prepared.manifest.source.sha256 == bundles._weights_sha(prepared.checkpoint)
    # A bigger batch than the bundle was exported for, or a target it lacks, makes it stale.
    assert bundles._fresh(prepared.bundle, prepared.checkpoint, ["onnx"], max_batch=64) is None
    assert bundles._fresh(prepared.bundle, prepared.checkpoint, ["onnx", "openvino-fp16"], max_batch=32) is None
    assert bundles._fresh(prepared.bundle, cache / "init-vit_p_micro", ["onnx"], max_batch=32) is None
