"""ONNX: torch -> one self-contained `.onnx` with a dynamic batch axis, checked, and run with onnxruntime.

The fp32 file is the hub the other runtimes are converted from. The exporter is torch.export-based
(`dynamo=True`, the default since torch 2.9; the TorchScript exporter is deprecated): it traces SDPA and the
conv stem into a graph half the size of the TorchScript one, folds BatchNorm into the convs and runs the
onnxscript optimiser (constant folding, dead-node removal) offline, so sessions start in ~0.1 s.
fp16 (LayerNorm/Softmax kept fp32, float32 I/O) and INT8 (NNCF Q/DQ) variants feed TensorRT's strongly
typed builder and onnxruntime GPU.

CLI: `python -m export.onnx --checkpoint runs/x --out exports/x`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.context import (
    INPUT_NAME,
    OUTPUT_NAME,
    Built,
    ExportContext,
    ExportError,
    Runner,
    import_nncf,
    quiet,
)

if TYPE_CHECKING:
    from torch import nn

OPSET = 20  # torch 2.14's default; onnxruntime, OpenVINO 2026 and TensorRT 10/11 all parse it
RUNTIME = "onnxruntime"
# A protobuf file cannot exceed 2 GiB: past this, weights go to a documented external-data file beside it.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Kept in fp32 in the fp16 graph: their reductions overflow or lose too much in half precision.
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")


def version() -> str:
    """The onnxruntime version that ran the parity check."""
    import onnxruntime

    return onnxruntime.__version__


def export_torch(model: nn.Module, path: Path, image_size: int, opset: int = OPSET) -> Path:
    """Export a torch model (eval mode) to `path` with input "input" (B, 3, H, W) and output "logits"."""
    import torch

    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2 so the exporter keeps the axis symbolic
    batch = torch.export.Dim("batch", min=1)
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(
                model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, optimize=True,
                external_data=n_bytes > EXTERNAL_DATA_BYTES, verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; the first line says what failed
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    check(path)
    return path


def files_of(path: Path) -> list[Path]:
    """The .onnx file plus its external-data file when the model needed one."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def check(path: str | os.PathLike) -> None:
    """ONNX checker (full, with shape inference) plus the I/O contract: "input" (B,3,H,W) f32 -> "logits"."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: ONNX checker failed: {str(exc).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
    tensor = inputs[0].type.tensor_type
    dims = tensor.shape.dim
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or not dims[0].dim_param:
        raise ExportError(f"{path}: input must be float32 (B, 3, H, W) with a symbolic batch axis")


def to_fp16(src: Path, dst: Path) -> Path:
    """fp16 weights and activations, float32 I/O, with FP32_OPS kept in fp32 (mixed precision in the graph)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    with quiet():
        model = OnnxModel(convert_float_to_float16(
            onnx.load(str(src)), keep_io_types=True, op_block_list=list(FP32_OPS)
        ))
        model.topological_sort()  # the converter appends the input casts after their consumers
    del model.model.graph.value_info[:]  # stale fp32 shape annotations; the checker re-infers them
    onnx.save(model.model, str(dst))
    check(dst)
    return dst


def quantize_int8(ctx: ExportContext, src: Path, dst: Path) -> Path:
    """INT8 Q/DQ ONNX by NNCF post-training quantisation, calibrated on real train images."""
    import onnx

    nncf = import_nncf()

    images = list(ctx.calibration_batches())
    with quiet():
        quantized = nncf.quantize(
            onnx.load(str(src)), nncf.Dataset(images, lambda x: {INPUT_NAME: x}),
            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(images),
        )
    onnx.save(quantized, str(dst))
    check(dst)
    return dst


def export(ctx: ExportContext, precision: str) -> Built:
    """Write model.onnx (fp32), model-fp16.onnx or model-int8.onnx into the bundle."""
    import shutil

    hub = ctx.hub_onnx()
    info: dict = {"opset": ctx.opset, "exporter": "torch.onnx dynamo, onnxscript-optimised"}
    if precision == "fp32":
        out = ctx.workdir / "model.onnx"
        if len(files_of(hub)) == 1:
            shutil.copyfile(hub, out)
        else:  # external data is referenced by file name: re-save under the bundle's name
            import onnx

            onnx.save_model(onnx.load(str(hub)), str(out), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=out.name + ".data")
    elif precision == "fp16":
        out = to_fp16(hub, ctx.workdir / "model-fp16.onnx")
        info["fp32_ops"] = list(FP32_OPS)
    elif precision == "int8":
        out = quantize_int8(ctx, hub, ctx.workdir / "model-int8.onnx")
        info["calibration"] = ctx.calibration_info()
    else:
        raise ExportError(f"onnx: unsupported precision {precision!r}")
    return Built(files_of(out), info)


def load(files: list[Path], providers: list[str] | None = None, threads: int | None = None) -> Runner:
    """An onnxruntime session over the artifact, as a batch -> logits function."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(files[0]), options, providers=providers or ["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, np.float32)})[0]

    return run


if __name__ == "__main__":
    from export.cli import main

    raise SystemExit(main(family="onnx"))
