"""TensorRT (NVIDIA GPU): engines built from the ONNX hub with a dynamic-batch profile, run through cuda-python.

One builder serves both paths: export writes `tensorrt-<precision>.engine` into the bundle, and a server given a
bundle without an engine for its GPU builds an fp32 engine from the bundle's ONNX file at start. Precision is
carried by the ONNX graph and the network is strongly typed, the only mode TensorRT 11 has (it removed
BuilderFlag.FP16/INT8 and the precision-constraint flags; 10.x has the same strongly typed path):
- fp32: the hub itself, with TF32 disabled so fp32 parity holds;
- fp16: `onnx_graph.to_fp16`, LayerNorm/Softmax (and their reductions) kept in fp32, float32 I/O;
- int8: NNCF Q/DQ graph (explicit quantisation) calibrated on real train images, made symmetric (every zero
  point an int8 zero, weights per output channel), the only Q/DQ TensorRT's ONNX parser takes. `source_graph`
  builds these graphs without TensorRT, so the CPU tests check the INT8 one in onnxruntime through the gate.
Only APIs present in both TensorRT 10 and 11 are used (name-based tensors, execute_async_v3).

Engines are specific to one GPU model and TensorRT version: the manifest records both. A server whose GPU or
TensorRT is not the one an engine was built for passes it over (`engine_mismatch`) for an fp32 engine built from the
bundle's ONNX file, with a warning naming why; an engine asked for by its precision (fp16, int8), or in a bundle
without an ONNX file, is refused with one line. Device buffers and the stream come from cuda-python
(`cuda.bindings`), so a GPU server needs no torch. Not runnable on the CPU-only machines this project is developed
on: its tests are marked `tensorrt` and skip without the package.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import Artifact
from models.device import NO_DRIVER, has_driver
from models.extras import pip_command
from models.io import atomic_write_bytes
from runtimes import onnx_graph
from runtimes.base import (
    INPUT_NAME,
    BackendError,
    CallPool,
    LoadSpec,
    PooledBackend,
    Runtime,
    TritonRelease,
    Variant,
)
from runtimes.build import Built, ExportContext, ExportError
from runtimes.tensors import TensorInfo, check_io

OPT_BATCH = 8  # the profile's optimum (clipped to max batch): a typical dynamic-batching server batch
WORKSPACE_BYTES = 4 << 30


def _trt():  # noqa: ANN202 - the tensorrt module
    try:
        import tensorrt
    except ImportError:
        raise BackendError(f"TensorRT is not installed: {RUNTIME.install}") from None
    return tensorrt


def _cudart():  # noqa: ANN202 - cuda-python's runtime module
    """cuda-python's runtime API (its import path moved in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise BackendError(f"cuda-bindings is not installed: {RUNTIME.install}") from None
    return runtime


def _check(result: Any) -> Any:
    """Unpack a cuda-python call's (error, *values) tuple; raise BackendError on failure."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error: {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


def version() -> str:
    """The TensorRT version."""
    return _trt().__version__


def gpu(index: int = 0) -> dict[str, str]:
    """Name and compute capability of CUDA device `index` (what an engine is specific to)."""
    cudart = _cudart()
    props = _check(cudart.cudaGetDeviceProperties(index))
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    return {"gpu": name, "compute_capability": f"{props.major}.{props.minor}"}


def unavailable(device: str) -> str | None:
    """TensorRT needs a visible CUDA device."""
    try:
        cudart = _cudart()
        result = cudart.cudaGetDeviceCount()
        # Without any driver the CUDA runtime says "driver version is insufficient" (error 35), which sends the
        # user to upgrade a driver that is not there.
        if result[0] == cudart.cudaError_t.cudaErrorInsufficientDriver and not has_driver():
            return NO_DRIVER
        count = _check(result)
    except BackendError as exc:
        return str(exc)
    index = int(device.partition(":")[2] or 0)
    return None if index < count else f"no CUDA device {index} ({count} visible)"


def cache_dir() -> Path | None:
    """Where timing caches live ($XDG_CACHE_HOME/vitc, else ~/.cache/vitc); None without a home directory (a
    container user with neither HOME nor a passwd entry), which costs only the cache."""
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "vitc"
    try:
        return Path.home() / ".cache" / "vitc"
    except RuntimeError:  # "Could not determine home directory"
        return None


def timing_cache(device: dict[str, str], trt_version: str) -> Path | None:
    """A timing cache per GPU model and TensorRT version (a cache from another is useless, or refused)."""
    root = cache_dir()
    if root is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device["gpu"]).strip("-").lower() or "gpu"
    return root / f"tensorrt-{trt_version}-sm{device['compute_capability']}-{slug}.cache"


def read_cache(path: Path | None) -> bytes:
    """The saved timing cache, or b"" (none yet, or unreadable): a cache saves build time, nothing more."""
    if path is None:
        return b""
    try:
        return path.read_bytes()
    except OSError:
        return b""


def save_cache(path: Path | None, data: bytes) -> bool:
    """Keep the timing cache for the next build; False where it cannot be written (a read-only or unwritable home:
    an arbitrary container user), which must not fail the build that just succeeded."""
    if path is None:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)  # builds for two models at once share the file
    except OSError:
        return False
    return True


def profile_shapes(max_batch: int, sample_shape: tuple[int, int, int]) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shapes of the optimisation profile."""
    return tuple((b, *sample_shape) for b in (1, min(OPT_BATCH, max_batch), max_batch))


