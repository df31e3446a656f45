"""onnxruntime: ONNX artifacts (fp32 hub, fp16, INT8 Q/DQ) and one InferenceSession per backend (CPU or CUDA).

`python -m export.onnx --checkpoint runs/x --out exports/x` builds them; `--backend onnxruntime` serves them.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from models.bundle import Artifact
from models.extras import pip_command
from models.host import usable_cpus
from models.onnx_wire import onnx_ir_version
from runtimes import onnx_graph
from runtimes.base import BackendError, CallPool, LoadSpec, PooledBackend, Runtime, Variant, default_streams
from runtimes.build import Built, ExportContext, ExportError
from runtimes.tensors import DYNAMIC, TensorInfo, check_io


def version() -> str:
    """The onnxruntime version."""
    import onnxruntime

    return onnxruntime.__version__


def build(ctx: ExportContext, precision: str) -> Built:
    """Write model.onnx (fp32), model-fp16.onnx or model-int8.onnx into the bundle."""
    hub = ctx.hub_onnx()
    info: dict[str, Any] = {"opset": ctx.opset, "exporter": "torch.onnx dynamo, onnxscript-optimised"}
    if precision == "fp16":
        info["fp32_ops"] = list(onnx_graph.FP32_OPS)
    elif precision == "int8":
        # Not the graph TensorRT builds its INT8 engine from (its parser refuses asymmetric Q/DQ): onnxruntime's
        # x86 kernels are fastest on uint8 activations with a zero point, so this one keeps them.
        info["calibration"] = ctx.calibration_info()
        info["quantization"] = onnx_graph.QUANTIZATION_MIXED
    elif precision != "fp32":
        raise ExportError(f"onnx: unsupported precision {precision!r}")
    description = ctx.artifact_description(RUNTIME.target, precision, info)
    if precision == "fp32":
        out = onnx_graph.copy_hub(hub, ctx.workdir / "model.onnx", description)
    elif precision == "fp16":
        out = onnx_graph.to_fp16(hub, ctx.workdir / "model-fp16.onnx", description)
    else:
        out = onnx_graph.quantize_int8(ctx.calibration_batches(), hub, ctx.workdir / "model-int8.onnx",
                                       description=description)
    return Built(onnx_graph.files_of(out), info)


def unavailable(device: str) -> str | None:
    """CUDA needs the onnxruntime-gpu wheel (same module name as the CPU one)."""
    if not device.startswith("cuda"):
        return None
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
    return None


def execution_providers(device_kind: str, device_index: int = 0) -> list[Any]:
    """The `providers` of an InferenceSession on "cpu" or "cuda" (device `device_index`)."""
    if device_kind != "cuda":
        return ["CPUExecutionProvider"]
    # The CUDA provider runs float32 GEMMs and convolutions in TF32 unless told not to (use_tf32 defaults to on):
    # 10 mantissa bits, ~1e-3 relative error in the logits, far outside the fp32 bound of the golden check, so an
    # fp32 load on CUDA was refused. Off for every precision: an fp16 graph has no fp32 GEMM or convolution left
    # for it to touch (only onnx_graph.FP32_OPS stay fp32), and what an int8 graph dequantizes to fp32 was gated
    # in true fp32 on the CPU. onnxruntime turns option values into strings: the provider reads "0".
    return [("CUDAExecutionProvider", {"device_id": device_index, "use_tf32": 0}), "CPUExecutionProvider"]


class OnnxRuntimeBackend(PooledBackend):
    """An ONNX artifact in onnxruntime sessions; `--device cuda` must really run on the CUDA provider."""

    # On the CPU, the throughput hint (the default) splits the cores into streams (`parallel` batches in flight,
    # each on `threads` cores; see `default_streams`), like OpenVINO's: one-thread streams share one session
    # (onnxruntime runs concurrent calls on their callers' threads) and never wait on each other's parallel
    # sections, which a core taken by image decoding stalls in a many-thread run (+7-18 % served throughput at
    # concurrency 16 on 2 cores, side by side with one stream, 2026-12-04).
    # The latency hint, or `parallel=1`, runs every batch on all threads.

    runtime = "onnxruntime"

    def __init__(self, spec: LoadSpec) -> None:
        import onnxruntime as ort

        options = spec.options
        if options.inference_precision not in (None, spec.precision):
            raise BackendError(f"onnxruntime runs an artifact at its own precision ({spec.precision}), "
                               f"not {options.inference_precision}")
        self.device, self.precision, self.max_batch = options.device, spec.precision, spec.max_batch
        self.sample_shape = spec.manifest.input.sample_shape
        cpus = usable_cpus()
        on_cpu = options.device_kind == "cpu"
        # One stream on CUDA (the device queues the calls anyway) and under the latency hint.
        streams = options.parallel or (default_streams(cpus, options.threads) if options.hint == "throughput" else 1)
        self.parallelism = max(1, min(streams, cpus)) if on_cpu else 1
        threads = options.threads or max(1, cpus // self.parallelism)
        if options.device_kind == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels (the GPU image has no toolkit)
        providers = execution_providers(options.device_kind, options.device_index)
        path = spec.file(".onnx")
        model = session_source(path)
        # Batches run with idle workers asleep: spinning ones would steal the cores the HTTP loop and image
        # decoding need (measured on 2 cores: -15 % served throughput at saturation, 2026-12-04-2037-vm-overhead).
        batch_options = _options(ort, threads, spinning=False)
        # Streams of one thread share a session (and its weights); wider ones each get their own thread pool, while
        # the copies of the weights stay within a bound (beyond it they share one session and its pool).
        shared = (threads == 1 or self.parallelism == 1
                  or path.stat().st_size * self.parallelism > STREAM_SESSIONS_MAX_BYTES)
        first = ort.InferenceSession(model, batch_options, providers=providers)
        # One session per stream (the same one when shared); a call finding none free waits, or is refused once
        # the backend is closed.
        self._pool = CallPool("this onnxruntime backend", [
            first if shared or k == 0 else ort.InferenceSession(model, batch_options, providers=providers)
            for k in range(self.parallelism)])
        self.session = first
        # A lone call (nothing else running: the server is otherwise idle) runs in a second session on every core
        # whose workers spin within a run and stop when it returns: ~3 ms less per 1GF image on 2 cores, the latency
        # a hand-written server with onnxruntime's defaults gets. With one stream only lone images take it (batches
        # keep sleeping workers, see above); with several, any lone batch does (a stream has only part of the cores).
        # It holds its own packed weights, so only for models of modest size.
        self._latency = None
        latency_threads = options.threads or cpus
        if on_cpu and latency_threads > 1 and path.stat().st_size <= LATENCY_SESSION_MAX_BYTES:
            self._latency = ort.InferenceSession(model, _options(ort, latency_threads, spinning=True),
                                                 providers=providers)
        self._running = 0  # calls in progress: a lone call may use every core only while nothing else runs
        self._lock = threading.Lock()
        # onnxruntime-gpu lists CUDA as available even without a GPU and silently falls back to CPU.
        if options.device_kind == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendError(
                f"--device {options.device}: onnxruntime is not running on CUDA (active providers: "
                f"{', '.join(self.session.get_providers())}); install onnxruntime-gpu and check the driver"
            )
        m = spec.manifest
        # A static batch passed the one-image warm-up and failed every larger batch; an extra input failed every call.
        check_io(session_io(self.session), m.input_name, m.output_name, m.input.sample_shape, spec.num_classes,
                 self.max_batch, path.name)
        self._input, self._outputs = m.input_name, [m.output_name]
        self._threads = threads
        self._providers = self.session.get_providers()

    def _call(self, batch: np.ndarray) -> np.ndarray:
        """A lone call in the latency session, any other on a free stream's session."""
        with self._lock:
            self._running += 1
            lone = self._running == 1
        try:
            latency = self._latency
            if lone and latency is not None and (len(batch) == 1 or self.parallelism > 1):
                self._pool.refuse_if_closed()  # it takes no stream: the pool's word is checked here
                return latency.run(self._outputs, {self._input: batch})[0]
            return super()._call(batch)
        finally:
            with self._lock:
                self._running -= 1

    def _compute(self, session: Any, batch: np.ndarray) -> np.ndarray:
        return session.run(self._outputs, {self._input: batch})[0]

    def describe(self) -> dict[str, Any]:
        return {"threads_effective": self._threads, "parallelism": self.parallelism,
                "providers": self._providers, "latency_session": self._latency is not None}

    def _release(self) -> None:
        """Drop the sessions (onnxruntime frees them with the objects) once no call runs in them."""
        self.session = self._latency = None


