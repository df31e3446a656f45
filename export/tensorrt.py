"""TensorRT engines built from the ONNX hub, with a dynamic-batch optimisation profile and a timing cache.

Precision is carried by the ONNX graph and the network is built STRONGLY_TYPED, the mode TensorRT recommends
since 10.12 and the only one in 11.x (which removed BuilderFlag.FP16/INT8 and the precision-constraint flags):
- fp16: `export.onnx.to_fp16` graph, LayerNorm/Softmax (and their reductions) kept in fp32, float32 I/O;
- int8: NNCF Q/DQ graph (explicit quantisation) calibrated on real train images;
- fp32: the hub itself, with TF32 disabled so fp32 parity holds.
On TensorRT 10.x, `typing="weak"` builds the older way instead: BuilderFlag.FP16 plus fp32 precision
constraints on normalisation/softmax layers (OBEY_PRECISION_CONSTRAINTS).

Engines are specific to the GPU architecture and TensorRT version that built them: the manifest records both.
TensorRT is imported lazily; without it `require()` raises ExportError and the CLI exits 2 with one line.

CLI: `python -m export.tensorrt --checkpoint runs/x --out exports/x [--precision fp16,int8]`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from export.context import INPUT_NAME, OUTPUT_NAME, Built, ExportContext, ExportError, Runner

RUNTIME = "tensorrt"
OPT_BATCH = 8  # the profile's optimum (clipped to max batch): a typical dynamic-batching server batch
WORKSPACE_BYTES = 4 << 30
TIMING_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vitc" / "tensorrt-timing.cache"


def require():  # noqa: ANN201 - the tensorrt module
    """Import TensorRT or raise ExportError with one line saying why it is needed."""
    try:
        import tensorrt
    except ImportError:
        raise ExportError("TensorRT is not installed (pip install tensorrt; needs an NVIDIA GPU)") from None
    import torch

    if not torch.cuda.is_available():
        raise ExportError("TensorRT needs a CUDA GPU and none is visible")
    return tensorrt


def version() -> str:
    """The TensorRT version."""
    return require().__version__


def profile_shapes(max_batch: int, image_size: int) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) input shapes of the optimisation profile."""
    opt = min(OPT_BATCH, max_batch)
    return tuple((b, 3, image_size, image_size) for b in (1, opt, max_batch))


def build_engine(onnx_path: Path, engine_path: Path, *, max_batch: int, image_size: int, precision: str,
                 typing: str = "strong", timing_cache: Path = TIMING_CACHE) -> Path:
    """Parse the ONNX file, build a serialized engine with a dynamic batch profile, and write it."""
    trt = require()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = typing == "strong"
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls keep 10 mantissa bits: not fp32 parity
    if not strong:
        _weak_precision(trt, network, config, precision)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, *profile_shapes(max_batch, image_size))
    config.add_optimization_profile(profile)
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def _weak_precision(trt, network, config, precision: str) -> None:  # noqa: ANN001 - TensorRT objects
    """TensorRT 10.x weakly typed build: FP16 flag, with normalisation and softmax pinned to fp32."""
    if precision == "int8":
        raise ExportError("weakly typed INT8 (implicit calibration) is deprecated; use typing='strong' (Q/DQ)")
    if precision != "fp16":
        return
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    pinned = {trt.LayerType.NORMALIZATION, trt.LayerType.SOFTMAX, trt.LayerType.REDUCE}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in pinned:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)


def export(ctx: ExportContext, precision: str, typing: str = "strong") -> Built:
    """Write tensorrt-<precision>.engine into the bundle."""
    from export import onnx as onnx_export

    hub = ctx.hub_onnx()
    if typing == "weak" or precision == "fp32":
        source = hub
    elif precision == "fp16":
        source = onnx_export.to_fp16(hub, ctx.scratch / "trt-fp16.onnx")
    elif precision == "int8":
        source = onnx_export.quantize_int8(ctx, hub, ctx.scratch / "trt-int8.onnx")
    else:
        raise ExportError(f"tensorrt: unsupported precision {precision!r}")
    engine = build_engine(source, ctx.workdir / f"tensorrt-{precision}.engine", max_batch=ctx.max_batch,
                          image_size=ctx.image_size, precision=precision, typing=typing)
    check(engine, ctx.max_batch)
    import torch

    info = {
        "opset": ctx.opset, "typing": typing, "timing_cache": str(TIMING_CACHE),
        "profile": dict(zip(("min", "opt", "max"), (s[0] for s in profile_shapes(ctx.max_batch, ctx.image_size)),
                            strict=True)),
        "device": torch.cuda.get_device_name(),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
    }
    if precision == "fp16" and typing == "strong":
        info["fp32_ops"] = list(onnx_export.FP32_OPS)
    if precision == "int8":
        info["calibration"] = ctx.calibration_info()
    return Built([engine], info)


def _deserialize(path: Path):  # noqa: ANN202 - (runtime, engine)
    trt = require()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise ExportError(f"{path}: TensorRT cannot deserialize the engine (other GPU or TensorRT version?)")
    return runtime, engine


def check(path: Path, max_batch: int | None = None) -> None:
    """The engine deserializes, has float32 "input" -> "logits", and its profile covers 1..max_batch."""
    trt = require()
    _, engine = _deserialize(path)
    names = {engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i))
             for i in range(engine.num_io_tensors)}
    if names != {INPUT_NAME: trt.TensorIOMode.INPUT, OUTPUT_NAME: trt.TensorIOMode.OUTPUT}:
        raise ExportError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, got {sorted(names)}")
    if engine.get_tensor_dtype(INPUT_NAME) != trt.float32:
        raise ExportError(f"{path}: input must be float32")
    low, _, high = engine.get_tensor_profile_shape(INPUT_NAME, 0)
    if low[0] != 1 or (max_batch is not None and high[0] < max_batch):
        raise ExportError(f"{path}: profile batch range {low[0]}..{high[0]} does not cover 1..{max_batch}")


def load(files: list[Path]) -> Runner:
    """An execution context over the engine as a batch -> logits function (torch CUDA buffers and stream)."""
    import torch

    runtime, engine = _deserialize(files[0])
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.cuda.stream(stream):
            x = torch.from_numpy(np.ascontiguousarray(batch, np.float32)).cuda(non_blocking=True)
            context.set_input_shape(INPUT_NAME, tuple(x.shape))
            y = torch.empty(tuple(context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device="cuda")
            context.set_tensor_address(INPUT_NAME, x.data_ptr())
            context.set_tensor_address(OUTPUT_NAME, y.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            out = y.cpu()
        stream.synchronize()
        return out.numpy()

    run.keepalive = (runtime, engine, context)  # the engine must outlive the context
    return run


if __name__ == "__main__":
    from export.cli import main

    raise SystemExit(main(family="tensorrt"))
