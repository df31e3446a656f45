"""The artifact-format table (models/formats.py) that models.bundle reads and verifies artifacts through, and the
small shared helpers (one `is_int`, one `finite_or_none`, one `short_reason`) that replaced the copies."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest

import models.formats as formats
from models.bundle import Artifact, BundleError, file_entries, verify_files
from models.formats import FORMATS, Format, UnreadableFile, files_problem, format_rules
from models.jsonfields import finite_or_none, is_int


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (field numbers below 16, payloads below 128 bytes)."""
    assert number < 16 and len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _onnx_naming(location: str) -> bytes:
    """The smallest ONNX model whose one tensor takes its data from the file `location`."""
    entry = _field(1, b"location") + _field(2, location.encode())
    return _field(7, _field(5, _field(13, entry)))  # model.graph(7).initializer(5).external_data(13)


def _artifact(bundle: Path, fmt: str, files: dict[str, bytes]) -> Artifact:
    for name, data in files.items():
        (bundle / name).write_bytes(data)
    return Artifact(id="art", runtime="rt", format=fmt, precision="fp32", servable=True,
                    files=file_entries(bundle, [bundle / name for name in files]))


def test_the_table_holds_each_formats_file_rule():
    assert FORMATS["openvino-ir"].suffixes == (".xml", ".bin")
    assert FORMATS["onnx"].suffixes == ()  # a model may keep its weights in external data files
    assert format_rules("npy") == Format("npy")  # not in the table (a test's fake runtime): no rules
    assert format_rules("npy").verify([Path("anything")]) is None


def test_files_problem_asks_an_ir_for_exactly_one_xml_and_one_bin():
    assert files_problem("openvino-ir", ["m.xml", "m.bin"]) is None
    assert files_problem("openvino-ir", ["m.bin", "m.xml"]) is None
    assert files_problem("openvino-ir", ["m.xml"]) == (
        "must list exactly one .xml and one .bin file (format 'openvino-ir'), lists 'm.xml'")
    assert files_problem("openvino-ir", ["a.xml", "b.xml", "c.bin", "d.bin", "e.bin"]) == (
        "must list exactly one .xml and one .bin file (format 'openvino-ir'), lists 'a.xml', 'b.xml', 'c.bin', "
        "'d.bin', ...")
    for fmt in ("onnx", "tensorrt-engine", "safetensors", "npy"):
        assert files_problem(fmt, ["x.xml", "y.whatever", "z.data"]) is None


def test_verify_files_checks_an_ir_xml_through_the_table(tmp_path):
    good = _artifact(tmp_path, "openvino-ir", {"m.xml": b"\xef\xbb\xbf  <?xml version='1.0'?><net/>", "m.bin": b"w"})
    assert [p.name for p in verify_files(tmp_path, good)] == ["m.xml", "m.bin"]
    onnx_as_xml = _artifact(tmp_path, "openvino-ir", {"m.xml": _onnx_naming("w.data"), "m.bin": b"w"})
    with pytest.raises(BundleError) as info:
        verify_files(tmp_path, onnx_as_xml)
    xml = (tmp_path / "m.xml").resolve()
    assert str(info.value) == f"artifact 'art': {xml} is not OpenVINO IR XML (tampered or corrupt)"


def test_verify_files_refuses_an_ir_built_in_code_with_the_wrong_files(tmp_path):
    art = _artifact(tmp_path, "openvino-ir", {"m.xml": b"<net/>"})
    with pytest.raises(BundleError) as info:
        verify_files(tmp_path, art)
    assert str(info.value) == ("artifact 'art': its files must list exactly one .xml and one .bin file "
                               "(format 'openvino-ir'), lists 'm.xml'")


def test_verify_files_refuses_onnx_external_data_the_manifest_does_not_list(tmp_path):
    model = _onnx_naming("w.data")
    listed = _artifact(tmp_path, "onnx", {"model.onnx": model, "w.data": b"\0" * 8})
    assert [p.name for p in verify_files(tmp_path, listed)] == ["model.onnx", "w.data"]
    alone = _artifact(tmp_path, "onnx", {"model.onnx": model})
    with pytest.raises(BundleError) as info:
        verify_files(tmp_path, alone)
    assert str(info.value) == ("artifact 'art': model.onnx takes tensor data from 'w.data', which the manifest does "
                               "not list (every file a runtime reads must be listed)")
    garbage = _artifact(tmp_path, "onnx", {"model.onnx": b"\xff" * 16})
    with pytest.raises(BundleError, match=r"^artifact 'art': .*model\.onnx is not a readable ONNX model \("):
        verify_files(tmp_path, garbage)


def test_formats_without_rules_pass_whatever_they_list(tmp_path):
    for fmt in ("tensorrt-engine", "safetensors", "npy"):
        art = _artifact(tmp_path, fmt, {"m.xml": b"not xml", "model.onnx": b"\xff" * 16})
        assert len(verify_files(tmp_path, art)) == 2


def test_a_file_a_format_check_cannot_read_is_one_line(tmp_path, monkeypatch):
    def denied(paths: list[Path]) -> None:
        raise UnreadableFile(paths[0], PermissionError(errno.EACCES, "Permission denied"))

    monkeypatch.setitem(formats.FORMATS, "npy", Format("npy", verify=denied))
    art = _artifact(tmp_path, "npy", {"w.npy": b"w"})
    with pytest.raises(BundleError) as info:
        verify_files(tmp_path, art)
    assert str(info.value) == f"artifact file {(tmp_path / 'w.npy').resolve()}: cannot read it: Permission denied"


def test_one_is_int_for_every_contract():
    import models.config
    import serve.protocol
    import train.state

    assert models.config.is_int is serve.protocol.is_int is train.state.is_int is is_int
    assert is_int(0) and is_int(-3) and is_int(1 << 70)
    assert not any(is_int(v) for v in (True, False, 1.0, "1", None))


def test_finite_or_none_records_non_finite_numbers_as_null():
    import export.parity
    import train.trainer

    assert export.parity.finite_or_none is train.trainer.finite_or_none is finite_or_none
    assert finite_or_none(1.5) == 1.5 and finite_or_none(0.0) == 0.0
    assert finite_or_none(math.nan) is None and finite_or_none(math.inf) is None and finite_or_none(-math.inf) is None


def test_one_short_reason_for_protocol_and_image_errors():
    import serve.imaging
    from serve.protocol import short_reason

    assert serve.imaging.short_reason is short_reason
    assert short_reason(ValueError("  first line\nsecond line")) == "first line"
    assert short_reason(ValueError("x" * 500)) == "x" * 200
    assert short_reason(KeyError()) == "KeyError" and short_reason(OSError("   ")) == "OSError"
