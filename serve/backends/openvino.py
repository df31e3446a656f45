"""OpenVINO backend: a compiled model with a pool of infer requests, so parallel batches use separate streams.

The THROUGHPUT hint splits the CPU into streams that only pay off with several requests in flight; the
dynamic batcher runs `parallelism` batches at once, each on its own infer request. The inference precision
is the one the export's parity check validated (fp32 artifacts -> f32: this CPU would otherwise run bf16).
"""

from __future__ import annotations

import queue

import numpy as np

from serve.backends.base import BackendError, LoadSpec, check_device

# Used when the manifest does not record what parity was measured with.
_PRECISION_HINT = {"fp32": "f32", "fp16": "f32", "int8": "f32", "bf16": "bf16"}
_HINTS = ("throughput", "latency")


def inference_precision(spec: LoadSpec) -> str:
    """INFERENCE_PRECISION_HINT the artifact's parity was measured with (recorded by export), else by precision."""
    parity = spec.artifact.get("parity") or {}
    recorded = spec.artifact.get("inference_precision") or parity.get("inference_precision")
    return str(recorded or _PRECISION_HINT.get(spec.precision, "f32"))


class OpenVINOBackend:
    """An OpenVINO IR on the CPU; `infer` is thread-safe up to `parallelism` concurrent calls without waiting."""

    runtime = "openvino"

    def __init__(self, spec: LoadSpec) -> None:
        import openvino as ov

        check_device(spec.device, ("cpu",), self.runtime)
        hint = spec.options.hint.lower()
        if hint not in _HINTS:
            raise BackendError(f"OpenVINO hint must be one of {_HINTS}, got {hint!r}")
        self.device = spec.device
        self.precision = spec.precision
        self.max_batch = spec.max_batch
        self.hint = hint
        core = ov.Core()
        xml = spec.file(".xml")
        model = core.read_model(str(xml), str(xml.with_suffix(".bin")))
        names = [n for port in model.inputs for n in port.get_names()]
        if spec.input_name not in names:
            raise BackendError(f"{xml.name} has inputs {names}, the manifest expects {spec.input_name!r}")
        config = {"PERFORMANCE_HINT": hint.upper(), "INFERENCE_PRECISION_HINT": inference_precision(spec)}
        if spec.options.threads:
            config["INFERENCE_NUM_THREADS"] = int(spec.options.threads)
        if spec.options.parallel and hint == "throughput":
            config["PERFORMANCE_HINT_NUM_REQUESTS"] = int(spec.options.parallel)
        self.compiled = core.compile_model(model, "CPU", config)
        optimal = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self.parallelism = max(1, spec.options.parallel or optimal) if hint == "throughput" else 1
        self.inference_precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.parallelism):
            self._free.put(self.compiled.create_infer_request())

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32 on a free infer request (blocks if all are busy)."""
        request = self._free.get()
        try:
            # share_inputs: the batch is already contiguous float32, so OpenVINO reads it in place.
            request.infer({0: batch}, share_inputs=True, share_outputs=True)
            return request.get_output_tensor(0).data.copy()
        finally:
            self._free.put(request)

    def close(self) -> None:
        """Drop requests and the compiled model."""
        self._free = queue.SimpleQueue()
        self.compiled = None


def load(spec: LoadSpec) -> OpenVINOBackend:
    """Build the OpenVINO backend for a verified artifact."""
    return OpenVINOBackend(spec)