def build_engine(onnx_path: Path, *, input_name: str, sample_shape: tuple[int, int, int], max_batch: int,
                 precision: str, device_index: int = 0) -> bytes:
    """Parse the ONNX file and build a serialized strongly typed engine with a 1..max_batch profile."""
    trt = _trt()
    _check(_cudart().cudaSetDevice(device_index))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # Strongly typed: the flag exists in 10.x and is accepted (and implied) in 11.x.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls keep 10 mantissa bits: not fp32 parity
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *profile_shapes(max_batch, sample_shape))
    config.add_optimization_profile(profile)
    cache_path = timing_cache(gpu(device_index), trt.__version__)
    if not _use_timing_cache(config, read_cache(cache_path)):
        _use_timing_cache(config, b"")  # stale or unreadable: start afresh
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    save_cache(cache_path, bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _use_timing_cache(config: Any, blob: bytes) -> bool:
    """Give the builder config a timing cache made from `blob`; False where TensorRT refuses it."""
    # A blob it cannot deserialise makes create_timing_cache return None (a null ITimingCache), which
    # set_timing_cache would reject with a TypeError: the cache would have failed the build it only speeds up.
    cache = config.create_timing_cache(blob)
    return cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))


def source_graph(ctx: ExportContext, precision: str) -> Path:
    """The ONNX graph the engine is built from (no TensorRT needed: the CPU tests check it in onnxruntime)."""
    hub = ctx.hub_onnx()
    if precision == "fp32":
        return hub
    if precision == "fp16":
        return onnx_graph.to_fp16(hub, ctx.scratch / "trt-fp16.onnx")
    if precision == "int8":  # TensorRT's parser takes only symmetric int8 Q/DQ
        return onnx_graph.quantize_int8(ctx.calibration_batches(), hub, ctx.scratch / "trt-int8.onnx",
                                        symmetric=True)
    raise ExportError(f"tensorrt: unsupported precision {precision!r}")


def build(ctx: ExportContext, precision: str) -> Built:
    """Write tensorrt-<precision>.engine into the bundle (built on, and for, this machine's first GPU)."""
    trt = _trt()
    source = source_graph(ctx, precision)
    shape = (3, ctx.image_size, ctx.image_size)
    engine = ctx.workdir / f"tensorrt-{precision}.engine"
    engine.write_bytes(build_engine(source, input_name=INPUT_NAME, sample_shape=shape,
                                    max_batch=ctx.max_batch, precision=precision))
    device = gpu(0)
    info: dict[str, Any] = {
        "opset": ctx.opset, "typing": "strong", **device, "tensorrt_version": trt.__version__,
        "profile": dict(zip(("min", "opt", "max"), (s[0] for s in profile_shapes(ctx.max_batch, shape)), strict=True)),
    }
    if precision == "fp16":
        info["fp32_ops"] = list(onnx_graph.FP32_OPS)
    if precision == "int8":
        info["calibration"] = ctx.calibration_info()
        info["quantization"] = onnx_graph.QUANTIZATION_SYMMETRIC
    return Built([engine], info)


