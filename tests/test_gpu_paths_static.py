"""The GPU code paths, checked on a machine without a GPU: what the runtimes hand their libraries (onnxruntime's CUDA
provider options, torch.compile's recompile budget), the TensorRT engine checks as plain functions, and the skip
conditions of the tests that need a GPU. Nothing here pretends to be a GPU library.

The skip helpers below are shared with the gpu/tensorrt tests of test_runtimes, test_export and test_bench_latency:
a machine with the packages but no usable device must skip those tests, not fail them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

import runtimes
from runtimes import BackendError
from runtimes.onnxruntime import execution_providers
from runtimes.tensors import TensorInfo, check_io

ROOT = Path(__file__).resolve().parents[1]


def cuda_skip_reason() -> str | None:
    """Why no CUDA device is usable here, as torch (every test environment has it) sees it; None when one is."""
    import torch

    return None if torch.cuda.is_available() else "needs a usable CUDA device (torch sees none)"


def onnxruntime_cuda_skip_reason() -> str | None:
    """Why onnxruntime cannot run on CUDA here; None when it can. onnxruntime-gpu lists its CUDA provider with or
    without a GPU (and then runs on the CPU), so the device is asked first."""
    if cuda_skip_reason():
        return "onnxruntime on CUDA needs a usable CUDA device (torch sees none)"
    return runtimes.get("onnxruntime").unavailable("cuda")


def tensorrt_skip_reason() -> str | None:
    """Why TensorRT cannot run here; None when it can: the device first (cuda-bindings counts them, or says it is
    missing), then the packages, so an installed TensorRT without a GPU skips rather than fails."""
    rt = runtimes.get("tensorrt")
    reason = rt.unavailable("cuda")
    if reason:
        return f"TensorRT needs a usable CUDA device: {reason}"
    if not rt.installed():
        return f"TensorRT is not installed (needs {', '.join(rt.packages)})"
    return None


def skip_for(reason: str | None) -> pytest.MarkDecorator:
    """`pytest.mark.skipif` on a reason computed once: skipped, before any fixture, when there is one."""
    return pytest.mark.skipif(reason is not None, reason=reason or "")


# --- onnxruntime: no TF32 on CUDA -----------------------------------------------------------------------------


def test_onnxruntime_on_cuda_turns_tf32_off_and_the_cpu_keeps_its_plain_provider():
    from onnxruntime.capi.onnxruntime_inference_collection import check_and_normalize_provider_args

    assert execution_providers("cpu") == ["CPUExecutionProvider"]
    providers = execution_providers("cuda", 1)
    assert providers[1:] == ["CPUExecutionProvider"]
    # What the CUDA provider receives: onnxruntime's own normalisation, as an InferenceSession does it.
    names, options = check_and_normalize_provider_args(providers, None, ["CUDAExecutionProvider",
                                                                         "CPUExecutionProvider"])
    assert names == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options[0] == {"device_id": "1", "use_tf32": "0"}


# --- TensorRT: the engine's I/O is the manifest's, exactly -----------------------------------------------------

SAMPLE = (3, 32, 32)
GOOD = (TensorInfo("input", "input", "float32", (-1, *SAMPLE)), TensorInfo("logits", "output", "float32", (-1, 10)))


def _check(*tensors: TensorInfo) -> None:
    check_io(tensors, "input", "logits", SAMPLE, 10, 32)


def test_tensorrt_accepts_the_engine_it_builds():
    _check(*GOOD)
    _check(*reversed(GOOD))  # the engine's tensor order is its own


@pytest.mark.parametrize(("tensors", "message"), [
    ((*GOOD, TensorInfo("aux", "output", "float32", (-1, 10))), r"outputs \['logits', 'aux'\].*nothing else"),
    ((GOOD[0],), r"outputs \[\]"),
    ((GOOD[0], TensorInfo("probs", "output", "float32", (-1, 10))), r"outputs \['probs'\]"),
    ((GOOD[0], TensorInfo("mask", "input", "float32", (-1, 1)), GOOD[1]), r"inputs \['input', 'mask'\]"),
    ((GOOD[0], TensorInfo("logits", "output", "DataType.HALF", (-1, 10))),
     r"output 'logits' is DataType.HALF, the manifest expects float32"),
    ((TensorInfo("input", "input", "DataType.HALF", (-1, *SAMPLE)), GOOD[1]), r"input 'input' is DataType.HALF"),
    ((GOOD[0], TensorInfo("logits", "output", "float32", (-1, 1000))), r"shape \(-1, 1000\).*\(-1, 10\)"),
    ((GOOD[0], TensorInfo("logits", "output", "float32", (8, 10))), r"shape \(8, 10\)"),
    ((TensorInfo("input", "input", "float32", (-1, 3, 224, 224)), GOOD[1]), r"input 'input' has shape"),
])
def test_tensorrt_refuses_an_engine_whose_io_the_backend_would_misread(tensors, message):
    with pytest.raises(BackendError, match=message):
        _check(*tensors)


# --- torch.compile: every compiled backend compiles, or fails to load -----------------------------------------

# Compiled backends opened one after another in one process, as a benchmark run opens them. The graphs dynamo
# captures run as plain torch (its "eager" backend) instead of inductor's C++ kernels, which take minutes to build
# cold on a CPU: dynamo's capture, guards and recompile limits, which decide whether a backend runs compiled at
# all, are the real ones. argv: bundle, and the runs to make in turn, each a cap on dynamo's compiled entries per
# code object across the process (0: its default); each run starts with a "=== cap N" line on stdout and stderr.
_OPEN_COMPILED = """
import sys
from pathlib import Path

