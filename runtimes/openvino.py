"""OpenVINO: IR artifacts (fp32, fp16-compressed weights, INT8 by NNCF post-training quantisation) on the CPU.

Converted from the ONNX hub (dynamic batch kept). OpenVINO's CPU plugin runs bf16 by default on CPUs with
AMX/AVX-512-BF16, which alone moves logits by ~1e-2: every artifact is compiled with INFERENCE_PRECISION_HINT=f32
unless asked otherwise, and the manifest records that hint as the artifact's `inference_precision`.

The backend keeps a pool of infer requests: the THROUGHPUT hint splits the CPU into streams that only pay off
with several requests in flight, so the dynamic batcher runs `parallelism` batches at once, each on its own request.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.bundle import MANIFEST_FILE, Artifact
from models.extras import pip_command
from models.failures import memory_failure
from models.host import quota_cpus, usable_cpus
from models.oneline import first_line
from runtimes.base import (
    INPUT_NAME,
    OUTPUT_NAME,
    BackendError,
    CallPool,
    LoadSpec,
    PooledBackend,
    Runtime,
    Variant,
)
from runtimes.build import Built, ExportContext, ExportError, import_nncf, quiet, write_failure
from runtimes.tensors import DYNAMIC, TensorInfo, check_io

if TYPE_CHECKING:
    from openvino import CompiledModel, Core

INFERENCE_PRECISION = "f32"  # the hint every artifact is built, gated and served with (see the docstring)
# The INT8 scheme `build` writes, as the manifest records it (an artifact's info "quantization"): NNCF's default preset
# for the TRANSFORMER model type is the mixed one.
QUANTIZATION = "nncf mixed preset: asymmetric activations per tensor, symmetric int8 weights per output channel"
_HINT_NAMES = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16"}
# OpenVINO nests its messages: each level says where in its sources it was raised, then its words, the outermost
# level first. The cause comes last: "Resource temporarily unavailable" under a thread (pids, ulimit -u) or memory
# limit, after 'Failed to create plugin ... for device CPU' and its advice.
_SOURCE_LOCATION = re.compile(r"(Exception from \S+:\d+:?|Check '.*' failed at \S+:\d+:?)")
_NOT_A_REASON = ("Please, check your environment",)  # the plugin loader's advice, between the outer words and cause
# The XML reader's std::stoll (and kin) failing on an attribute says only its own name ("Converting input model:
# stoll"): a Const's offset or size beyond int64, or not a number.
_BARE_CONVERSION = re.compile(r"sto(i|l|ll|ul|ull|f|d|ld)")
MAX_REASON = 500  # characters of OpenVINO's words kept on the one line (a shape mismatch can list pages)


def reason(exc: BaseException) -> str:
    """OpenVINO's message on one line: its words at every level, outermost first, without the source locations
    (`first_line` keeps the outermost words alone, so the cause was lost: a thread that could not start read as
    'out of memory'). Its type's name when it has none."""
    words: list[str] = []
    for line in str(exc).splitlines():
        line = line.strip()
        if line and not _SOURCE_LOCATION.fullmatch(line) and line not in _NOT_A_REASON:
            line = line.rstrip(":").rstrip()
            if line and (not words or words[-1] != line):
                words.append(line)
    said = ": ".join(words) or first_line(exc)
    if len(said) > MAX_REASON:  # keep the cause (the last words) with the outermost
        said = f"{said[:MAX_REASON // 2]} ... {said[-MAX_REASON // 2:]}"
    return said


def version() -> str:
    """The OpenVINO version, without its build suffix."""
    import openvino

    return openvino.__version__.split("-")[0]


