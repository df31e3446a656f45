"""One reader of a Triton labels.txt (Triton's getline rules, one size limit) for the server and export.triton: a
file one reads, the other keeps; the repository constants the two share are defined once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

from export import triton
from models import tritonconfig
from models.bundle import MAX_MANIFEST_BYTES, read_manifest
from models.tritonconfig import LabelsError, read_labels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def test_a_labels_file_with_a_trailing_blank_line_is_kept_by_export_and_read_by_the_server(bundle, tmp_path,
                                                                                           capsys):
    """An editor's blank line after the last label labels nothing for Triton and the server; export.triton used to
    count it as an 11th label of a 10-class model and refuse the next version."""
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo, skip=["openvino-fp32", "openvino-fp16"])
    model_dir = repo / "micro-onnx-fp32"
    labels = model_dir / triton.LABELS_FILE
    classes = read_manifest(bundle).output.classes
    names = labels.read_text().splitlines()
    edited = labels.read_text().replace(names[0], "Brown bear") + "\n"  # renamed, and a blank line at the end
    labels.write_text(edited)
    assert tritonconfig.read(model_dir).labels(model_dir, classes) == ["Brown bear", *names[1:]]  # the server
    assert triton.main([str(bundle), "--out", str(repo), "--skip", "openvino-fp32,openvino-fp16"]) == 0
    assert f"kept {labels}: it differs from the labels this tool wrote" in capsys.readouterr().out
    assert labels.read_text() == edited and (model_dir / "2").is_dir()
    assert tritonconfig.read(model_dir).labels(model_dir, classes)[0] == "Brown bear"


def test_both_refuse_a_labels_file_of_the_wrong_count_with_the_same_line_count(bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo, skip=["openvino-fp32", "openvino-fp16"])
    model_dir = repo / "micro-onnx-fp32"
    classes = read_manifest(bundle).output.classes
    (model_dir / triton.LABELS_FILE).write_text("a\nb\n\n\n")  # Triton reads 4 lines: a, b and two empty labels
    with pytest.raises(tritonconfig.ConfigError, match=rf"holds 4 lines, one label per class was expected "
                                                       rf"\({classes}\)"):
        tritonconfig.read(model_dir).labels(model_dir, classes)
    with pytest.raises(SystemExit):
        triton.main([str(bundle), "--out", str(repo), "--skip", "openvino-fp32,openvino-fp16"])
    assert f"holds 4 labels, the model has {classes} classes" in capsys.readouterr().err
    assert not (model_dir / "2").exists()


def test_read_labels_follows_tritons_getline_rules_under_one_limit():
    assert read_labels(b"a\nb\nc", 3) == read_labels(b"a\nb\nc\n", 3) == read_labels(b"a\r\nb\r\nc\r\n\r\n\n", 3)
    assert read_labels(b"a\n\nc\n", 3) == ["a", "", "c"]  # an empty line inside is a label
    assert read_labels(b"a\nb\n\n", 3) == ["a", "b", ""]  # and so is one after the last, when it is needed
    with pytest.raises(LabelsError, match=r"holds 4 lines, one label per class was expected \(5\)") as refused:
        read_labels(b"a\nb\n\n\n", 5)  # the blank lines label nothing only where that makes one label per class
    assert refused.value.lines == 4
    with pytest.raises(LabelsError, match="is not UTF-8 text"):
        read_labels(b"\xff\n", 1)
    # The limit fits the class names of any manifest (the labels are written from them), and is the only one.
    assert tritonconfig.MAX_LABELS_BYTES == MAX_MANIFEST_BYTES > 1 << 20
    assert not hasattr(triton, "MAX_LABELS_BYTES")
    with pytest.raises(LabelsError, match=f"is larger than {tritonconfig.MAX_LABELS_BYTES} bytes"):
        read_labels(b"x" * (tritonconfig.MAX_LABELS_BYTES + 1), 1)


def test_a_run_of_newlines_before_the_end_is_read_in_linear_time():
    """Trailing line ends were stripped with a pattern anchored at the end: quadratic on a run of newlines followed by
    anything (minutes for this file, which a server reads at every load)."""
    code = ("from models.tritonconfig import LabelsError, read_labels\n"
            "try:\n    read_labels(b'\\n' * 400_000 + b'x', 3)\nexcept LabelsError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=20)
    assert done.stdout.strip() == "holds 400001 lines, one label per class was expected (3)", done.stderr


def test_the_repository_bounds_are_defined_once():
    assert triton.MAX_VERSION is tritonconfig.MAX_VERSION == 2**63 - 1
    assert triton.MAX_QUEUE_DELAY_US is tritonconfig.MAX_QUEUE_DELAY_US == 60_000_000
    source = (REPO / "export" / "triton.py").read_text()
    assert "MAX_VERSION =" not in source and "MAX_QUEUE_DELAY_US =" not in source
