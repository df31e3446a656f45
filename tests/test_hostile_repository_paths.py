"""What a Triton model directory names is held to the directory and to class names' rules (security report hCK):
a labels.txt line of any length was copied into every row of a v2 classification answer (a 393 KB request, a
537 MB answer); config.pbtxt's input_data_file and default_model_filename reached any file by '..' or a link, and
the load's refusal, which an HTTP client reads, told whether that file existed and its size."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from export.kserve import RepositoryError
from export.triton_config import labels_edited, labels_text
from models import tritonconfig
from models.bundle import read_manifest
from models.config import MAX_LABEL_CHARS
from models.tritonconfig import ConfigError, LabelsError, TritonConfig, parse, read_labels

LEGACY = Path(__file__).resolve().parent / "data" / "legacy-bundle-v1"
IO = ('max_batch_size: 8\ninput [{ name: "input" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] }]\n'
      'output [{ name: "logits" data_type: TYPE_FP32 dims: [ 10 ] }]\n')
SAMPLE_BYTES = 3 * 32 * 32 * 4


def _warmup(data_file: str) -> str:
    return (IO + 'model_warmup [{ name: "w" batch_size: 1 inputs { key: "input" value: { data_type: TYPE_FP32 '
            f'dims: [ 3, 32, 32 ] input_data_file: "{data_file}" }} }} }}]\n')


def _model(tmp_path: Path, data_file: str) -> Path:
    model = tmp_path / "repo" / "m"
    (model / "warmup").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(_warmup(data_file))
    return model


def _refusal(model: Path) -> str:
    with pytest.raises(ConfigError) as info:
        tritonconfig.read(model)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- labels.txt


@pytest.mark.parametrize(("line", "label"), [(1, "A" * (MAX_LABEL_CHARS + 1)), (2, "cat \x1b[2J\x1b[32mOK"),
                                              (3, "dog\rfake"), (2, "a\u2028b"), (3, "tab\there")])
def test_a_label_breaking_the_class_name_rule_is_refused_naming_its_line(line, label):
    labels = ["a", "b", "c"]
    labels[line - 1] = label
    with pytest.raises(LabelsError, match=rf"^holds at line {line} a label .*1\.\.{MAX_LABEL_CHARS} characters "
                                          "without control characters") as info:
        read_labels(("\n".join(labels) + "\n").encode(), 3)
    assert info.value.lines is None and "\n" not in str(info.value) and "\x1b" not in str(info.value)


def test_labels_within_the_rule_still_read_as_triton_reads_them():
    longest = "é" * MAX_LABEL_CHARS
    assert read_labels(f"{longest}\n\nc\n".encode(), 3) == [longest, "", "c"]  # an empty line labels nothing
    assert read_labels(b"a\r\nb\r\nc\r\n\r\n", 3) == ["a", "b", "c"]  # a CRLF file's line ends are no label's


def test_a_model_whose_labels_file_holds_a_huge_label_is_refused_at_load(tmp_path):
    """The report's file: one 16 MiB label among ten, which every answer row of classification=10 copied."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "labels.txt").write_bytes(b"A" * (16 * 2**20 - 200) + b"\n" + b"b\n" * 9)
    with pytest.raises(ConfigError) as info:
        TritonConfig(label_filename="labels.txt").labels(model, 10)
    message = str(info.value)
    assert "holds at line 1 a label of 16,777,016 characters" in message and len(message) < 400


def test_export_triton_refuses_to_keep_an_edited_labels_file_with_a_huge_label(tmp_path):
    manifest = read_manifest(LEGACY)
    model = tmp_path / "m"
    model.mkdir()
    names = list(manifest.class_names)
    names[4] = "x" * 5000
    (model / "labels.txt").write_bytes(labels_text(names))
    with pytest.raises(RepositoryError, match="it holds at line 5 a label of 5,000 characters"):
        labels_edited(model, manifest)
    names[4] = "Brown bear"  # an edit within the rule is kept
    (model / "labels.txt").write_bytes(labels_text(names))
    assert labels_edited(model, manifest) is True


# ------------------------------------------------------------------------------------ model_warmup input_data_file


def test_a_warmup_file_outside_the_model_directory_is_refused_alike_whether_it_exists_or_not(tmp_path):
    (tmp_path / "big.bin").write_bytes(bytes(SAMPLE_BYTES))
    (tmp_path / "small.bin").write_bytes(bytes(7))
    refusals = []
    for name in ("big.bin", "small.bin", "absent.bin"):
        refusal = _refusal(_model(tmp_path, f"../../../{name}"))
        assert "must name a file inside the model directory" in refusal and "bytes" not in refusal
        refusals.append(refusal.replace(name, "NAME"))
    assert len(set(refusals)) == 1  # nothing tells a file that exists from one that does not