def build(ctx: ExportContext, precision: str) -> Built:
    """Write openvino-<precision>.xml/.bin into the bundle."""
    import openvino as ov

    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"openvino: unsupported precision {precision!r}")
    xml = ctx.workdir / f"openvino-{precision}.xml"
    model = ov.convert_model(str(ctx.hub_onnx()))
    info: dict[str, Any] = {"opset": ctx.opset, "inference_precision": INFERENCE_PRECISION}
    if precision == "int8":
        nncf = import_nncf()
        images = list(ctx.calibration_batches())
        with quiet():
            # TRANSFORMER keeps LayerNorm, Softmax and GELU inputs unquantised (the accuracy-sensitive ops).
            model = nncf.quantize(model, nncf.Dataset(images), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(images))
        info["calibration"] = ctx.calibration_info()
        info["quantization"] = QUANTIZATION
    # What the IR is, for a user handed the files alone: the keys an ONNX artifact carries in its metadata_props.
    for key, value in ctx.artifact_description(RUNTIME.target, precision, info).items():
        model.set_rt_info(value, ["vitc", key])
    files = [xml, xml.with_suffix(".bin")]
    try:
        # save_model compresses weights to fp16 unless told otherwise: only the fp16 artifact wants that.
        ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")
    except RuntimeError as exc:
        # A failed write is a C++ "basic_ios::clear: iostream error", without its errno: the disk says whether it
        # was full (or the file-size limit hit), which stops the export (exit 1) instead of refusing the artifact.
        if failure := write_failure(ctx.workdir, _bin_bytes(model, precision), files[::-1]):
            raise failure from exc
        raise
    config = ctx.meta.config
    _check_ir(xml, (config.in_chans, ctx.image_size, ctx.image_size), config.num_classes, ctx.max_batch)
    return Built(files, info)


def _bin_bytes(model: Any, precision: str) -> int:
    """About the size of the IR's .bin: the model's constants, float32 ones halved when saved as fp16 (INT8 weights
    count as float32: an upper bound)."""
    import openvino as ov

    total = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Constant":
            n = op.get_byte_size()
            total += n // 2 if precision == "fp16" and op.get_element_type() == ov.Type.f32 else n
    return total


def _check_ir(xml: Path, sample_shape: tuple[int, int, int], classes: int, max_batch: int) -> None:
    """ExportError unless the IR reads back with the I/O every load checks (`check_io`): input "input" (dynamic
    batch, *sample_shape) and output "logits" (batch, classes)."""
    try:
        check_io(ir_io(read_ir(xml, xml.with_suffix(".bin")), INPUT_NAME, OUTPUT_NAME), INPUT_NAME, OUTPUT_NAME,
                 sample_shape, classes, max_batch, xml.name)
    except BackendError as exc:
        raise ExportError(str(exc)) from None


def read_ir(xml: Path, weights: Path) -> Any:
    """The IR as an ov.Model; BackendError naming the file (with OpenVINO's words) where it cannot be read."""
    try:
        return core().read_model(str(xml), str(weights))
    except RuntimeError as exc:
        if memory_failure(exc) is not None:  # the machine, not the IR: the loader says so (a start exits 1)
            raise
        said = reason(exc)
        if _BARE_CONVERSION.fullmatch(said.rpartition(": ")[2]):
            said += " (a number in the XML is out of range or not a number: a weights offset or size, most likely)"
        raise BackendError(f"{xml.name}: OpenVINO cannot read the IR: {said}") from None


def ir_io(model: Any, input_name: str, output_name: str) -> list[TensorInfo]:
    """The IR's inputs and outputs as `check_io` reads them (a port by the manifest's name where it carries it: a
    port can have several)."""
    return [*(_port_info(p, "input", input_name) for p in model.inputs),
            *(_port_info(p, "output", output_name) for p in model.outputs)]


def _port_info(port: Any, mode: str, wanted: str) -> TensorInfo:
    """One port of an ov.Model as a TensorInfo."""
    import openvino as ov

    names = port.get_names()
    name = wanted if wanted in names else (sorted(names)[0] if names else "")
    element = port.get_element_type()
    dtype = "float32" if element == ov.Type.f32 else element.get_type_name()
    partial = port.get_partial_shape()
    if partial.rank.is_dynamic:
        return TensorInfo(name, mode, dtype, None)
    shape = tuple(d.get_length() if d.is_static else DYNAMIC for d in partial)
    if not shape or partial[0].is_static:
        return TensorInfo(name, mode, dtype, shape)
    high = partial[0].get_max_length()  # -1: no bound
    return TensorInfo(name, mode, dtype, shape, (partial[0].get_min_length(), None if high < 0 else high))


