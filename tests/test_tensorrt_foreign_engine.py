"""An engine built for another GPU or TensorRT is passed over for the documented fp32 build from the bundle's ONNX
file, with a warning naming why (it used to make the load fatal), and a machine without an NVIDIA driver is told
so. Runs on the CPU: "this GPU" (its name, compute capability and TensorRT) is monkeypatched, everything else is the
real selection, the real engine check and, for the load, the real `_engine_bytes` (only TensorRT's own build, which
needs a GPU, is recorded instead)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtimes
from models.bundle import Artifact, file_entries, read_manifest, write_manifest
from models.device import NO_DRIVER
from runtimes import BackendError, BackendOptions, LoadSpec, registry, tensorrt
from runtimes import onnxruntime as ort_runtime

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-bundle-v1"
H200 = {"gpu": "NVIDIA H200", "compute_capability": "9.0"}
H100 = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _engine(bundle: Path, precision: str, built_on: dict[str, str], trt: str) -> Artifact:
    """A TensorRT artifact whose manifest says it was built on `built_on` with TensorRT `trt`."""
    path = bundle / f"tensorrt-{precision}.engine"
    path.write_bytes(f"an engine built on {built_on['gpu']}".encode())
    return Artifact(id=f"tensorrt-{precision}", runtime="tensorrt", format="tensorrt-engine", precision=precision,
                    servable=True, files=file_entries(bundle, [path]), runtime_version=trt,
                    info={**built_on, "tensorrt_version": trt, "typing": "strong"})


def _bundle(tmp_path: Path, *engines: tuple[str, dict[str, str], str], onnx: bool = True) -> Path:
    """The legacy test bundle (onnx-fp32, torch-fp32) plus the given engines (precision, GPU, TensorRT)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(LEGACY, bundle)
    m = read_manifest(bundle)
    kept = m.artifacts if onnx else tuple(a for a in m.artifacts if a.runtime != "onnxruntime")
    write_manifest(bundle, dataclasses.replace(m, artifacts=(*kept, *(_engine(bundle, *e) for e in engines))))
    return bundle


@pytest.fixture
def on_h200(monkeypatch):
    """This machine: an H200 with TensorRT 10.9.0 (what an engine must have been built for to run here)."""
    seen = []

    def gpu(index: int = 0) -> dict[str, str]:
        seen.append(index)
        return dict(H200)

    monkeypatch.setattr(tensorrt, "gpu", gpu)
    monkeypatch.setattr(tensorrt, "version", lambda: "10.9.0")
    return seen


@pytest.fixture
def warnings_logged():
    """The warnings of the runtimes' logger (the server routes `vitc` through its own handler, without
    propagating: caplog's root handler would not see them)."""
    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    logger = logging.getLogger("vitc.runtimes")
    handler, level = Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_an_engine_built_for_another_gpu_is_passed_over_for_the_onnx_fp32_build(tmp_path, on_h200,
                                                                              warnings_logged):
    m = read_manifest(_bundle(tmp_path, ("fp16", H100, "10.9.0")))
    rt = runtimes.get("tensorrt")
    # What the bundle offers (no machine asked about): its engine, as before.
    assert runtimes.select(m, rt).id == "tensorrt-fp16" and not warnings_logged
    chosen = runtimes.select(m, rt, None, "cuda:1")
    assert chosen.id == "onnx-fp32" and on_h200 == [1]  # the GPU asked about is the one it would run on
    (record,) = warnings_logged
    line = record.getMessage()
    assert "'onnx-fp32'" in line and "'tensorrt-fp16'" in line
    assert "built for NVIDIA H100 80GB HBM3 (sm 9.0) with TensorRT 10.9.0; this is NVIDIA H200 (sm 9.0)" in line
    assert (record.passed_over, record.opened) == (["tensorrt-fp16"], "onnx-fp32")
    # fp32 asked for: the fallback's precision, so the same.
    assert runtimes.select(m, rt, "fp32", "cuda").id == "onnx-fp32"


def test_an_engine_of_another_tensorrt_is_passed_over_too(tmp_path, on_h200, warnings_logged):
    m = read_manifest(_bundle(tmp_path, ("fp16", H200, "10.8.0")))
    assert runtimes.select(m, runtimes.get("tensorrt"), None, "cuda").id == "onnx-fp32"
    assert "with TensorRT 10.8.0; this is NVIDIA H200 (sm 9.0) with TensorRT 10.9.0" in warnings_logged[0].getMessage()


def test_an_engine_built_here_is_chosen_first_and_no_warning_is_said(tmp_path, on_h200, warnings_logged):
    m = read_manifest(_bundle(tmp_path / "2", ("fp16", H200, "10.9.0")))
    assert runtimes.select(m, runtimes.get("tensorrt"), None, "cuda").id == "tensorrt-fp16"
    assert not warnings_logged