def _io(trt: Any, engine: Any) -> list[TensorInfo]:
    """The engine's I/O tensors as `check_io` reads them."""
    tensors = []
    for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
        dtype = engine.get_tensor_dtype(name)
        tensors.append(TensorInfo(name, "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output",
                                  "float32" if dtype == trt.float32 else str(dtype),
                                  tuple(int(d) for d in engine.get_tensor_shape(name))))
    return tensors


def _built_elsewhere(artifact: Artifact, device: dict[str, str], trt_version: str) -> str | None:
    """Why an engine cannot run on GPU `device` with TensorRT `trt_version` (the manifest records the GPU, compute
    capability and TensorRT that built it: an engine runs only there); None when it was built for them."""
    built_for = (artifact.info.get("gpu"), artifact.info.get("compute_capability"), artifact.runtime_version)
    here = (device["gpu"], device["compute_capability"], trt_version)
    if built_for == here:
        return None
    return (f"engine {artifact.id!r} was built for {built_for[0]} (sm {built_for[1]}) with TensorRT {built_for[2]}; "
            f"this is {here[0]} (sm {here[1]}) with TensorRT {here[2]}")


def engine_mismatch(artifact: Artifact, device: str) -> str | None:
    """Why this machine's GPU `device` and TensorRT cannot run the artifact's engine (`Runtime.mismatch`: the loader
    then builds an fp32 engine from the bundle's ONNX file instead); None when they can."""
    if artifact.runtime != RUNTIME.name:
        return None
    return _built_elsewhere(artifact, gpu(int(device.partition(":")[2] or 0)), version())


def _engine_bytes(spec: LoadSpec, device: dict[str, str], trt_version: str) -> tuple[bytes, str]:
    """The bundle's engine if it was built for this GPU and TensorRT, else an fp32 engine built from ONNX now."""
    artifact = spec.artifact
    if artifact.runtime == "tensorrt":
        # `loader.select` passes a foreign engine over where it can: this one was asked for, or has no fallback
        if reason := _built_elsewhere(artifact, device, trt_version):
            raise BackendError(f"{reason}: re-export it here with `python -m export.tensorrt`")
        return spec.file(".engine").read_bytes(), artifact.precision
    if artifact.precision != "fp32":
        raise BackendError(f"the bundle has no servable TensorRT engine; build one on this GPU with "
                           f"`python -m export.tensorrt` (only fp32 is built from {artifact.id!r} at start)")
    m = spec.manifest
    return build_engine(spec.file(".onnx"), input_name=m.input_name, sample_shape=m.input.sample_shape,
                        max_batch=spec.max_batch, precision="fp32", device_index=spec.options.device_index), "fp32"