def inference_precision(spec: LoadSpec) -> str:
    """The INFERENCE_PRECISION_HINT to compile with: asked for, else what export gated the artifact at (a recorded
    value OpenVINO would not take is refused naming its manifest field, not passed on as a failed compile)."""
    accepted = ", ".join(sorted(_HINT_NAMES))
    asked = spec.options.inference_precision
    if asked is not None:
        if asked not in _HINT_NAMES:
            raise BackendError(f"OpenVINO inference precision must be one of {accepted}, got {asked!r}")
        return _HINT_NAMES[asked]
    artifact = spec.artifact
    for key, recorded in (("inference_precision", artifact.info.get("inference_precision")),
                          ("parity.inference_precision", artifact.parity and artifact.parity.inference_precision)):
        if recorded:
            if recorded not in _HINT_NAMES:
                raise BackendError(f"{MANIFEST_FILE}: {_field(spec, key)!r} must be one of {accepted}, "
                                   f"got {recorded!r:.40}")
            return _HINT_NAMES[recorded]
    return INFERENCE_PRECISION


def _field(spec: LoadSpec, key: str) -> str:
    """The manifest path of the artifact's field `key` (by its id where the manifest does not list it yet)."""
    index = next((i for i, a in enumerate(spec.manifest.artifacts) if a.id == spec.artifact.id), None)
    return f"artifacts[{index}].{key}" if index is not None else f"{key} of artifact {spec.artifact.id}"


@functools.cache
def core() -> Core:
    """The process's one OpenVINO Core, for every OpenVINO use in the process (benchmarks included)."""
    # Each Core's CPU plugin installs its own alternate signal stack on the thread that creates it and puts back the
    # one it found when it is released; Cores released out of creation order leave the thread on freed memory, so
    # the next signal (Ctrl-C, SIGTERM) corrupts the heap or kills the process (SIGSEGV), as do compiled models of
    # separate Cores released at exit. One Core also shares its plugin and thread pools.
    import openvino as ov

    shared = ov.Core()
    # Weights are read into memory, not mapped: a mapped .bin that is changed in place after its sha256 was checked
    # (cp or rsync --inplace over a served bundle) silently changes the answers, and truncated kills the process
    # (SIGBUS) with every model in it.
    shared.set_property({"ENABLE_MMAP": False})
    return shared


def _compile(spec: LoadSpec, extra: dict[str, Any] | None = None) -> CompiledModel:
    """Read the IR, check its inputs and outputs against the manifest, and compile it with the spec's options."""
    xml, m = spec.file(".xml"), spec.manifest
    # The weights are the listed, verified .bin, never the file OpenVINO would find beside the .xml by its name.
    model = read_ir(xml, spec.file(".bin"))
    check_io(ir_io(model, m.input_name, m.output_name), m.input_name, m.output_name, m.input.sample_shape,
             spec.num_classes, spec.max_batch, xml.name)
    options, extra = spec.options, extra or {}
    hint = str(extra.get("PERFORMANCE_HINT", options.hint)).lower()  # a profile's own hint sizes its layout
    config: dict[str, Any] = {"PERFORMANCE_HINT": hint.upper(), "INFERENCE_PRECISION_HINT": inference_precision(spec),
                              **layout(hint, options.threads, options.parallel)}
    return core().compile_model(model, "CPU", {**config, **extra})


