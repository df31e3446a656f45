"""Where the file-writing commands may not put `--out`, refused in one line with exit 2 before any work:

- `serve.tensor`: inside the bundle (or the Triton model directory) it reads, an input image, or an existing file
  without `--overwrite`;
- `export`, `train.eval`, `serve.sample`: inside the dataset folder they read (as `train` already refuses);
- all four: a name longer than the file system takes, the temporary written beside it included;
- `export`: a path that is not UTF-8, which the ONNX checker cannot take.

Every refusal happens before the slow part (patched here to fail the test), so the file takes seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_serve_fixtures import LEGACY, one_line

import train.evaluate
from export import bundle as export_bundle
from export import cli as export_cli
from serve import sample, tensor
from train import eval as train_eval

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("Bear", "Bird")


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for directories)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """An ImageNet-layout folder: two classes, two 8x8 PNGs each, in train/ and val/."""
    root = tmp_path_factory.mktemp("data") / "ds"
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * c, 60 * i, 90)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, dataset) -> Path:
    """vit_c_micro trained (so it records) on `dataset`."""
    import torch

    from data.datasets import default_preprocessing
    from models import build_model
    from models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("vit_c_micro", num_classes=len(CLASSES))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", model, class_names=list(CLASSES),
                           preprocessing=default_preprocessing("animals", 32), extra={"dataset": str(dataset)})


@pytest.fixture()
def no_slow_work(monkeypatch) -> None:
    """Fail the test if an export or an evaluation starts."""
    def slow(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the slow work started before --out was checked")

    monkeypatch.setattr(export_bundle, "build_bundle", slow)
    monkeypatch.setattr(export_bundle, "build", slow)  # what export.cli calls
    monkeypatch.setattr(train.evaluate, "evaluate_checkpoint", slow)


def _code(main, args: list[str]) -> int:  # noqa: ANN001 - a CLI entry point
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


# ------------------------------------------------------------------------------------------------ serve.tensor
@pytest.fixture()
def work(tmp_path) -> tuple[Path, Path]:
    """(a copy of the legacy bundle, a 40x40 PNG) in tmp_path."""
    bundle = shutil.copytree(LEGACY, tmp_path / "b")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image := tmp_path / "img.png")
    return bundle, image


def test_tensor_never_writes_inside_the_bundle(work, tmp_path, capsys):
    bundle, image = work
    (tmp_path / "link").symlink_to(bundle)
    before = _tree(tmp_path)
    outs = [(bundle, "manifest.json"), (bundle, "model.onnx.json"), (bundle, "new.npy"), (tmp_path / "link", "x.bin")]
    for where, name in outs:
        for extra in ([], ["--overwrite"]):
            assert tensor.main(["--bundle", str(bundle), str(image), "--out", str(where / name), *extra]) == 2
            assert "lies inside the bundle" in one_line(capsys), (where, name)
    # the same bundle named through a link is the same bundle
    assert tensor.main(["--bundle", str(tmp_path / "link"), str(image), "--out", str(bundle / "x.json")]) == 2
    assert "lies inside the bundle" in one_line(capsys)
    assert _tree(tmp_path) == before


def test_tensor_never_writes_inside_a_triton_model_directory(work, tmp_path, capsys):
    bundle, image = work
    model = tmp_path / "repo" / "m"
    shutil.copytree(bundle, model / "1")
    (model / "config.pbtxt").write_text('name: "m"\n')
    before = _tree(tmp_path)
    for out in (model / "config.json", model / "1" / "x.npy"):
        assert tensor.main(["--bundle", str(model / "1"), str(image), "--out", str(out), "--overwrite"]) == 2
        assert "lies inside the Triton model directory" in one_line(capsys)
    assert _tree(tmp_path) == before


def test_tensor_never_replaces_an_input_image(work, tmp_path, capsys):
    bundle, image = work
    shutil.copy(image, named := tmp_path / "img.json")  # an image named like an output format
    os.link(named, hard := tmp_path / "hard.npy")
    before = _tree(tmp_path)
    for out in (named, hard):
        assert tensor.main(["--bundle", str(bundle), str(named), "--out", str(out), "--overwrite"]) == 2
        assert "is the input image" in one_line(capsys)
    assert _tree(tmp_path) == before


def test_tensor_replaces_an_existing_file_only_with_overwrite(work, tmp_path, capsys):
    bundle, image = work
    (out := tmp_path / "x.bin").write_bytes(b"someone's file")
    assert tensor.main(["--bundle", str(bundle), str(image), "--out", str(out)]) == 2
    assert "already exists; nothing was changed: pass --overwrite" in one_line(capsys)
    assert out.read_bytes() == b"someone's file"
    assert tensor.main(["--bundle", str(bundle), str(image), "--out", str(out), "--overwrite"]) == 0
    assert out.stat().st_size == 4 * 3 * 32 * 32


# ---------------------------------------------------------------------------------------- names too long to write
def _long_cases(tmp_path: Path, checkpoint: Path, bundle: Path, image: Path) -> list[tuple[object, list[str]]]:
    """(main, argv) of each command with a 300-byte name in --out, and of export with a 250-byte one: a valid
    name, but its temporary directory (`.<name>.<8>.tmp`) is not."""
    x300, y250 = tmp_path / ("x" * 296), tmp_path / ("y" * 250)
    return [
        (export_cli.main, ["--checkpoint", str(checkpoint), "--targets", "torch", "--out", str(x300)]),
        (export_cli.main, ["--checkpoint", str(checkpoint), "--targets", "torch", "--out", str(y250)]),
        (train_eval.main, ["--checkpoint", str(checkpoint), "--out", f"{x300}.json"]),
        (sample.main, ["--out", f"{x300}.png"]),
        (tensor.main, ["--bundle", str(bundle), str(image), "--out", f"{x300}.npy"]),
        (sample.main, ["--out", str(x300 / "s.png")]),  # a directory name on the way, too
    ]


def test_a_name_too_long_for_the_file_system_is_one_line_before_the_work(work, checkpoint, tmp_path, capsys,
                                                                           no_slow_work):
    bundle, image = work
    before = _tree(tmp_path)
    for main, argv in _long_cases(tmp_path, checkpoint, bundle, image):
        assert _code(main, argv) == 2, argv
        err = one_line(capsys)
        assert "--out: the name" in err and "bytes; at most" in err, err
    assert _tree(tmp_path) == before


def test_a_name_that_fits_with_its_temporary_is_written(tmp_path, capsys):
    out = tmp_path / ("z" * (255 - 14 - 4) + ".png")  # 241 bytes: the longest the temporary leaves room for
    assert sample.main(["--out", str(out)]) == 0
    assert out.is_file()


# -------------------------------------------------------------------------------------------- export: not UTF-8
def test_export_refuses_an_out_that_is_not_utf8_before_the_work(checkpoint, tmp_path, capsys, no_slow_work):
    out = str(tmp_path) + "/ex\udcff"  # the bytes b"ex\xff" as Python decodes argv
    assert _code(export_cli.main, ["--checkpoint", str(checkpoint), "--targets", "onnx", "--out", out]) == 2
    err = one_line(capsys)
    assert "ex\\xff: the path is not valid UTF-8" in err, err
    assert not os.path.lexists(out)


def test_export_command_line_refuses_a_non_utf8_out(checkpoint, tmp_path):
    out = os.fsencode(tmp_path) + b"/ex\xff"
    proc = subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(checkpoint), "--targets", "onnx",
                           "--out", out], capture_output=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    err = proc.stderr.decode(errors="replace").strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "not valid UTF-8" in err, err
    assert not os.path.lexists(out)


# ----------------------------------------------------------------------------------- --out inside a dataset folder
def _inside_cases(dataset: Path, checkpoint: Path, tmp_path: Path) -> list[tuple[object, list[str]]]:
    (link := tmp_path / "dlink").symlink_to(dataset)
    ckpt = str(checkpoint)
    return [
        (sample.main, ["--dataset", str(dataset), "--out", str(dataset / "val" / "Bird" / "s.png")]),
        (sample.main, ["--dataset", str(link), "--out", str(dataset / "val" / "s.png")]),
        (train_eval.main, ["--checkpoint", ckpt, "--dataset", str(dataset), "--out", str(dataset / "e.json")]),
        (train_eval.main, ["--checkpoint", ckpt, "--out", str(link / "val" / "e.json")]),  # the recorded dataset
        (export_cli.main, ["--checkpoint", ckpt, "--targets", "torch", "--dataset", str(dataset),
                           "--out", str(dataset / "val" / "Bear" / "bundle")]),
        (export_cli.main, ["--checkpoint", ckpt, "--targets", "torch", "--out", str(dataset / "b")]),  # recorded
        (export_cli.main, ["--checkpoint", ckpt, "--targets", "torch", "--dataset", "animals",
                           "--calibration-dataset", str(dataset), "--out", str(dataset / "train" / "b")]),
    ]


def test_an_out_inside_the_dataset_folder_is_refused_before_the_work(dataset, checkpoint, tmp_path, capsys,
                                                                      no_slow_work):
    before = _tree(dataset)
    for main, argv in _inside_cases(dataset, checkpoint, tmp_path):
        assert _code(main, argv) == 2, argv
        err = one_line(capsys)
        assert f"lies inside the dataset folder {dataset}: " in err and "part of the data" in err, err
    assert _tree(dataset) == before


def test_an_out_beside_the_dataset_folder_is_fine(dataset, tmp_path):
    (neighbour := tmp_path / (dataset.name + "2")).mkdir()  # a name that starts like it is not inside it
    assert sample.main(["--dataset", str(dataset), "--out", str(neighbour / "s.png")]) == 0
    assert (neighbour / "s.png").is_file()


def test_an_empty_dataset_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    """`--dataset "$DATA"` with DATA unset read the current directory as the dataset (and train said its --out lay
    inside it)."""
    from data.datasets import DatasetError, load_dataset
    from models.io import out_inside_problem
    from train.config import normalize_dataset

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="the dataset is empty"):
        load_dataset("", "val")
    assert normalize_dataset("") == "" and out_inside_problem("runs/x", "", "the dataset folder", "") is None
