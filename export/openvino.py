"""OpenVINO IR: fp32, fp16-compressed weights, and INT8 by NNCF post-training quantisation.

Converted from the ONNX hub (dynamic batch kept). OpenVINO's CPU plugin runs bf16 by default on CPUs with
AMX/AVX-512-BF16, which alone moves logits by ~1e-2: parity compiles with INFERENCE_PRECISION_HINT=f32 and the
manifest records that hint as the artifact's `inference_precision`, so the server compiles it the same way.

CLI: `python -m export.openvino --checkpoint runs/x --out exports/x [--precision fp32,fp16,int8]`.
"""

from __future__ import annotations

from pathlib import Path

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

RUNTIME = "openvino"
INFERENCE_PRECISION = "f32"  # the hint parity (and the server) compile with; see the module docstring


def version() -> str:
    """The OpenVINO version, without its build suffix."""
    import openvino

    return openvino.__version__.split("-")[0]


def export(ctx: ExportContext, precision: str) -> Built:
    """Write openvino-<precision>.xml/.bin into the bundle."""
    import openvino as ov

    xml = ctx.workdir / f"openvino-{precision}.xml"
    model = ov.convert_model(str(ctx.hub_onnx()))
    info: dict = {"opset": ctx.opset, "inference_precision": INFERENCE_PRECISION}
    if precision == "int8":
        nncf = import_nncf()
        images = list(ctx.calibration_batches())
        with quiet():
            # TRANSFORMER keeps LayerNorm, Softmax and GELU inputs unquantised (the accuracy-sensitive ops).
            model = nncf.quantize(
                model, nncf.Dataset(images), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(images)
            )
        info["calibration"] = ctx.calibration_info()
        info["quantizer"] = "nncf"
    elif precision not in ("fp32", "fp16"):
        raise ExportError(f"openvino: unsupported precision {precision!r}")
    # save_model compresses weights to fp16 unless told otherwise: only the fp16 artifact wants that.
    ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")
    check(xml)
    return Built([xml, xml.with_suffix(".bin")], info)


def check(xml: str | Path) -> None:
    """The IR reads back with input "input" (dynamic batch, 3, H, W) and output "logits"."""
    import openvino as ov

    try:
        model = ov.Core().read_model(str(xml))
    except RuntimeError as exc:
        raise ExportError(f"{xml}: OpenVINO cannot read the IR: {str(exc).splitlines()[0]}") from None
    if [i.get_any_name() for i in model.inputs] != [INPUT_NAME] or OUTPUT_NAME not in model.outputs[0].get_names():
        raise ExportError(f"{xml}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}")
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.get_length() != 4 or shape[0].is_static:
        raise ExportError(f"{xml}: input must be (B, 3, H, W) with a dynamic batch axis, got {shape}")


def load(files: list[Path], inference_precision: str = INFERENCE_PRECISION, device: str = "CPU",
         threads: int | None = None) -> Runner:
    """A compiled model (f32 precision hint by default) as a batch -> logits function."""
    import openvino as ov

    config: dict = {"INFERENCE_PRECISION_HINT": inference_precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(files[0]), device, config)
    request = compiled.create_infer_request()
    output = compiled.output(OUTPUT_NAME)

    def run(batch: np.ndarray) -> np.ndarray:
        return request.infer({INPUT_NAME: np.ascontiguousarray(batch, np.float32)})[output].copy()

    return run


if __name__ == "__main__":
    from export.cli import main

    raise SystemExit(main(family="openvino"))