def layout(hint: str, threads: int | None, parallel: int | None) -> dict[str, int]:
    """NUM_STREAMS and INFERENCE_NUM_THREADS for `--threads` per inference and `--parallel` streams, as onnxruntime
    takes them; what is not asked for is left to OpenVINO's hint (within a CPU quota, which it is told)."""
    # INFERENCE_NUM_THREADS caps the whole compiled model, not one stream: given `threads` alone, it shrank to one
    # stream on that many threads while vitc ran `parallel` batches at once. OpenVINO caps both at the cores.
    if hint != "throughput":
        streams: int | None = 1  # the latency hint runs one batch at a time (an explicit NUM_STREAMS would win)
    else:
        streams = parallel or (max(1, usable_cpus() // threads) if threads else None)
    per_stream = threads or (max(1, usable_cpus() // streams) if streams else None)
    total = per_stream * streams if per_stream and streams else quota_cpus()
    return {**({"NUM_STREAMS": streams} if streams else {}), **({"INFERENCE_NUM_THREADS": total} if total else {})}


class OpenVINOBackend(PooledBackend):
    """An OpenVINO IR on the CPU; `infer` is thread-safe up to `parallelism` concurrent calls without waiting."""

    runtime = "openvino"

    def __init__(self, spec: LoadSpec) -> None:
        self.device, self.precision, self.max_batch = spec.device, spec.precision, spec.max_batch
        self.sample_shape = spec.manifest.input.sample_shape
        # Bound by name (`_compile` checked the IR has these two ports and no others).
        self._input, self._output = spec.manifest.input_name, spec.manifest.output_name
        try:
            self.compiled = _compile(spec)
            # The streams OpenVINO compiled (it caps them at the cores), not those asked for: more requests than
            # streams queue on them while vitc would count them as batches running at once.
            self.parallelism = max(1, int(self.compiled.get_property("NUM_STREAMS")))
            # One infer request per concurrent call; a call finding none free waits (or is refused once closed).
            self._pool = CallPool("this openvino backend",
                                  (self.compiled.create_infer_request() for _ in range(self.parallelism)))
        except RuntimeError as exc:
            if isinstance(exc, BackendError):
                raise
            # Its words on one line, the cause included, as onnxruntime's are: what reads the first line of the
            # error (the loader, and the server's "out of memory or threads" from it) sees the cause.
            raise RuntimeError(reason(exc)) from exc

    def _compute(self, request: Any, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32 on the infer request this call took from the pool."""
        # share_inputs: a contiguous float32 batch (the batcher's) is read in place; checked to be float32, so
        # OpenVINO never converts it silently.
        request.infer({self._input: batch}, share_inputs=True, share_outputs=True)
        return request.get_tensor(self._output).data.copy()

    def _renewed(self, request: Any) -> Any:
        """A fresh infer request for one whose call failed: after a bad_alloc it failed every later call ("Broken
        promise") while the model reported ready. Where none can be made (memory still short), the old one."""
        try:
            return self.compiled.create_infer_request()
        except Exception:  # noqa: BLE001 - the next call on the old one says what is wrong
            return request

    def describe(self) -> dict[str, Any]:
        self._pool.refuse_if_closed()
        total = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        streams = int(self.compiled.get_property("NUM_STREAMS"))
        # threads_effective is one inference's, as onnxruntime's: the compiled model's threads over its streams.
        return {"threads_effective": max(1, total // max(1, streams)),
                "inference_precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                "parallelism": self.parallelism, "num_streams": streams, "inference_num_threads": total,
                "performance_hint": str(self.compiled.get_property("PERFORMANCE_HINT"))}

    def _release(self) -> None:
        """Drop the compiled model (its requests are gone with the pool) once no call runs on it."""
        self.compiled = None


# Original op types a fused Snippets "Subgraph" node is named after: its time is their matmuls' (attention's
# q.k^T and attn.v), which the analytic flops count, not elementwise work.
_FUSED_MATMULS = ("ScaledDotProductAttention", "MatMul", "Convolution")


def _node_labels(spec: LoadSpec, compiled: Any) -> dict[str, str]:
    """Runtime node name -> its profile label: the node type, or for a Subgraph that fuses a matmul-class op,
    "<that op> (Subgraph)"."""
    source = read_ir(spec.file(".xml"), spec.file(".bin"))
    kinds = {op.get_friendly_name(): op.get_type_name() for op in source.get_ordered_ops()}
    labels: dict[str, str] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind == "Subgraph" and "originalLayersNames" in info:
            fused = {kinds.get(name) for name in info["originalLayersNames"].astype(str).split(",")}
            kind = next((f"{k} (Subgraph)" for k in _FUSED_MATMULS if k in fused), kind)
        labels[op.get_friendly_name()] = kind
    return labels


def profile_ops(spec: LoadSpec, batch: int, reps: int = 5) -> dict[str, float]:
    """Per-op-type milliseconds (median over `reps` profiled calls) of the artifact at `batch`, latency hint."""
    compiled = _compile(spec, {"PERF_COUNT": True, "PERFORMANCE_HINT": "LATENCY"})
    labels = _node_labels(spec, compiled)
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal((batch, *spec.manifest.input.sample_shape), dtype=np.float32)
    feed = {spec.manifest.input_name: x}
    request.infer(feed)
    runs: list[Counter] = []
    for _ in range(reps):
        request.infer(feed)
        per_type: Counter = Counter()
        for p in request.get_profiling_info():
            per_type[labels.get(p.node_name, p.node_type)] += p.real_time.total_seconds() * 1e3
        runs.append(per_type)
    types = sorted({t for r in runs for t in r})
    return {t: float(np.median([r.get(t, 0.0) for r in runs])) for t in types}


TRITON_FILE = "model.xml"  # the name Triton's OpenVINO backend opens in a version directory (model.bin beside it)
# What the oldest Triton export.triton supports (24.05: OpenVINO 2023.3) reads: up to opset13, which the IRs'
# ScaledDotProductAttention is (before 24.02, OpenVINO 2023.0 lacks it).
TRITON_MIN_OPSET = 13
_OPSET = re.compile(rb'version="opset([0-9]{1,4})"')
# Triton's OpenVINO backend passes OpenVINO only the parameters it knows (openvino.cc ParseParameters), and the only
# precision one is HINT_BF16=YES: nothing keeps fp32, unlike vitc, which compiles with INFERENCE_PRECISION_HINT=f32.
TRITON_PRECISION_NOTE = (
    "# Precision: Triton's OpenVINO backend has no parameter that keeps fp32 (HINT_BF16 only asks for bf16), so on\n"
    "# a CPU with AMX or AVX512-BF16 OpenVINO runs this model in bf16: logits move by about 1e-2 from the fp32 ones\n"
    "# its parity gate measured (manifest.json in the version directory). Where that matters, serve the onnxruntime\n"
    "# model, or this repository with python -m serve (it keeps fp32).\n"
)


def triton_min_check(version_dir: Path, artifact: Artifact) -> str | None:
    """Why the oldest supported Triton's OpenVINO cannot load the IR staged in `version_dir` (None: it can)."""
    opset = _newest_opset(version_dir / TRITON_FILE)
    if opset > TRITON_MIN_OPSET:
        return f"its IR uses OpenVINO opset{opset} (OpenVINO 2023.3 reads opset{TRITON_MIN_OPSET} at most)"
    return None


def _newest_opset(xml: Path) -> int:
    """The newest OpenVINO opset an IR's layers use (0: none named), read in bounded chunks."""
    newest, tail = 0, b""
    with xml.open("rb") as f:
        while block := f.read(1 << 20):
            chunk = tail + block
            newest = max([newest, *(int(n) for n in _OPSET.findall(chunk))])
            tail = chunk[-32:]  # a match cut by the chunk boundary is found in the next one
    return newest


RUNTIME = Runtime(
    name="openvino", target="openvino", packages=("openvino",),
    install=pip_command(packages=["openvino"]), export_extra="export",
    format="openvino-ir", triton_platform="openvino", precisions=("fp32", "fp16", "int8"),
    default_precisions=("fp32", "fp16", "int8"), devices=("cpu",), build=build, load=OpenVINOBackend,
    version=version, needs_hub=True, profile=profile_ops,
    variants=(Variant("fp32"), Variant("bf16", artifact="fp32", inference_precision="bf16"), Variant("int8")),
    triton_backend="openvino", triton_files=((".xml", TRITON_FILE), (".bin", "model.bin")),
    triton_threads="INFERENCE_NUM_THREADS", triton_threads_shared=True, triton_streams="NUM_STREAMS",
    # Triton's OpenVINO backend: "supports only Kind CPU and AUTO" (openvino.cc ModelInstanceState); it reshapes the
    # model to max_batch_size (ov::set_batch) and refuses any execution whose total batch differs, warm-up included,
    # unless ENABLE_BATCH_PADDING pads every batch to the maximum (a one-image request then costs 32; the padding it
    # computes is not reset between executions); SKIP_OV_DYNAMIC_BATCHSIZE changes neither. Its models get Triton's
    # layout without a batch dimension, the IR's dynamic batch as an explicit -1 (what the backend's README
    # recommends for dynamic shapes): each request runs alone, at its own batch size.
    triton_cpu_only=True, triton_fixed_batch=True, triton_note=TRITON_PRECISION_NOTE, triton_min_check=triton_min_check,
    tunes=("threads", "parallel", "openvino_hint"),
)
