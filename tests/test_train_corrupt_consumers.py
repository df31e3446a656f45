"""Corrupt files in a folder dataset, past training: every reader of its images (export's parity and golden images,
INT8 calibration, serve.sample) leaves them out and counts them as training does, and too few readable images is
one line, exit 2 (data.datasets `ImageSet.readable_subset`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import DatasetError, load_dataset

EXPORT_ERROR = "python -m export: error: "

EXPORT = ["--max-batch", "4", "--parity-samples", "16", "--threads", "1"]


def make_folder(root: Path, n: int = 6) -> Path:
    """root/{train,val}/{a,b}/ with n 36x36 PNGs per class; returns root."""
    for split in ("train", "val"):
        for c, cls in enumerate("ab"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                pixels = np.random.default_rng(10 * c + i).integers(0, 255, (36, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_cli) -> tuple[Path, Path]:
    """(dataset folder, a vit_c_micro checkpoint trained on it for one epoch)."""
    from train.__main__ import main as train_main

    base = tmp_path_factory.mktemp("consumers")
    data = make_folder(base / "data")
    code, _, _ = train_cli(train_main, ["--model", "vit_c_micro", "--dataset", str(data), "--epochs", "1",
                                        "--batch-size", "4", "--threads", "1", "--workers", "0",
                                        "--out", str(base / "run")])
    assert code == 0
    return data, base / "run"


def _copy(trained: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A writable copy of the dataset, and a checkpoint that names the copy as its dataset."""
    data, run = (Path(shutil.copytree(p, tmp_path / p.name)) for p in trained)
    meta = json.loads((run / "checkpoint.json").read_text())
    meta["dataset"] = str(data)
    (run / "checkpoint.json").write_text(json.dumps(meta))
    return data, run


def test_readable_subset_is_subset_unless_files_are_corrupt(tmp_path):
    data = make_folder(tmp_path / "d", n=10)
    val = load_dataset(data, "val")
    plain = val.readable_subset(7, seed=0)
    assert plain.skipped == () and plain.images.paths == val.subset(7, seed=0).paths
    victim = plain.images.paths[2]
    victim.write_bytes(b"")
    drawn = val.readable_subset(7, seed=0)
    # The corrupt file is left out and counted; the next file of the same seeded order takes its place.
    assert drawn.skipped == (victim,) and len(drawn.images) == 7 and victim not in drawn.images.paths
    assert set(plain.images.paths) - {victim} < set(drawn.images.paths)
    assert drawn.note() == ", 1 unreadable file skipped"
    with pytest.raises(DatasetError, match="corrupt or unreadable image"):
        val.image(val.paths.index(victim))  # one line, not PIL's UnidentifiedImageError
    for p in val.paths:
        p.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"0 readable val images, at least 1 needed; 20 files are corrupt"):
        val.readable_subset(7, seed=0)


def test_export_skips_a_corrupt_parity_image_and_records_it(trained, tmp_path, capsys):
    from export import cli
    from models.bundle import read_manifest

    data, run = _copy(trained, tmp_path)
    (data / "val" / "a" / "3.png").write_bytes(b"")
    rc = cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "bundle"), "--targets", "torch", *EXPORT])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "parity on 11 " in err and "1 unreadable file skipped" in err, err
    manifest = read_manifest(tmp_path / "bundle")
    torch_fp32 = manifest.artifacts[0]
    assert torch_fp32.servable and torch_fp32.parity.val_samples == 11, torch_fp32.refused_reason
    assert torch_fp32.info["parity_unreadable_skipped"] == 1
    assert manifest.golden is not None and manifest.golden.samples == 8


def test_export_with_no_readable_parity_image_is_one_line(trained, tmp_path, capsys):
    from export import cli

    data, run = _copy(trained, tmp_path)
    for p in (data / "val").rglob("*.png"):
        p.write_bytes(b"")
    rc = cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "bundle"), "--targets", "torch", *EXPORT])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(EXPORT_ERROR + "parity data: "), err
    assert "0 readable" in err[0], err
    assert not (tmp_path / "bundle").exists()


def test_int8_calibration_skips_corrupt_train_images(trained, tmp_path, capsys):
    from models.checkpoint import load_checkpoint
    from runtimes.build import ExportContext, ExportError

    data, run = _copy(trained, tmp_path)
    model, meta = load_checkpoint(run)
    train = load_dataset(data, "train")
    train.subset(5, seed=1).paths[0].write_bytes(b"")  # one of the images calibration draws
    ctx = ExportContext(model=model, meta=meta, workdir=tmp_path, max_batch=4, opset=20,
                        calibration_set=lambda: train, calibration_samples=5)
    batches = list(ctx.calibration_batches())
    assert len(batches) == 5 and all(b.shape == (1, 3, 32, 32) for b in batches)
    info = ctx.calibration_info()
    assert info["samples"] == 5 and info["unreadable_skipped"] == 1 and len(info["fingerprint"]) == 64

    for p in train.paths:
        p.write_bytes(b"")
    ctx = ExportContext(model=model, meta=meta, workdir=tmp_path, max_batch=4, opset=20,
                        calibration_set=lambda: train, calibration_samples=5)
    with pytest.raises(ExportError, match="calibration data: .*0 readable train images"):
        ctx.calibration_images()


def test_export_int8_with_no_readable_train_image_is_one_line_before_any_build(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from export import cli

    data, run = _copy(trained, tmp_path)
    for p in (data / "train").rglob("*.png"):
        p.write_bytes(b"")
    rc = cli.main(["--checkpoint", str(run), "--out", str(tmp_path / "bundle"), "--targets", "onnx-int8", *EXPORT])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith(EXPORT_ERROR + "calibration data: "), err
    assert "0 readable train images" in err[-1], err
    assert not any("Traceback" in line for line in err) and not (tmp_path / "bundle").exists()


def test_sample_takes_the_next_readable_image(tmp_path, capsys):
    from serve.sample import main

    data = make_folder(tmp_path / "d", n=3)
    (data / "val" / "a" / "1.png").write_bytes(b"")
    out = tmp_path / "s.png"
    assert main(["--dataset", str(data), "--index", "1", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "val #2 (1 unreadable from val #1 on, skipped), label a" in said, said
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(data / "val" / "a" / "2.png")))
    for p in (data / "val").rglob("*.png"):
        p.write_bytes(b"")
    assert main(["--dataset", str(data), "--index", "0", "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0 readable val images" in err[0], err


def test_the_served_path_check_skips_a_corrupt_image(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from export import cli
    from export.served import measure

    data, run = _copy(trained, tmp_path)
    bundle = tmp_path / "bundle"
    assert cli.main(["--checkpoint", str(run), "--out", str(bundle), "--targets", "onnx", *EXPORT]) == 0
    load_dataset(data, "val").subset(6, seed=0).paths[0].write_bytes(b"")  # one the check would send
    said: list[str] = []
    record = measure(bundle, "onnxruntime", samples=6, log=said.append)
    assert record.samples == 6 and "6 " in said[0] and "1 unreadable file skipped" in said[0], said