def test_a_warmup_file_linking_out_of_the_model_directory_is_refused_alike_whether_its_target_exists_or_not(
        tmp_path):
    (tmp_path / "secret.bin").write_bytes(bytes(SAMPLE_BYTES))
    model = _model(tmp_path, "x.bin")
    refusals = []
    for target in (tmp_path / "secret.bin", tmp_path / "absent.bin", Path("/dev/zero")):
        (model / "warmup" / "x.bin").unlink(missing_ok=True)
        (model / "warmup" / "x.bin").symlink_to(target)
        refusal = _refusal(model)
        assert "links to one outside" in refusal and "bytes" not in refusal
        refusals.append(refusal)
    assert len(set(refusals)) == 1
    (model / "warmup" / "x.bin").unlink()
    (model / "warmup" / "x.bin").symlink_to("../sample.bin")  # a link that stays inside is read
    (model / "sample.bin").write_bytes(bytes(SAMPLE_BYTES))
    assert tritonconfig.read(model) is not None


def test_a_warmup_directory_linking_out_of_the_model_directory_is_refused(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.bin").write_bytes(bytes(SAMPLE_BYTES))
    model = _model(tmp_path, "x.bin")
    (model / "warmup").rmdir()
    (model / "warmup").symlink_to(tmp_path / "shared")
    assert "links to one outside" in _refusal(model)


def test_a_warmup_file_that_is_not_a_regular_file_is_refused_without_being_opened(tmp_path, monkeypatch):
    model = _model(tmp_path, "fifo")
    os.mkfifo(model / "warmup" / "fifo")
    (model / "warmup" / "dir").mkdir()
    opened = []
    real_open = os.open

    def recording_open(path, *args, **kwargs):  # a spy: every open still happens
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    assert "'fifo' is not a readable file" in _refusal(model)
    (model / "config.pbtxt").write_text(_warmup("dir"))
    assert "'dir' is not a readable file" in _refusal(model)
    assert not [p for p in opened if "warmup" in p]


def test_a_warmup_file_inside_warmup_is_still_read_as_triton_joins_it(tmp_path):
    model = _model(tmp_path, "sub/x.bin")
    (model / "warmup" / "sub").mkdir()
    (model / "warmup" / "sub" / "x.bin").write_bytes(bytes(SAMPLE_BYTES - 1))
    assert f"holds {SAMPLE_BYTES - 1} bytes" in _refusal(model)  # a file of the model's own: its size helps
    (model / "warmup" / "sub" / "x.bin").write_bytes(bytes(SAMPLE_BYTES))
    assert tritonconfig.read(model) is not None
    (model / "config.pbtxt").write_text(_warmup("/sub/x.bin"))  # Triton's JoinPath keeps it under warmup/
    assert tritonconfig.read(model) is not None


# ---------------------------------------------------------------------------------------- default_model_filename


def test_a_default_model_filename_outside_the_version_directory_is_refused_alike_whether_it_exists_or_not(
        tmp_path):
    version = tmp_path / "repo" / "m" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "exists.txt").write_text("x")
    for given in ("../../../exists.txt", str(tmp_path / "exists.txt"), "sub/model.onnx", "..", "."):
        refusals = set()
        for name in (given, given.replace("exists", "absent")):  # a file outside that exists, and one that does not
            with pytest.raises(ConfigError, match="must be the name of a file in the version directory") as info:
                parse(f'default_model_filename: "{name}"').check_files(version, None)
            refusals.add(str(info.value).replace(name, "NAME"))
        assert len(refusals) == 1


def test_a_default_model_filename_linking_out_of_the_version_directory_is_refused(tmp_path):
    version = tmp_path / "repo" / "m" / "1"
    version.mkdir(parents=True)
    (tmp_path / "exists.txt").write_text("x")
    refusals = []
    for target in (tmp_path / "exists.txt", tmp_path / "absent.txt"):
        (version / "link.onnx").unlink(missing_ok=True)
        (version / "link.onnx").symlink_to(target)
        with pytest.raises(ConfigError, match="links to one outside") as info:
            parse('default_model_filename: "link.onnx"').check_files(version, "model.onnx")
        refusals.append(str(info.value))
    assert len(set(refusals)) == 1
    (version / "model.onnx").write_bytes(b"onnx")
    parse('default_model_filename: "model.onnx"').check_files(version, "model.onnx")  # the artifact's own
    (version / "other.onnx").write_bytes(b"onnx")
    parse('default_model_filename: "other.onnx"').check_files(version, None)  # a plain name it holds
