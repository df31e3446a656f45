"""TensorRT backend (NVIDIA GPU): the bundle's engine, or an fp32 engine built at start from the ONNX hub.

Written against the TensorRT 10/11 name-based tensor API (set_input_shape / set_tensor_address /
execute_async_v3) with device buffers from cuda-python, so the GPU image needs no torch. Engines are specific
to a GPU and TensorRT version; a bundle exported elsewhere can still be served from its ONNX file (fp32,
strongly typed, TF32 off for fp32 parity). fp16/int8 need the bundle's own engine (`python -m export.tensorrt`
on the serving GPU), since TensorRT 11 takes reduced precision only from the graph. Not runnable on the
CPU-only machines this project is developed on: its tests are marked `tensorrt` and skip without the package.
"""

from __future__ import annotations

import threading

import numpy as np

from serve.backends.base import BackendError, LoadSpec, check_device

_WORKSPACE_BYTES = 1 << 30


def _cudart():
    """cuda-python's runtime module (its import path moved in cuda-python 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:  # cuda-python < 12.6
        from cuda import cudart as runtime
    return runtime


def _check(result):
    """Unpack a cuda-python call's (error, *values) tuple; raise BackendError on failure."""
    cudart = _cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error: {cudart.cudaGetErrorString(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


def build_engine(onnx_bytes: bytes, spec: LoadSpec, logger) -> bytes:  # noqa: ANN001 - a trt.Logger
    """Build a serialized fp32 engine with a dynamic-batch profile 1..max_batch from ONNX bytes."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse the ONNX artifact: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would break fp32 parity with the export
    profile = builder.create_optimization_profile()
    c, h, w = spec.input_shape
    opt = max(1, min(8, spec.max_batch))
    profile.set_shape(spec.input_name, (1, c, h, w), (opt, c, h, w), (spec.max_batch, c, h, w))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise BackendError("TensorRT failed to build an engine from the ONNX artifact (see its log)")
    return bytes(engine)


class TensorRTBackend:
    """One engine + execution context on one GPU; calls are serialised (one context, one stream)."""

    runtime = "tensorrt"
    parallelism = 1

    def __init__(self, spec: LoadSpec) -> None:
        import tensorrt as trt

        check_device(spec.device, ("cuda",), self.runtime)
        cudart = _cudart()
        self.device = spec.device
        self.max_batch = spec.max_batch
        self._cudart = cudart
        self._lock = threading.Lock()
        self._buffers: list[int] = []
        _check(cudart.cudaSetDevice(int(spec.device.partition(":")[2] or 0)))
        logger = trt.Logger(trt.Logger.WARNING)
        if spec.artifact.get("runtime") == "tensorrt":
            engine_bytes = spec.file(".engine").read_bytes()
            self.precision = spec.precision
        elif spec.requested_precision not in (None, "fp32"):
            raise BackendError(f"the bundle has no servable tensorrt/{spec.requested_precision} engine; build one "
                               "on this GPU with `python -m export.tensorrt`")
        else:  # the ONNX hub: build an fp32 engine for this GPU now
            self.precision = "fp32"
            engine_bytes = build_engine(spec.file(".onnx").read_bytes(), spec, logger)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise BackendError("TensorRT cannot deserialize the engine (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if spec.input_name not in inputs or not outputs:
            raise BackendError(f"engine has inputs {inputs} and outputs {outputs}; expected {spec.input_name!r}")
        self._input = spec.input_name
        self._output = spec.output_name if spec.output_name in outputs else outputs[0]
        self._sample_shape = spec.input_shape
        self._classes = spec.num_classes
        # Buffers for the largest batch, allocated once.
        self._d_in = self._malloc(self.max_batch * int(np.prod(self._sample_shape)) * 4)
        self._d_out = self._malloc(self.max_batch * self._classes * 4)
        self._stream = _check(cudart.cudaStreamCreate())
        self.context.set_tensor_address(self._input, self._d_in)
        self.context.set_tensor_address(self._output, self._d_out)

    def _malloc(self, nbytes: int) -> int:
        ptr = int(_check(self._cudart.cudaMalloc(nbytes)))
        self._buffers.append(ptr)
        return ptr

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32 on the GPU."""
        cudart = self._cudart
        batch = np.ascontiguousarray(batch, np.float32)
        n = batch.shape[0]
        out = np.empty((n, self._classes), np.float32)
        with self._lock:
            self.context.set_input_shape(self._input, batch.shape)
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(self._d_in, batch.ctypes.data, batch.nbytes, h2d, self._stream))
            if not self.context.execute_async_v3(int(self._stream)):
                raise BackendError("TensorRT execution failed")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._d_out, out.nbytes, d2h, self._stream))
            _check(cudart.cudaStreamSynchronize(self._stream))
        return out

    def close(self) -> None:
        """Free device buffers and the stream."""
        for ptr in self._buffers:
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None


def load(spec: LoadSpec) -> TensorRTBackend:
    """Build the TensorRT backend for a verified artifact (engine plan or ONNX)."""
    return TensorRTBackend(spec)