class TensorRTBackend(PooledBackend):
    """One engine + execution context on one GPU; calls are serialised (one context, one stream: a pool of one)."""

    runtime = "tensorrt"
    parallelism = 1

    def __init__(self, spec: LoadSpec) -> None:
        trt = _trt()
        cudart = _cudart()
        self._cudart = cudart
        self._device_index = spec.options.device_index
        self._buffers: list[int] = []
        self._stream = None
        self.context = self.engine = self._runtime = None
        _check(cudart.cudaSetDevice(self._device_index))
        self.device, self.max_batch = spec.device, spec.max_batch
        self._gpu = gpu(self._device_index)
        engine_bytes, self.precision = _engine_bytes(spec, self._gpu, trt.__version__)
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendError("TensorRT cannot deserialize the engine (built for another GPU or TensorRT version?)")
        m = spec.manifest
        # An engine's batch axis is -1 with the sizes of its optimisation profile, checked next.
        check_io(_io(trt, self.engine), m.input_name, m.output_name, m.input.sample_shape, spec.num_classes,
                 self.max_batch)
        low, _, high = self.engine.get_tensor_profile_shape(m.input_name, 0)
        if low[0] > 1 or high[0] < self.max_batch:
            raise BackendError(f"engine profile covers batch {low[0]}..{high[0]}, the manifest 1..{self.max_batch}")
        self._input, self._output = m.input_name, m.output_name
        self.sample_shape, self._classes = m.input.sample_shape, spec.num_classes
        try:  # nothing owns what is allocated here until the constructor returns: free it on the way out
            self.context = self.engine.create_execution_context()
            if self.context is None:  # TensorRT logged why (device memory for its activations, usually)
                raise BackendError("TensorRT cannot create an execution context for the engine (see its log above)")
            # Buffers for the largest batch, allocated once.
            self._d_in = self._malloc(self.max_batch * int(np.prod(self.sample_shape)) * 4)
            self._d_out = self._malloc(self.max_batch * self._classes * 4)
            self._stream = _check(cudart.cudaStreamCreate())
            for name, ptr in ((self._input, self._d_in), (self._output, self._d_out)):
                if not self.context.set_tensor_address(name, ptr):
                    raise BackendError(f"TensorRT refused the device buffer of {name!r}")
        except BaseException:
            self._release()
            raise
        # The device buffers are freed (`_release`) only after the call in flight returns its context.
        self._pool = CallPool("this tensorrt backend", [self.context])

    def _malloc(self, nbytes: int) -> int:
        ptr = int(_check(self._cudart.cudaMalloc(nbytes)))
        self._buffers.append(ptr)
        return ptr

    def _compute(self, context: Any, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32 on the GPU (`infer` checked the batch's dtype and shape)."""
        cudart = self._cudart
        batch = np.ascontiguousarray(batch)  # a copy only for a strided view: the device copy reads flat memory
        n = batch.shape[0]
        out = np.empty((n, self._classes), np.float32)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        # The batcher calls from worker threads: the CUDA device is per thread.
        _check(cudart.cudaSetDevice(self._device_index))
        if not context.set_input_shape(self._input, batch.shape):
            raise BackendError(f"TensorRT refused input shape {batch.shape}")
        _check(cudart.cudaMemcpyAsync(self._d_in, batch.ctypes.data, batch.nbytes, h2d, self._stream))
        if not context.execute_async_v3(int(self._stream)):
            raise BackendError("TensorRT execution failed")
        _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, d2h, self._stream))
        _check(cudart.cudaStreamSynchronize(self._stream))
        return out

    def describe(self) -> dict[str, Any]:
        return {**self._gpu, "inference_precision": self.precision}

    def _release(self) -> None:
        """Destroy the context and the engine, free the device buffers and the stream (`close`: once the call in
        flight, if any, has returned), on the backend's own device."""
        cudart = self._cudart
        # The closing thread may have another device current (cuda:N, N > 0): what is freed belongs to this one.
        # Best effort: a release never raises.
        cudart.cudaSetDevice(self._device_index)
        # Dropped now rather than with the backend object (which a benchmark may keep): the context's activation
        # memory and the engine's weights stay on the GPU until then. Context first, then engine, then runtime.
        self.context = None
        self.engine = None
        self._runtime = None
        for ptr in self._buffers:
            cudart.cudaFree(ptr)
        self._buffers.clear()
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None


# The TensorRT (major.minor.patch) that each Triton release's YY.MM-py3 image ships, from NVIDIA's Frameworks Support
# Matrix (docs.nvidia.com/deeplearning/frameworks/support-matrix) and the Triton release notes. A TensorRT plan
# deserialises only in the TensorRT that built it (version-compatible engines, which vitc does not build, only let a
# newer runtime load an older plan), and Triton exits at start when a model fails to load, taking the other models
# down with it. Other images (the -trtllm-python-py3 one ships another TensorRT) and later releases are not known here.
TRITON_TENSORRT = {
    "24.05": "10.0.1", "24.06": "10.1.0", "24.07": "10.2.0", "24.08": "10.3.0", "24.09": "10.4.0", "24.10": "10.5.0",
    "24.11": "10.6.0", "24.12": "10.7.0", "25.01": "10.8.0", "25.02": "10.8.0", "25.03": "10.9.0", "25.04": "10.9.0",
    "25.05": "10.10.0", "25.06": "10.11.0",
}
_TENSORRT_VERSION = re.compile(r"([0-9]{1,4})\.([0-9]{1,4})\.([0-9]{1,6})(\.[0-9A-Za-z.+-]{1,40})?")


def engine_tensorrt(artifact: Artifact) -> str | None:
    """The TensorRT version that built a TensorRT artifact's engine, as its manifest records it (None: not recorded)."""
    for value in (artifact.info.get("tensorrt_version"), artifact.runtime_version):
        if isinstance(value, str) and _TENSORRT_VERSION.fullmatch(value):
            return value
    return None