def session_io(session: Any) -> list[TensorInfo]:
    """A session's inputs and outputs as `check_io` reads them (a symbolic or unknown axis is dynamic)."""
    def info(arg: Any, mode: str) -> TensorInfo:
        dtype = "float32" if arg.type == "tensor(float)" else arg.type
        shape = None if arg.shape is None else tuple(d if isinstance(d, int) else DYNAMIC for d in arg.shape)
        return TensorInfo(arg.name, mode, dtype, shape)

    return [*(info(a, "input") for a in session.get_inputs()), *(info(a, "output") for a in session.get_outputs())]


def session_source(path: Path) -> str | bytes:
    """What InferenceSession opens: the path, or the file's bytes where the path is not UTF-8 (onnxruntime's
    binding cannot take it: 'incompatible constructor arguments'); BackendError where weights in an external-data
    file, found by name beside the path, rule the bytes out."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes come back from the file system as lone surrogates
        pass
    else:
        return str(path)
    if len(onnx_graph.files_of(path)) > 1:
        shown = bytes(path).decode("utf-8", "backslashreplace")
        raise BackendError(f"{shown}: the path is not valid UTF-8, which onnxruntime cannot open with its external "
                           "data; give a UTF-8 path")
    return path.read_bytes()


LATENCY_SESSION_MAX_BYTES = 256 << 20  # ONNX files up to this size get the spinning session for lone calls too
STREAM_SESSIONS_MAX_BYTES = 1 << 30  # ONNX bytes times streams up to which each stream gets its own session
def _options(ort: Any, threads: int, spinning: bool) -> Any:
    """Session options: `threads` intra-op threads, sequential, every graph optimisation; workers spin within a
    run (stopping when it returns) or sleep between its parallel sections."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


