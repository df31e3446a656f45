"""Every runtime opens only an artifact whose I/O is the manifest's (runtimes/tensors.py): one input by the
manifest's name with its sample shape and a dynamic batch covering 1..max batch, one (batch, classes) output by its
name. Hostile OpenVINO IRs are built with the openvino API and hostile ONNX files with onnx, both tiny, inside a copy
of the legacy test bundle (no export needed), and opened through `runtimes.open_backend`, as the server opens them.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import runtimes
from models.bundle import Artifact, Manifest, file_entries, read_manifest, write_manifest
from runtimes import BackendError, ExportError
from runtimes.tensors import TensorInfo, check_io

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-bundle-v1"
SAMPLE, CLASSES, MAX_BATCH = (3, 32, 32), 10, 8  # the legacy bundle's contract
W = np.random.default_rng(0).standard_normal((3, CLASSES)).astype(np.float32)


def expected(batch: np.ndarray) -> np.ndarray:
    """What the tiny IR computes: the channel means times W."""
    return batch.mean(axis=(2, 3)) @ W


def tiny_ir(batch: object = -1, sample: tuple[int, ...] = SAMPLE, classes: int = CLASSES, decoy_input: bool = False,
            decoy_output: bool = False, input_name: str = "input"):  # noqa: ANN201 - an openvino.Model
    """(B, *sample) -> channel means @ W, with its ports named as export names them, plus the decoys asked for."""
    import openvino as ov
    from openvino import opset13 as ops

    def parameter(name: str, dims: list) -> object:
        node = ops.parameter(ov.PartialShape(dims), ov.Type.f32, name=name)
        node.output(0).set_names({name})
        return node

    x = parameter(input_name, [batch, *sample])
    pooled = ops.reduce_mean(x, ops.constant(np.array([2, 3])), keep_dims=False)  # (B, C, H, W) -> (B, C)
    weights = np.random.default_rng(0).standard_normal((sample[0], classes)).astype(np.float32)
    logits = ops.matmul(pooled, ops.constant(weights), False, False)
    logits.output(0).set_names({"logits"})
    results, params = [ops.result(logits)], [x]
    if decoy_input:  # an unused input ahead of the real one: port 0
        params.insert(0, parameter("decoy", [-1, *sample]))
    if decoy_output:  # zeros ahead of the logits: output port 0
        zeros = ops.multiply(logits, ops.constant(np.float32(0)))
        zeros.output(0).set_names({"decoy"})
        results.insert(0, ops.result(zeros))
    return ov.Model(results, params, "tiny")


def ir_bundle(dest: Path, model: object, **info: object) -> tuple[Path, Manifest]:
    """A pre-golden copy of the legacy bundle with `model` as its servable openvino-fp32 artifact."""
    import openvino as ov

    shutil.copytree(LEGACY, dest)
    ov.save_model(model, str(dest / "openvino-fp32.xml"), compress_to_fp16=False)
    return with_artifact(dest, "openvino", "openvino-ir", ["openvino-fp32.xml", "openvino-fp32.bin"],
                         {"inference_precision": "f32", **info})


def with_artifact(dest: Path, runtime: str, fmt: str, names: list[str], info: dict) -> tuple[Path, Manifest]:
    """The bundle at `dest` with one more servable artifact of these files (its manifest rewritten, hashes new)."""
    m = read_manifest(dest)
    artifact = Artifact(id=f"{runtime}-x", runtime=runtime, format=fmt, precision="fp32", servable=True,
                        files=file_entries(dest, [dest / n for n in names]), info=info)
    kept = tuple(a for a in m.artifacts if a.runtime != runtime)  # the one servable artifact of its runtime
    write_manifest(dest, dataclasses.replace(m, artifacts=(*kept, artifact)))
    return dest, read_manifest(dest)


def test_a_conforming_ir_is_fed_and_read_by_name(tmp_path):
    bundle, manifest = ir_bundle(tmp_path / "b", tiny_ir())
    backend = runtimes.open_backend(bundle, manifest, "openvino")
    x = np.random.default_rng(1).standard_normal((MAX_BATCH, *SAMPLE)).astype(np.float32)
    np.testing.assert_allclose(backend.infer(x), expected(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backend.infer(x[:1]), expected(x[:1]), rtol=1e-5, atol=1e-5)
    backend.close()


@pytest.mark.parametrize(("model", "message"), [
    # Bound by position, the batch went into the unused port (the same logits for every image), or the zeros were
    # answered as the logits: both loaded and reported ready.
    (dict(decoy_input=True), r"inputs \['decoy', 'input'\] and outputs \['logits'\]; the manifest expects 'input' "
                             r"-> 'logits' and nothing else"),
    (dict(decoy_output=True), r"outputs \['decoy', 'logits'\]"),
    (dict(input_name="pixels"), r"inputs \['pixels'\]"),
    # A fixed or capped batch passed the one-image warm-up and answered 500 to every batch above it.
    (dict(batch=1), r"input 'input' has shape \(1, 3, 32, 32\), the manifest expects \(-1, 3, 32, 32\) \(-1: the "
                    r"dynamic batch axis, taking 1\.\.8\)"),
    (dict(batch=MAX_BATCH), r"has shape \(8, 3, 32, 32\)"),
    (dict(batch=(1, 4)), r"input 'input' has shape \(1\.\.4, 3, 32, 32\)"),
    (dict(sample=(3, 16, 16)), r"input 'input' has shape \(-1, 3, 16, 16\)"),
    (dict(classes=5), r"output 'logits' has shape \(-1, 5\), the manifest expects \(-1, 10\)"),
])
def test_an_ir_that_breaks_the_contract_is_refused_at_load(tmp_path, model, message):
    import openvino as ov

    if isinstance(model.get("batch"), tuple):
        model = {**model, "batch": ov.Dimension(*model["batch"])}
    bundle, manifest = ir_bundle(tmp_path / "b", tiny_ir(**model))
    with pytest.raises(BackendError, match=r"^openvino-fp32\.xml .*" + message):
        runtimes.open_backend(bundle, manifest, "openvino")


def test_a_batch_range_covering_the_manifest_loads(tmp_path):
    import openvino as ov

    bundle, manifest = ir_bundle(tmp_path / "b", tiny_ir(batch=ov.Dimension(1, 64)))
    backend = runtimes.open_backend(bundle, manifest, "openvino")
    x = np.ones((MAX_BATCH, *SAMPLE), np.float32)
    np.testing.assert_allclose(backend.infer(x), expected(x), rtol=1e-5, atol=1e-5)
    backend.close()


def test_export_checks_the_ir_by_the_same_rule(tmp_path):
    import openvino as ov

    from runtimes.openvino import _check_ir

    xml = tmp_path / "openvino-fp32.xml"
    ov.save_model(tiny_ir(), str(xml))
    _check_ir(xml, SAMPLE, CLASSES, MAX_BATCH)
    ov.save_model(tiny_ir(batch=1), str(xml))
    with pytest.raises(ExportError, match=r"openvino-fp32\.xml input 'input' has shape \(1, 3, 32, 32\)"):
        _check_ir(xml, SAMPLE, CLASSES, MAX_BATCH)


@pytest.mark.parametrize(("recorded", "compiled"), [("f32", "f32"), ("fp32", "f32"), ("fp16", "f16"),
                                                    ("bf16", "bf16")])
def test_a_recorded_inference_precision_is_taken_in_any_accepted_spelling(tmp_path, recorded, compiled):
    from runtimes.openvino import inference_precision

    bundle, manifest = ir_bundle(tmp_path / "b", tiny_ir(), inference_precision=recorded)
    artifact = manifest.select("openvino", "fp32")
    spec = runtimes.LoadSpec(manifest, artifact, tuple(bundle / f.path for f in artifact.files))
    assert inference_precision(spec) == compiled  # OpenVINO's own spelling ("fp16" was a failed compile)
    runtimes.open_backend(bundle, manifest, "openvino").close()


def test_an_unknown_inference_precision_is_refused_naming_its_manifest_field(tmp_path):
    bundle, manifest = ir_bundle(tmp_path / "b", tiny_ir(), inference_precision="bogus")
    index = next(i for i, a in enumerate(manifest.artifacts) if a.runtime == "openvino")
    with pytest.raises(BackendError, match=re.escape(f"manifest.json: 'artifacts[{index}].inference_precision' must "
                                                     "be one of bf16, f16, f32, fp16, fp32, got 'bogus'")):
        runtimes.open_backend(bundle, manifest, "openvino")


def test_a_weights_offset_beyond_int64_is_named_as_such(tmp_path):
    bundle, _ = ir_bundle(tmp_path / "b", tiny_ir())
    xml = bundle / "openvino-fp32.xml"
    text = xml.read_text()
    offset = re.search(r'offset="\d+"', text).group(0)
    xml.write_text(text.replace(offset, 'offset="18446744073709551615"', 1))
    _, manifest = with_artifact(bundle, "openvino", "openvino-ir", ["openvino-fp32.xml", "openvino-fp32.bin"],
                                {"inference_precision": "f32"})
    with pytest.raises(BackendError, match=r"^openvino-fp32\.xml: OpenVINO cannot read the IR: .*stoll \(a number in "
                                           r"the XML is out of range or not a number: a weights offset or size"):
        runtimes.open_backend(bundle, manifest, "openvino")


# --- onnxruntime: the same rule ---------------------------------------------------------------------------------

def onnx_bundle(dest: Path, edit) -> tuple[Path, Manifest]:  # noqa: ANN001 - edit: onnx.ModelProto -> None
    """A pre-golden copy of the legacy bundle whose model.onnx `edit` changed."""
    import onnx

    shutil.copytree(LEGACY, dest)
    model = onnx.load(str(dest / "model.onnx"))
    edit(model)
    onnx.save(model, str(dest / "model.onnx"))
    return with_artifact(dest, "onnxruntime", "onnx", ["model.onnx"], {"opset": 20})


def _static_batch(model) -> None:  # noqa: ANN001
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1


def _extra_input(model) -> None:  # noqa: ANN001
    import onnx

    model.graph.input.insert(0, onnx.helper.make_tensor_value_info("decoy", onnx.TensorProto.FLOAT, ["batch", 3]))


def _extra_output(model) -> None:  # noqa: ANN001
    import onnx

    model.graph.node.append(onnx.helper.make_node("Identity", ["logits"], ["aux"]))
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, ["batch", 10]))


@pytest.mark.parametrize(("edit", "message"), [
    (_static_batch, r"^model\.onnx input 'input' has shape \(1, 3, 32, 32\), the manifest expects \(-1, 3, 32, 32\)"),
    (_extra_input, r"^model\.onnx has inputs \['decoy', 'input'\]"),
    (_extra_output, r"^model\.onnx has inputs \['input'\] and outputs \['aux', 'logits'\]"),
])
def test_onnxruntime_refuses_an_onnx_file_that_breaks_the_contract(tmp_path, edit, message):
    bundle, manifest = onnx_bundle(tmp_path / "b", edit)
    with pytest.raises(BackendError, match=message):
        runtimes.open_backend(bundle, manifest, "onnxruntime")


def test_onnxruntime_opens_the_legacy_onnx_file(tmp_path):
    bundle, manifest = onnx_bundle(tmp_path / "b", lambda _model: None)
    backend = runtimes.open_backend(bundle, manifest, "onnxruntime")
    assert backend.infer(np.zeros((MAX_BATCH, *SAMPLE), np.float32)).shape == (MAX_BATCH, CLASSES)
    backend.close()


# --- the rule itself --------------------------------------------------------------------------------------------

GOOD = (TensorInfo("input", "input", "float32", (-1, *SAMPLE)), TensorInfo("logits", "output", "float32", (-1, 10)))


@pytest.mark.parametrize(("tensors", "ok"), [
    (GOOD, True),
    ((GOOD[0]._replace(batches=(0, None)), GOOD[1]), True),  # OpenVINO's "?": 0..unbounded
    ((GOOD[0]._replace(batches=(1, MAX_BATCH)), GOOD[1]), True),
    ((GOOD[0]._replace(batches=(1, MAX_BATCH - 1)), GOOD[1]), False),
    ((GOOD[0]._replace(batches=(2, None)), GOOD[1]), False),
    ((GOOD[0], GOOD[1]._replace(batches=(1, 4))), False),
    ((GOOD[0]._replace(shape=None), GOOD[1]), False),
    ((GOOD[0]._replace(shape=(-1, 3, 32)), GOOD[1]), False),
    ((GOOD[0]._replace(shape=(1, *SAMPLE)), GOOD[1]), False),
])
def test_the_batch_axis_must_take_every_size_up_to_the_max_batch(tensors, ok):
    if ok:
        check_io(tensors, "input", "logits", SAMPLE, CLASSES, MAX_BATCH)
    else:
        with pytest.raises(BackendError, match="has shape"):
            check_io(tensors, "input", "logits", SAMPLE, CLASSES, MAX_BATCH)