def triton_tensorrt(tag: str) -> str | None:
    """The TensorRT (major.minor.patch) that the Triton image `tag` ships; None when not known here."""
    year_month, _, suffix = tag.partition("-")
    return TRITON_TENSORRT.get(year_month) if suffix in ("", "py3") else None


def _same_tensorrt(built: str, ships: str) -> bool:
    """Whether an engine built by TensorRT `built` deserialises in TensorRT `ships` (the same major.minor.patch)."""
    a, b = _TENSORRT_VERSION.fullmatch(built), _TENSORRT_VERSION.fullmatch(ships)
    return a is not None and b is not None and a.groups()[:3] == b.groups()[:3]


def _known_releases() -> list[str]:
    return sorted(TRITON_TENSORRT)  # YY.MM, zero-padded: in release order


def triton_mismatch(artifact: Artifact, tag: str) -> str | None:
    """Why Triton `tag` cannot load this artifact's engine: it ships another TensorRT than the one that built it;
    None when it ships that one, or this cannot tell (`triton_unknown`)."""
    built, ships = engine_tensorrt(artifact), triton_tensorrt(tag)
    if built is None or ships is None or _same_tensorrt(built, ships):
        return None
    return (f"its engine was built with TensorRT {built} and that release ships TensorRT {ships} (an engine loads "
            "only in the TensorRT that built it, and Triton exits when a model fails to load)")


def triton_unknown(artifact: Artifact, tag: str) -> str | None:
    """Why this cannot tell whether Triton `tag` loads this artifact's engine (None: it can tell)."""
    if (built := engine_tensorrt(artifact)) is None:
        return ("its manifest records no TensorRT version, so whether Triton can load its engine is not known here "
                "(an engine loads only in the TensorRT that built it)")
    if triton_tensorrt(tag) is None:
        known = _known_releases()
        return (f"which TensorRT Triton {tag} ships is not known here (known: the -py3 images {known[0]} to "
                f"{known[-1]}); its engine loads only in TensorRT {built}, which built it")
    return None


def triton_advice(artifact: Artifact) -> str:
    """The --triton-version that loads this artifact's engine: the oldest known release whose image ships the
    TensorRT that built it, else what such a release must ship."""
    built = engine_tensorrt(artifact) or "?"
    known = _known_releases()
    match = next((r for r in known if _same_tensorrt(built, TRITON_TENSORRT[r])), None)
    if match is not None:
        return f"--triton-version {match} (its image ships TensorRT {TRITON_TENSORRT[match]})"
    short = ".".join(built.split(".")[:3])
    return (f"--triton-version with a release whose image ships TensorRT {short} (none of {known[0]} to "
            f"{known[-1]} does; NVIDIA's Frameworks Support Matrix lists each release's TensorRT)")


def _same_release(a: str, b: str) -> bool:
    """Whether Triton `a` and `b` load the same engines: their images ship the same (known) TensorRT."""
    ships = triton_tensorrt(b)
    return ships is not None and triton_tensorrt(a) == ships


RUNTIME = Runtime(
    name="tensorrt", target="tensorrt", packages=("tensorrt", "cuda.bindings"),
    install=pip_command(packages=["tensorrt", "cuda-bindings"], where="on a machine with an NVIDIA GPU"),
    format="tensorrt-engine",
    triton_platform="tensorrt_plan", precisions=("fp32", "fp16", "int8"), default_precisions=("fp16",),
    devices=("cuda",), build=build, load=TensorRTBackend, version=version,
    variants=(Variant("fp16", "cuda"), Variant("int8", "cuda")), export_device="cuda", needs_hub=True,
    fallback=("onnxruntime", "fp32"), unavailable=unavailable, mismatch=engine_mismatch,
    triton_backend="tensorrt", triton_files=((".engine", "model.plan"),), triton_platform_fills=True,
    triton_release=TritonRelease(cannot_load=triton_mismatch, cannot_tell=triton_unknown, advice=triton_advice,
                                 same=_same_release,
                                 loaded_by=lambda tag: f"whose engine TensorRT {triton_tensorrt(tag)} built"),
)
