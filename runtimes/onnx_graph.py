"""The ONNX hub and the graph transforms on it, shared by the runtimes that convert from ONNX.

The hub is one self-contained fp32 `.onnx` with a dynamic batch axis, exported once per bundle by the export
orchestrator; onnxruntime serves it, OpenVINO and TensorRT convert it. The exporter is torch.export-based
(`dynamo=True`, the default since torch 2.9; the TorchScript exporter is deprecated): it traces SDPA and the conv
stem into a graph half the size of the TorchScript one, folds BatchNorm into the convs and runs the onnxscript
optimiser (constant folding, dead-node removal) offline, so sessions start in ~0.1 s. The fp16 graph (LayerNorm/Softmax
kept fp32, float32 I/O) feeds onnxruntime and TensorRT's strongly typed builder alike; the INT8 ones (NNCF Q/DQ) are
two quantizations of the same calibration images: onnxruntime's mixed one, and a symmetric one TensorRT's parser takes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from runtimes.base import INPUT_NAME, OUTPUT_NAME, first_line
from runtimes.build import ExportError, import_nncf, io_or_memory_cause, quiet

if TYPE_CHECKING:
    import onnx
    from torch import nn

OPSET = 20  # torch 2.14's default; onnxruntime, OpenVINO 2026 and TensorRT 10/11 all parse it
# A protobuf file cannot exceed 2 GiB: past this, weights go to a documented external-data file beside it.
EXTERNAL_DATA_BYTES = 1_800_000_000
# Kept in fp32 in the fp16 graph: their reductions overflow or lose too much in half precision.
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "Pow", "Sqrt")
# The INT8 schemes quantize_int8 writes, as the manifest records them (an artifact's info "quantization").
QUANTIZATION_MIXED = ("nncf mixed preset: asymmetric activations per tensor (int8 and uint8, non-zero zero points), "
                      "symmetric int8 weights per output channel")
QUANTIZATION_SYMMETRIC = "nncf performance preset: symmetric int8 Q/DQ, weights per output channel"


def export_torch(model: nn.Module, path: Path, image_size: int, opset: int = OPSET,
                 description: dict[str, str] | None = None) -> Path:
    """Export a torch model (eval mode) to `path` with input "input" (B, 3, H, W) and output "logits", described by
    `description` (model metadata_props "vitc.<key>") and without the exporter's per-node debug metadata."""
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
        if failure := io_or_memory_cause(exc):
            raise failure from None  # a full disk is not a model problem: the export stops (exit 1)
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from None
    _tidy(path, description or {})
    check(path)
    return path


def _tidy(path: Path, description: dict[str, str]) -> None:
    """Drop torch's per-node metadata (stack traces with the exporting machine's absolute paths: ~5 % of the file,
    and a different sha256 for every checkout), raise the IR version to what the opsets need and record
    `description`; weights in external data stay there."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for graph_nodes in (model.graph.node, *(f.node for f in model.functions)):
        for node in graph_nodes:
            del node.metadata_props[:]
    # torch's exporter stamps IR 10 whatever the opset, but opset 23 needs IR 11, 24 IR 12 and 25 IR 13 (neither
    # the checker nor onnxruntime notices). The fp16 and INT8 graphs are made from this file and keep its IR.
    model.ir_version = max(model.ir_version, onnx.helper.find_min_ir_version_for(model.opset_import, True))
    describe(model, _vitc(description))
    onnx.save_model(model, str(path))


def _vitc(description: dict[str, str]) -> dict[str, str]:
    """`description` as metadata_props keys ("vitc.<key>")."""
    return {f"vitc.{k}": v for k, v in description.items()}


def describe(model: onnx.ModelProto, props: dict[str, str]) -> None:
    """Set `props` as the model's metadata_props (replacing entries of the same keys)."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _props(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


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


def copy_hub(hub: Path, out: Path, description: dict[str, str] | None = None) -> Path:
    """The hub under the bundle's file name, `description` added to its metadata_props (external data is referenced
    by name, so it is re-saved under the new one)."""
    import onnx

    external = len(files_of(hub)) > 1
    model = onnx.load(str(hub), load_external_data=external)
    describe(model, _vitc(description or {}))
    if external:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data")
    else:
        onnx.save_model(model, str(out))
    return out


