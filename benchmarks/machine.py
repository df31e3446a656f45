"""The machine a benchmark ran on: its matrix-multiply limit, measured in the same run, and its environment.

The limit is what the model runtimes are judged against, so it is measured with the same kernels they use:
OpenVINO's CPU FullyConnected (fp32, bf16 where the CPU has it, u8 x i8 for INT8) and torch's GEMM for fp32,
taking the best library per precision. Throughput counts 2 * M * N * K flops per matmul (one multiply-add = 2
flops), the convention the per-model GFLOP/s also follow. "Sustained" means measured over back-to-back calls
for a few seconds, summarised by the 90th percentile of per-call throughput: near the uncontended speed (which
a shared machine's preemptions pull the median below), yet not one lucky call. The median is kept beside it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.device import cuda_version_text, driver_cuda_version  # noqa: F401 - cuda_version_text: re-exported
from models.host import distribution_versions, source_revision, usable_cpus
from models.tolerance import TOLERANCES

# CPU flags that decide which kernels the runtimes can use (the full list is long and mostly irrelevant).
_FLAGS_OF_INTEREST = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
)
# Distributions reported beside the registered runtimes' own versions.
_LIBRARIES = ("onnxruntime-gpu", "nncf", "numpy", "onnx", "fastapi", "uvicorn")
_ENV_VARS = ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def _timed_throughput(fn: Callable[[], object], flops: float, seconds: float, sync: Callable[[], None]) -> list[float]:
    """GFLOP/s of each back-to-back call of `fn` for `seconds` after a short warm-up."""
    for _ in range(2):
        fn()
    sync()
    rates: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(rates) < 3:
        t0 = time.perf_counter()
        fn()
        sync()
        rates.append(flops / (time.perf_counter() - t0) / 1e9)
    return rates


def _ov_matmul(n: int, precision: str, threads: int) -> tuple[Callable[[], object], str]:
    """An OpenVINO n x n x n matmul with constant weights (the FullyConnected path models take)."""
    from runtimes import openvino as ov_runtime
    from runtimes import telemetry

    telemetry.off()
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    x = ops.parameter([n, n], np.float32, name="a")
    if precision == "int8":
        # FakeQuantize on the input + int8 weights: the CPU plugin runs a u8 x i8 FullyConnected, as NNCF models do.
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        x_q = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w_q = ops.constant(np.clip(np.round(b * 32), -127, 127).astype(np.int8))
        w = ops.multiply(ops.convert(w_q, np.float32), ops.constant(np.float32(1 / 32)))
        out = ops.matmul(x_q, w, False, False)
        config: dict[str, Any] = {}
    else:
        out = ops.matmul(x, ops.constant(b), False, False)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    config.update({"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    compiled = ov_runtime.core().compile_model(ov.Model([out], [x]), "CPU", config)
    request = compiled.create_infer_request()
    effective = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(
        compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(), "?"
    )
    if precision == "int8":
        kinds = {
            op.get_rt_info()["runtimePrecision"].astype(str)
            for op in compiled.get_runtime_model().get_ordered_ops()
            if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"
        }
        effective = "int8" if kinds & {"u8", "i8"} else ",".join(sorted(kinds))
    return (lambda: request.infer({0: a})), effective


def _torch_matmul(n: int, device: str, dtype_name: str) -> tuple[Callable[[], object], Callable[[], None]]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}[dtype_name]
    if dtype_name == "int8":
        a = torch.randint(-128, 127, (n, n), dtype=dtype, device=device)
        b = torch.randint(-128, 127, (n, n), dtype=dtype, device=device)
        fn = lambda: torch._int_mm(a, b)  # noqa: E731  (int8 x int8 -> int32 tensor-core GEMM)
    else:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        fn = lambda: torch.mm(a, b)  # noqa: E731
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    return fn, sync


def _summarise(rates: list[float], **extra: Any) -> dict[str, Any]:
    r = np.asarray(rates)
    return {"gflops": float(np.percentile(r, 90)), "median": float(np.median(r)), "p10": float(np.percentile(r, 10)),
            "calls": len(rates), **extra}


def cpu_matmul_limits(threads: int, seconds: float = 2.0, sizes: tuple[int, ...] = (1024, 2048)) -> dict[str, Any]:
    """Sustained fp32 / bf16 / int8 matmul GFLOP/s (GOP/s for int8) on the CPU with `threads` threads.

    Each precision maps to {"gflops": the best library's p90 per-call throughput, "native": whether the CPU
    runs it natively, "by_library": every measurement}. A precision the CPU lacks (bf16 without AVX512_BF16 or
    AMX: OpenVINO silently computes in fp32) is not timed: it gets gflops None and its results are judged
    against fp32.
    """
    import torch

    torch.set_num_threads(threads)
    per_test = seconds / len(sizes)
    limits: dict[str, Any] = {}
    for precision in ("fp32", "bf16", "int8"):
        try:
            effective = _ov_matmul(64, precision, threads)[1]
        except Exception as exc:  # no OpenVINO: torch still gives the fp32 limit
            effective = f"unavailable ({type(exc).__name__})"
        runs = []
        for n in sizes:
            if effective == precision:
                fn = _ov_matmul(n, precision, threads)[0]
                runs.append(_summarise(_timed_throughput(fn, 2.0 * n**3, per_test, lambda: None),
                                       library="openvino", size=n))
            if precision == "fp32":
                fn, sync = _torch_matmul(n, "cpu", "fp32")
                runs.append(_summarise(_timed_throughput(fn, 2.0 * n**3, per_test, sync), library="torch", size=n))
        best = max(runs, key=lambda r: r["gflops"]) if runs else {}
        limits[precision] = {
            "gflops": best.get("gflops"),
            "native": bool(runs),
            "openvino_runs_it_as": effective,
            "library": best.get("library"),
            "size": best.get("size"),
            "by_library": runs,
        }
    return limits


def cuda_matmul_limits(seconds: float = 2.0, n: int = 8192) -> dict[str, Any]:
    """Sustained GEMM throughput on the first CUDA GPU (torch) in each parity-gated precision, fp32 with tf32 off."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32; TensorRT fp16 is compared to the fp16 limit
    limits: dict[str, Any] = {}
    # models.tolerance's precisions, the ones an artifact may compute in: one added there is measured here too, or
    # recorded with the reason it could not be.
    for precision in TOLERANCES:
        try:
            fn, sync = _torch_matmul(n, "cuda", precision)
            rates = _timed_throughput(fn, 2.0 * n**3, seconds, sync)
            limits[precision] = {"native": True, "library": "torch", "size": n, **_summarise(rates)}
        except Exception as exc:  # e.g. _int_mm unsupported on an old GPU
            limits[precision] = {"gflops": None, "native": False, "error": f"{type(exc).__name__}: {exc}"}
    return limits