def test_another_precision_that_runs_here_is_opened_with_a_warning(tmp_path, on_h200, warnings_logged):
    """The fp16 engine cannot run here and the int8 one can: int8 opens, and the log says so (a silent switch of
    precision would change the answers without a word)."""
    m = read_manifest(_bundle(tmp_path, ("fp16", H100, "10.9.0"), ("int8", H200, "10.9.0")))
    assert runtimes.select(m, runtimes.get("tensorrt"), None, "cuda").id == "tensorrt-int8"
    (record,) = warnings_logged
    assert "opens 'tensorrt-int8' instead of the bundle's 'tensorrt-fp16'" in record.getMessage()
    assert (record.passed_over, record.opened) == (["tensorrt-fp16"], "tensorrt-int8")


@pytest.mark.parametrize("onnx, precision", [(True, "fp16"), (False, None)])
def test_a_foreign_engine_asked_for_or_without_onnx_is_refused_with_the_reason(tmp_path, on_h200, warnings_logged,
                                                                                onnx, precision):
    bundle = _bundle(tmp_path, ("fp16", H100, "10.9.0"), onnx=onnx)
    m = read_manifest(bundle)
    chosen = runtimes.select(m, runtimes.get("tensorrt"), precision, "cuda")
    assert chosen.id == "tensorrt-fp16" and not warnings_logged
    spec = LoadSpec(m, chosen, (bundle / "tensorrt-fp16.engine",), BackendOptions(device="cuda"))
    with pytest.raises(BackendError, match=r"was built for NVIDIA H100 .* re-export it here with `python -m "
                                           r"export\.tensorrt`"):
        tensorrt._engine_bytes(spec, tensorrt.gpu(0), tensorrt.version())


def test_the_server_path_builds_fp32_from_onnx_where_the_engine_is_foreign(tmp_path, monkeypatch, on_h200,
                                                                           warnings_logged):
    """Through `runtimes.open_backend`, as the server loads: TensorRT's installed-and-device checks pass as on a GPU
    machine, its build from ONNX is recorded, and the "engine" it built runs as onnxruntime on the CPU."""
    bundle = _bundle(tmp_path, ("fp16", H100, "10.9.0"))
    built = []

    def build_engine(onnx_path: Path, **kw) -> bytes:  # noqa: ANN003 - build_engine's keywords
        built.append((onnx_path.name, kw["precision"], kw["device_index"], kw["max_batch"]))
        return b"fp32 engine"

    def load(spec: LoadSpec):  # noqa: ANN202 - a Backend
        engine, precision = tensorrt._engine_bytes(spec, tensorrt.gpu(spec.options.device_index), tensorrt.version())
        assert (engine, precision) == (b"fp32 engine", "fp32")
        return ort_runtime.RUNTIME.load(dataclasses.replace(spec, options=BackendOptions(threads=1)))

    monkeypatch.setattr(tensorrt, "build_engine", build_engine)
    monkeypatch.setitem(registry._RUNTIMES, "tensorrt", dataclasses.replace(
        tensorrt.RUNTIME, packages=(), unavailable=lambda _device: None, load=load))
    m = read_manifest(bundle)
    backend = runtimes.open_backend(bundle, m, "tensorrt", options=BackendOptions(device="cuda"))
    try:
        assert built == [("model.onnx", "fp32", 0, m.input.max_batch)]
        y = backend.infer(np.zeros((2, *m.input.sample_shape), np.float32))
        assert y.shape == (2, m.output.classes)
    finally:
        backend.close()
    assert "'tensorrt-fp16'" in warnings_logged[0].getMessage()


# --- no NVIDIA driver at all --------------------------------------------------------------------------------------


def test_a_machine_without_a_driver_is_told_so_not_to_upgrade_it(monkeypatch):
    """cuda-bindings answers error 35 ("driver version is insufficient") when libcuda.so.1 is missing altogether."""
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed")
    insufficient = (cudart.cudaError_t.cudaErrorInsufficientDriver, None)
    monkeypatch.setattr(cudart, "cudaGetDeviceCount", lambda: insufficient)
    monkeypatch.setattr(tensorrt, "has_driver", lambda: False)
    assert tensorrt.unavailable("cuda") == NO_DRIVER == "no NVIDIA driver (libcuda.so.1 not found)"
    # A driver that is there but too old: CUDA's own words stand.
    monkeypatch.setattr(tensorrt, "has_driver", lambda: True)
    assert tensorrt.unavailable("cuda") == "CUDA error: CUDA driver version is insufficient for CUDA runtime version"


def test_the_driver_probe_is_the_benchmarks_one():
    from benchmarks import machine
    from models import device

    assert machine.driver_cuda_version is device.driver_cuda_version
    assert not device.has_driver(("libvitc-no-such-driver.so.1",)) and device.has_driver(("libc.so.6",))
    if not device.has_driver():  # this machine (no GPU): the real answer, unpatched
        reason = tensorrt.unavailable("cuda")
        assert reason in (NO_DRIVER, f"cuda-bindings is not installed: {tensorrt.RUNTIME.install}")
