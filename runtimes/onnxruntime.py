"""onnxruntime: ONNX artifacts (fp32 hub, fp16, INT8 Q/DQ) and one InferenceSession per backend (CPU or CUDA).

`python -m export.onnx --checkpoint runs/x --out exports/x` builds them; `--backend onnxruntime` serves them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.host import usable_cpus
from runtimes import onnx_graph
from runtimes.base import BackendError, LoadSpec, Runtime, Variant
from runtimes.build import Built, ExportContext, ExportError


def version() -> str:
    """The onnxruntime version."""
    import onnxruntime

    return onnxruntime.__version__


def build(ctx: ExportContext, precision: str) -> Built:
    """Write model.onnx (fp32), model-fp16.onnx or model-int8.onnx into the bundle."""
    hub = ctx.hub_onnx()
    info: dict[str, Any] = {"opset": ctx.opset, "exporter": "torch.onnx dynamo, onnxscript-optimised"}
    if precision == "fp32":
        out = onnx_graph.copy_hub(hub, ctx.workdir / "model.onnx")
    elif precision == "fp16":
        out = onnx_graph.to_fp16(hub, ctx.workdir / "model-fp16.onnx")
        info["fp32_ops"] = list(onnx_graph.FP32_OPS)
    elif precision == "int8":
        out = onnx_graph.quantize_int8(ctx.calibration_batches(), hub, ctx.workdir / "model-int8.onnx")
        info["calibration"] = ctx.calibration_info()
    else:
        raise ExportError(f"onnx: unsupported precision {precision!r}")
    return Built(onnx_graph.files_of(out), info)


def unavailable(device: str) -> str | None:
    """CUDA needs the onnxruntime-gpu wheel (same module name as the CPU one)."""
    if not device.startswith("cuda"):
        return None
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install onnxruntime-gpu instead of onnxruntime)"
    return None


class OnnxRuntimeBackend:
    """An ONNX artifact in one session; `--device cuda` must really run on the CUDA provider."""

    runtime = "onnxruntime"
    parallelism = 1  # one session already uses every intra-op thread; concurrent runs would only contend

    def __init__(self, spec: LoadSpec) -> None:
        import onnxruntime as ort

        options = spec.options
        if options.inference_precision not in (None, spec.precision):
            raise BackendError(f"onnxruntime runs an artifact at its own precision ({spec.precision}), "
                               f"not {options.inference_precision}")
        self.device, self.precision, self.max_batch = options.device, spec.precision, spec.max_batch
        threads = options.threads or usable_cpus()
        providers: list = ["CPUExecutionProvider"]
        if options.device_kind == "cuda":
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels (the GPU image has no toolkit)
                ort.preload_dlls()
            providers = [("CUDAExecutionProvider", {"device_id": options.device_index}), "CPUExecutionProvider"]
        path = spec.file(".onnx")
        # Batches run with idle workers asleep: spinning ones would steal the cores the HTTP loop and image
        # decoding need (measured on 2 cores: -15 % served throughput at saturation, 2026-12-04-2037-vm-overhead).
        self.session = ort.InferenceSession(str(path), _options(ort, threads, spinning=False), providers=providers)
        # A lone image (batch 1: the server is otherwise idle) runs in a second session whose workers spin within a
        # run and stop when it returns: ~3 ms less per 1GF image on 2 cores, the latency a hand-written server with
        # onnxruntime's defaults gets. It holds its own packed weights, so only for models of modest size.
        self._latency = None
        if options.device_kind == "cpu" and threads > 1 and path.stat().st_size <= LATENCY_SESSION_MAX_BYTES:
            self._latency = ort.InferenceSession(str(path), _options(ort, threads, spinning=True),
                                                 providers=providers)
        # onnxruntime-gpu lists CUDA as available even without a GPU and silently falls back to CPU.
        if options.device_kind == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendError(
                f"--device {options.device}: onnxruntime is not running on CUDA (active providers: "
                f"{', '.join(self.session.get_providers())}); install onnxruntime-gpu and check the driver"
            )
        names = [i.name for i in self.session.get_inputs()]
        if spec.input_name not in names:
            raise BackendError(f"{spec.file('.onnx').name} has inputs {names}, the manifest expects "
                               f"{spec.input_name!r}")
        outputs = [o.name for o in self.session.get_outputs()]
        if spec.output_name not in outputs:
            raise BackendError(f"{spec.file('.onnx').name} has outputs {outputs}, the manifest expects "
                               f"{spec.output_name!r}")
        self._input, self._outputs = spec.input_name, [spec.output_name]
        self._threads = threads

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32."""
        session = self._latency if self._latency is not None and len(batch) == 1 else self.session
        return session.run(self._outputs, {self._input: batch})[0]

    def describe(self) -> dict[str, Any]:
        return {"threads_effective": self._threads, "providers": self.session.get_providers(),
                "batch1_latency_session": self._latency is not None}

    def close(self) -> None:
        """Drop the sessions (onnxruntime frees them with the objects)."""
        self.session = self._latency = None


LATENCY_SESSION_MAX_BYTES = 256 << 20  # ONNX files up to this size get the spinning batch-1 session too


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


RUNTIME = Runtime(
    name="onnxruntime", target="onnx", packages=("onnxruntime",), install="pip install 'vitc[serve]'",
    format="onnx", triton_platform="onnxruntime_onnx", precisions=("fp32", "fp16", "int8"),
    default_precisions=("fp32",), devices=("cpu", "cuda"), build=build, load=OnnxRuntimeBackend, version=version,
    variants=(Variant("fp32"), Variant("fp32", "cuda")), needs_hub=True, unavailable=unavailable,
    triton_backend="onnxruntime", triton_files=((".onnx", "model.onnx"),),
)
