"""The ONNX hub and the graph transforms on it, shared by the runtimes that convert from ONNX.

The hub is one self-contained fp32 `.onnx` with a dynamic batch axis, exported once per bundle by the export
orchestrator; onnxruntime serves it, OpenVINO and TensorRT convert it. The exporter is torch.export-based
(`dynamo=True`, the default since torch 2.9; the TorchScript exporter is deprecated): it traces SDPA and the conv
stem into a graph half the size of the TorchScript one, folds BatchNorm into the convs and runs the onnxscript
optimiser (constant folding, dead-node removal) offline, so sessions start in ~0.1 s. fp16 (LayerNorm/Softmax kept
fp32, float32 I/O) and INT8 (NNCF Q/DQ) graphs feed onnxruntime and TensorRT's strongly typed builder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtimes.base import INPUT_NAME, OUTPUT_NAME, first_line
from runtimes.build import ExportError, import_nncf, machine_failure, quiet

if TYPE_CHECKING:
    from torch import nn

OPSET = 20  # torch 2.14's default; onnxruntime, OpenVINO 2026 and TensorRT 10/11 all parse it
# A protobuf file cannot exceed 2 GiB: past this, weights go to a documented external-data file beside it.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Kept in fp32 in the fp16 graph: their reductions overflow or lose too much in half precision.
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")


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
        if failure := machine_failure(exc):
            raise failure from None  # a full disk is not a model problem: the export stops (exit 1)
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from None
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
        raise ExportError(f"{path}: ONNX checker failed: {first_line(exc)}") from None
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"{path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
    tensor = inputs[0].type.tensor_type
    dims = tensor.shape.dim
    if tensor.elem_type != onnx.TensorProto.FLOAT or len(dims) != 4 or not dims[0].dim_param:
        raise ExportError(f"{path}: input must be float32 (B, 3, H, W) with a symbolic batch axis")


def copy_hub(hub: Path, out: Path) -> Path:
    """The hub under the bundle's file name (external data is referenced by name, so it is re-saved)."""
    import shutil

    if len(files_of(hub)) == 1:
        shutil.copyfile(hub, out)
        return out
    import onnx

    onnx.save_model(onnx.load(str(hub)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=out.name + ".data")
    return out


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


def quantize_int8(images: Iterable[np.ndarray], src: Path, dst: Path) -> Path:
    """INT8 Q/DQ ONNX by NNCF post-training quantisation, calibrated on `images` (real train images)."""
    import onnx

    nncf = import_nncf()
    calibration = list(images)
    with quiet():
        quantized = nncf.quantize(
            onnx.load(str(src)), nncf.Dataset(calibration, lambda x: {INPUT_NAME: x}),
            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
        )
    onnx.save(quantized, str(dst))
    check(dst)
    return dst
