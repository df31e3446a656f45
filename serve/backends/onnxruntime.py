"""onnxruntime backend: one InferenceSession (CPU or CUDA), thread-safe `run`, no per-call setup."""

from __future__ import annotations

import numpy as np

from serve.backends.base import BackendError, LoadSpec, check_device, default_threads


class OnnxRuntimeBackend:
    """An ONNX artifact in onnxruntime; `--device cuda` must really run on the CUDA provider."""

    runtime = "onnxruntime"
    parallelism = 1  # one session already uses every intra-op thread; concurrent runs would only contend

    def __init__(self, spec: LoadSpec) -> None:
        import onnxruntime as ort

        check_device(spec.device, ("cpu", "cuda"), self.runtime)
        self.device = spec.device
        self.precision = spec.precision
        self.max_batch = spec.max_batch
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = spec.options.threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning workers would steal the cores the HTTP loop and image decoding need between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if spec.device.startswith("cuda") and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError(f"--device {spec.device}: this onnxruntime has no CUDA provider (install "
                               "onnxruntime-gpu instead of onnxruntime)")
        if spec.device.startswith("cuda"):
            if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels (the GPU image has no toolkit)
                ort.preload_dlls()
            device_id = int(spec.device.partition(":")[2] or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(spec.file(".onnx")), opts, providers=providers)
        # onnxruntime-gpu lists CUDA as available even without a GPU and silently falls back to CPU.
        if spec.device.startswith("cuda") and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendError(
                f"--device {spec.device}: onnxruntime is not running on CUDA (active providers: "
                f"{', '.join(self.session.get_providers())}); install onnxruntime-gpu and check the driver"
            )
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        names = [i.name for i in inputs]
        if spec.input_name not in names:
            raise BackendError(f"model.onnx has inputs {names}, the manifest expects {spec.input_name!r}")
        self._input = spec.input_name
        out_names = [o.name for o in outputs]
        self._outputs = [spec.output_name if spec.output_name in out_names else out_names[0]]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32."""
        return self.session.run(self._outputs, {self._input: batch})[0]

    def close(self) -> None:
        """Drop the session (onnxruntime frees it with the object)."""
        self.session = None


def load(spec: LoadSpec) -> OnnxRuntimeBackend:
    """Build the onnxruntime backend for a verified artifact."""
    return OnnxRuntimeBackend(spec)