import torch

import runtimes
import runtimes.pytorch as pt
from models.bundle import read_manifest
from runtimes import BackendError, BackendOptions

bundle, caps = Path(sys.argv[1]), [int(c) for c in sys.argv[2].split(",")]
real, default = pt.compile_options, torch._dynamo.config.accumulated_recompile_limit


def eager(cuda, captured):
    # dynamo's settings are per thread: this runs on the backend's compiling thread
    torch._dynamo.config.accumulated_recompile_limit = cap or default
    options = {k: v for k, v in real(cuda, captured).items() if k != "mode"}
    return {**options, "backend": "eager"}


pt.compile_options = eager
manifest = read_manifest(bundle)
for cap in caps:
    for stream in (sys.stdout, sys.stderr):
        print("=== cap", cap, file=stream, flush=True)
    for precision in ("fp32", "bf16", "fp16"):
        for channels_last in (False, True):
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            try:
                backend = runtimes.open_backend(bundle, manifest, "torch", precision, BackendOptions(
                    threads=1, compile=True, channels_last=channels_last, buckets=(1, 2)))
            except BackendError as exc:
                print("refused", precision, channels_last, exc, flush=True)
                continue
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
            print("opened", precision, channels_last, graphs, flush=True)
            backend.close()
"""


@pytest.fixture(scope="module")
def torch_bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory, ("torch-bf16", "torch-fp16"))


@pytest.fixture(scope="module")
def compiled_runs(torch_bundle) -> dict[int, tuple[list[list[str]], str]]:
    """cap -> (the lines of its run, split in 4, and its stderr): both runs in one process (one start of torch).
    The capped run first: its cap counts the entries of the whole process, which the other run would have spent."""
    caps = (4, 0)
    proc = subprocess.run([sys.executable, "-c", _OPEN_COMPILED, str(torch_bundle), ",".join(map(str, caps))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs, errs = (re.split(r"^=== cap \d+\n", text, flags=re.MULTILINE)[1:] for text in (proc.stdout, proc.stderr))
    assert len(outs) == len(errs) == len(caps), proc.stdout
    return {cap: ([line.split(" ", 3) for line in out.splitlines()], err)
            for cap, out, err in zip(caps, outs, errs, strict=True)}


def test_each_compiled_backend_has_its_own_recompile_budget(compiled_runs):
    # Six backends of one model (two graphs each: batch 1 and the dynamic batch): the fifth used to find dynamo's
    # per-code-object budget (8) spent and run eagerly, reported as compiled, with only a log warning.
    lines, stderr = compiled_runs[0]
    assert [line[0] for line in lines] == ["opened"] * 6, lines
    assert all(int(line[3]) >= 1 for line in lines), lines  # each one captured its own graphs
    assert "recompile_limit" not in stderr


def test_a_backend_that_would_fall_back_to_eager_fails_to_load(compiled_runs):
    # Dynamo's cap on the entries of one code object across the process, reached by the third backend.
    lines, _ = compiled_runs[4]
    assert [line[0] for line in lines[:2]] == ["opened"] * 2, lines
    assert lines[2][0] == "refused", lines
    assert "torch.compile would fall back to eager at batch 2" in lines[2][3], lines


# --- the GPU tests skip, with their reason, where no GPU is usable ---------------------------------------------

GPU_TESTS = {
    "tests/test_runtimes.py::test_onnxruntime_cuda": onnxruntime_cuda_skip_reason,
    "tests/test_runtimes.py::test_tensorrt_builds_from_onnx_and_matches": tensorrt_skip_reason,
    "tests/test_export.py::test_tensorrt_engines_pass_parity": tensorrt_skip_reason,
    "tests/test_bench_latency.py::test_quick_on_tensorrt_fp16": lambda: tensorrt_skip_reason() or cuda_skip_reason(),
}


def test_the_skip_reasons_name_the_missing_device_first():
    if cuda_skip_reason() is None:
        pytest.skip("a CUDA device is usable here")
    assert onnxruntime_cuda_skip_reason() == "onnxruntime on CUDA needs a usable CUDA device (torch sees none)"
    # cuda-bindings answers for TensorRT (installed with torch's CUDA wheels), or says it is missing.
    assert tensorrt_skip_reason().startswith("TensorRT needs a usable CUDA device: ")


def test_the_gpu_tests_skip_before_their_fixtures_where_no_device_is_usable():
    reasons = {test: reason() for test, reason in GPU_TESTS.items()}
    if not all(reasons.values()):
        pytest.skip("a GPU runtime can run here: those tests run")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "", *GPU_TESTS],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert re.search(r"\b4 skipped\b", proc.stdout), proc.stdout[-3000:]
    skipped = re.findall(r"^SKIPPED \[1\] (tests/\S+?):\d+: (.*)$", proc.stdout, re.MULTILINE)
    assert sorted(skipped) == sorted((test.split("::")[0], reason) for test, reason in reasons.items()), skipped