TRITON_FILE = "model.onnx"  # the name Triton's onnxruntime backend opens in a version directory
# What the oldest Triton export.triton supports (24.05: onnxruntime 1.18) reads: ONNX IR <= 10, opset <= 21; a newer
# artifact needs a newer release, named with --triton-version.
TRITON_MIN_IR = 10
TRITON_MIN_OPSET = 21


def triton_min_check(version_dir: Path, artifact: Artifact) -> str | None:
    """Why the oldest supported Triton's onnxruntime cannot load the ONNX file staged in `version_dir` (None: it
    can, as far as the file and the manifest tell)."""
    ir, opset = onnx_ir_version(version_dir / TRITON_FILE), artifact.info.get("opset")
    if ir is not None and ir > TRITON_MIN_IR:
        return f"its ONNX file is IR version {ir} (onnxruntime 1.18 reads {TRITON_MIN_IR} at most)"
    if isinstance(opset, int) and opset > TRITON_MIN_OPSET:
        return f"its ONNX file uses opset {opset} (onnxruntime 1.18 implements {TRITON_MIN_OPSET})"
    return None


RUNTIME = Runtime(
    name="onnxruntime", target="onnx", packages=("onnxruntime",),
    install=f"{pip_command(packages=['onnxruntime'])} (CPU), or 'onnxruntime-gpu[cuda,cudnn]' on an NVIDIA GPU "
            "(never both)", export_extra="export",
    format="onnx", triton_platform="onnxruntime_onnx", precisions=("fp32", "fp16", "int8"),
    default_precisions=("fp32",), devices=("cpu", "cuda"), build=build, load=OnnxRuntimeBackend, version=version,
    variants=(Variant("fp32"), Variant("fp32", "cuda")), needs_hub=True, unavailable=unavailable,
    triton_backend="onnxruntime", triton_files=((".onnx", TRITON_FILE),), triton_threads="intra_op_thread_count",
    triton_platform_fills=True, triton_min_check=triton_min_check,
    tunes=("threads", "parallel", "openvino_hint"),
)