def to_fp16(src: Path, dst: Path, description: dict[str, str] | None = None) -> Path:
    """fp16 weights and activations, float32 I/O, with FP32_OPS kept in fp32 (mixed precision in the graph);
    `description` is added to the source's metadata_props."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    source = onnx.load(str(src))
    props = {**_props(source), **_vitc(description or {})}
    with quiet():
        model = OnnxModel(convert_float_to_float16(source, keep_io_types=True, op_block_list=list(FP32_OPS)))
        model.topological_sort()  # the converter appends the input casts after their consumers
    del model.model.graph.value_info[:]  # stale fp32 shape annotations; the checker re-infers them
    describe(model.model, props)
    onnx.save(model.model, str(dst))
    check(dst)
    return dst


def quantize_int8(images: Iterable[np.ndarray], src: Path, dst: Path, *, symmetric: bool = False,
                  description: dict[str, str] | None = None) -> Path:
    """INT8 Q/DQ ONNX by NNCF post-training quantisation (QUANTIZATION_SYMMETRIC if `symmetric`, else
    QUANTIZATION_MIXED), calibrated on `images` (real train images); `description` is added to the source's
    metadata_props."""
    # The default (NNCF's mixed preset: asymmetric uint8 activations) suits CPU kernels. `symmetric` makes the graph
    # TensorRT's ONNX parser accepts: every zero point an int8 zero, weights per output channel.
    import onnx

    nncf = import_nncf()
    calibration = list(images)
    preset = nncf.QuantizationPreset.PERFORMANCE if symmetric else None  # None: the model type's default (mixed)
    source = onnx.load(str(src))
    props = {**_props(source), **_vitc(description or {})}
    with quiet():
        quantized = nncf.quantize(
            source, nncf.Dataset(calibration, lambda x: {INPUT_NAME: x}),
            model_type=nncf.ModelType.TRANSFORMER, preset=preset, subset_size=len(calibration),
        )
    if symmetric:
        unsigned_to_signed(quantized)
        nonnegative_axes(quantized)
        if problems := symmetric_int8_problems(quantized):
            raise ExportError(f"{dst.name}: not a symmetric INT8 graph: {problems[0]}")
    describe(quantized, props)
    onnx.save(quantized, str(dst))
    check(dst)
    return dst


def _qdq_tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, np.ndarray | None, np.ndarray | None]]:
    """Every QuantizeLinear/DequantizeLinear node with its scale and zero point (None where not an initializer)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def value(node: onnx.NodeProto, i: int) -> np.ndarray | None:
        return numpy_helper.to_array(inits[node.input[i]]) if len(node.input) > i and node.input[i] in inits else None

    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            yield node, value(node, 1), value(node, 2)


def unsigned_to_signed(model: onnx.ModelProto) -> int:
    """Turn uint8 Q/DQ pairs with zero point 0 into int8 ones covering the same range; returns how many changed."""
    # Zero point 0 is NNCF's choice after a ReLU. [0, 255*s] maps onto int8 [0, 127] with scale 255*s/127: one bit
    # less resolution on those tensors, which the INT8 parity gate then judges. A non-zero uint8 zero point is left
    # for the caller's check to refuse.
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    made: dict[tuple[str, str], tuple[str, str]] = {}
    changed = 0
    for node, scale, zero in list(_qdq_tensors(model)):
        if zero is None or zero.dtype != np.uint8 or zero.any() or scale is None:
            continue
        key = (node.input[1], node.input[2])
        if key not in made:
            names = (f"{key[0]}_int8_scale", f"{key[1]}_int8_zero")
            wider = (scale.astype(np.float64) * 255 / 127).astype(scale.dtype)
            model.graph.initializer.extend([numpy_helper.from_array(wider, names[0]),
                                            numpy_helper.from_array(np.zeros_like(zero, np.int8), names[1])])
            made[key] = names
        node.input[1], node.input[2] = made[key]
        changed += 1
    used = {i for n in model.graph.node for i in n.input}
    for name in {n for key in made for n in key} - used:
        model.graph.initializer.remove(inits[name])
    if changed:  # the quantised tensors' recorded uint8 type is stale; the checker re-infers it
        retyped = {o for n in model.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
        kept = [v for v in model.graph.value_info if v.name not in retyped]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return changed


def nonnegative_axes(model: onnx.ModelProto) -> None:
    """Q/DQ axes counted from the front (NNCF writes -1 for MatMul weights; not every parser normalises them)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node, _, _ in _qdq_tensors(model):
        rank = len(inits[node.input[0]].dims) if node.input[0] in inits else None
        for attr in node.attribute:
            if attr.name == "axis" and attr.i < 0 and rank is not None:
                attr.i += rank


def symmetric_int8_problems(model: onnx.ModelProto) -> list[str]:
    """What stops `model` being TensorRT's symmetric INT8: zero points not int8 zero, weights not per channel."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    problems, weights = [], 0
    for node, scale, zero in _qdq_tensors(model):
        if zero is None or zero.dtype != np.int8 or zero.any():
            kind = "missing" if zero is None else f"{zero.dtype} {zero.ravel()[:1].tolist()}"
            problems.append(f"{node.op_type} {node.name!r}: zero point {kind}, expected int8 0")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:  # a weight
            weights += 1
            weight = numpy_helper.to_array(inits[node.input[0]])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale is None or scale.ndim != 1 or scale.size != weight.shape[axis] or weight.shape[axis] < 2:
                problems.append(f"{node.name!r}: weight scale {getattr(scale, 'shape', None)} is not per channel "
                                f"of weight {weight.shape}")
    if not weights:
        problems.append("no quantised weights")
    return problems