def limit_for(limits: dict[str, Any], device: str, precision: str) -> tuple[float | None, str]:
    """The limit (GFLOP/s) a result of `precision` on `device` is judged against, and which limit that is.

    A precision the hardware runs only by emulation or fallback is judged against the fp32 limit.
    """
    table = limits.get(device) or {}
    entry = table.get(precision)
    if entry and entry.get("gflops") and entry.get("native"):
        return entry["gflops"], f"{device} {precision}"
    fp32 = table.get("fp32") or {}
    return fp32.get("gflops"), f"{device} fp32"


def _cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": []}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            info["model"] = m.group(1).strip()
        if m := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            flags = set(m.group(1).split())
            info["flags"] = [f for f in _FLAGS_OF_INTEREST if f in flags]
            info["flag_count"] = len(flags)
        for key, field in (("family", "cpu family"), ("model_number", "model"), ("mhz", "cpu MHz")):
            if m := re.search(rf"^{field}\s*:\s*(.+)$", text, re.M):
                info[key] = m.group(1).strip()
    with contextlib.suppress(Exception):
        from runtimes import openvino as ov_runtime
        from runtimes import telemetry

        telemetry.off()
        core = ov_runtime.core()
        info["openvino_device"] = core.get_property("CPU", "FULL_DEVICE_NAME")
        info["openvino_capabilities"] = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    info["logical_cpus"] = os.cpu_count()
    info["usable_cpus"] = usable_cpus()
    with contextlib.suppress(Exception):
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    return info


def gpu_info() -> list[dict[str, Any]]:
    """CUDA GPUs visible to torch (name, memory, capability, the CUDA version torch was built with and the one the
    driver supports, None where it cannot be read); empty without one."""
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            driver = driver_cuda_version()
            gpus = []
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                gpus.append({"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                             "capability": f"{p.major}.{p.minor}", "torch_cuda": torch.version.cuda,
                             "driver_cuda": driver})
            return gpus
    return []


def _versions() -> dict[str, str]:
    import runtimes

    out = {"python": platform.python_version()}
    for rt in runtimes.runtimes():
        if rt.installed():
            with contextlib.suppress(Exception):  # a broken install is reported by its benchmark cells
                out[rt.name] = rt.version()
    return {**out, **distribution_versions(_LIBRARIES)}


def host_name() -> str:
    """Short host name, safe for file names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname().split(".")[0]) or "host"


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def environment(threads: int | None) -> dict[str, Any]:
    """CPU model and flags, cores, GPU, library versions, git commit, thread settings and load average."""
    return {
        "host": host_name(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_info(),
        "gpus": gpu_info(),
        "threads": threads,
        "versions": _versions(),
        "git": source_revision(),
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
        "load_average": load_average(),
    }


if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
