"""Unreadable training files: each is replaced by the next readable image of its own class, a class with none is
refused before training (or named, if it loses them during the run), the count of replaced samples is one per
sample (a run stopped on a run of broken files resumes), and the console says how many files were replaced."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import DatasetError, UnreadableImage, default_preprocessing, load_dataset
from models.cli import error_reason
from train.__main__ import main as train_main
from train.pipeline import TrainImages, epoch_permutation
from train.trainer import met_by, replaced_text


def folder(root: Path, broken: dict[str, int], good: int = 6) -> Path:
    """root/{train,val}/{a,b}/ with `good` 12x12 PNGs per class, plus broken[c] empty files train/c/x<i>.png (sorted
    after the good ones; a class only `broken` names holds nothing else)."""
    for split in ("train", "val"):
        for c in "ab":
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(good if split == "train" else 2):
                pixels = np.random.default_rng(100 * ord(c) + i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    for c, n in broken.items():
        (root / "train" / c).mkdir(exist_ok=True)
        for i in range(n):
            (root / "train" / c / f"x{i}.png").write_bytes(b"")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "vit_c_micro", "--dataset", str(root), "--epochs", "1", "--threads", "1", "--workers", "0",
            "--no-ema", "--no-progress", "--out", str(out), *extra]


def _training(out: Path) -> dict:
    return json.loads((out / "checkpoint.json").read_text())["training"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_stopped_on_a_run_of_unreadable_files_resumes(tmp_path, capsys, train_cli):
    """8 broken files side by side: the sample of the first stood in for all 8 and counted 8 after 4 samples, so the
    run refused its own resume.pt ("progress.epoch_acc.corrupt is 8, more than its 4 samples")."""
    data = folder(tmp_path / "d", {"a": 8})
    paths = [str(p) for p in load_dataset(data, "train").paths]
    first = paths.index(str(data / "train" / "a" / "x0.png"))
    seed = next(s for s in range(500) if first in epoch_permutation(len(paths), s, 0)[:4].tolist())
    run = tmp_path / "run"
    code, _, err = train_cli(train_main, _args(data, run, "--batch-size", "2", "--seed", str(seed), "--max-steps",
                                               "2"), capsys)
    assert code == 0, err
    code, said, err = train_cli(train_main, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err
    assert "resuming" in said
    t = _training(run)
    assert t["steps"] == len(paths) // 2 and t["corrupt_train_files"] == 8
    # One epoch meets each of the 20 files once: 8 samples were replaced, one each.
    assert [m["corrupt_train_replaced"] for m in _metrics(run)] == [8]


def test_the_count_of_replaced_samples_and_files_is_said_on_the_console(tmp_path, capsys, train_cli):
    """3 broken files side by side counted 3 + 2 + 1 = 6 replaced samples, and the console said nothing."""
    data = folder(tmp_path / "d", {"a": 3})
    run = tmp_path / "run"
    code, said, err = train_cli(train_main, _args(data, run, "--batch-size", "3"), capsys)  # 15 files: all met
    assert code == 0, err
    assert [m["corrupt_train_replaced"] for m in _metrics(run)] == [3]
    assert _training(run)["corrupt_train_files"] == 3
    final = said.strip().splitlines()[-1]
    assert final.startswith(f"checkpoint {run}") and "3 unreadable train files replaced by other images of their " \
        "class" in final, said
    # A resume knows them before it trains: its summary line says the train files count them.
    shutil.rmtree(run)
    code, _, err = train_cli(train_main, _args(data, run, "--batch-size", "3", "--max-steps", "4"), capsys)
    assert code == 0, err
    code, said, err = train_cli(train_main, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err
    summary = next(line for line in said.splitlines() if " train / " in line)
    assert "15 train / 4 val images" in summary and "unreadable so far" in summary, said


def test_an_unreadable_file_is_replaced_by_the_next_readable_image_of_its_class(tmp_path):
    """It was the next file in the whole split's order: the last files of a class stood in for by the next class's
    first image, with that class's label (class balance and labels wrong)."""
    data = folder(tmp_path / "d", {"a": 2})
    images = load_dataset(data, "train")
    paths = [str(p) for p in images.paths]
    spec = default_preprocessing(str(data), 32)
    train = TrainImages(images, spec, "none", 1.0, 0.0, seed=0)
    x0, x1, a0 = (paths.index(str(data / "train" / "a" / n)) for n in ("x0.png", "x1.png", "0.png"))
    image, label, replaced = train[(0, x0)][:3]
    assert label == 0 and replaced == (paths[x0], paths[x1])  # wrapped round to a/0.png, not on to b/0.png
    assert np.array_equal(image.numpy(), train[(0, a0)][0].numpy())
    assert train[(0, x1)][2] == (paths[x1],) and train[(0, a0)][2] == ()


@pytest.mark.parametrize(("name", "count"), [("b2", 3), ("0z", 70)])
def test_a_class_with_no_readable_image_is_refused_before_training_by_name(tmp_path, capsys, train_cli, name,
                                                                          count):
    """b2 (sorted in the middle, 3 files) trained "successfully" as an output never trained; 0z (sorted first, 70
    files) was refused as "none of the first 64 files of the train split is readable"; 64 files in the middle
    failed mid-epoch."""
    data = folder(tmp_path / "d", {name: count})
    run = tmp_path / "run"
    code, _, err = train_cli(train_main, _args(data, run, "--batch-size", "4"), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert (f"class {name!r} of the train split has no readable image ({count} files, e.g. "
            f"{data / 'train' / name / 'x0.png'}): remove the directory or fix its files") in lines[0], err
    assert not run.exists()


def test_a_class_no_rank_0_reads_is_refused_naming_the_rank_that_met_it(tmp_path):
    """Under torchrun the ranks share the classes to check, and each raised the same error, printed by rank 0: class
    'b', read by rank 1, was said as rank 0's."""
    import torch

    from train.config import config_from_options
    from train.distributed import DistInfo
    from train.trainer import Trainer

    data = folder(tmp_path / "d", {"b": 0})
    for path in (data / "train" / "b").iterdir():
        path.write_bytes(b"")
    cfg = config_from_options({"model": "vit_c_micro", "dataset": str(data), "out": str(tmp_path / "run"),
                               "epochs": 1, "batch_size": 2, "threads": 1, "workers": 0, "device": "cpu",
                               "progress": False, "ema": False})
    # Rank 1 of 2 outside a process group: its flags are the whole sum, so what it met alone decides.
    with pytest.raises(DatasetError) as caught:
        Trainer(cfg, DistInfo(1, 2, 1, 2, torch.device("cpu")))
    assert str(caught.value).startswith("class 'b' of the train split has no readable image (6 files, ")
    assert str(caught.value).endswith(" (met by rank 1)"), caught.value


def test_met_by_names_each_rank_once_and_no_rank_for_one_process():
    assert met_by([2.0], 2) == " (met by rank 1)"
    assert met_by([2.0, 0.0, 1.0, 2.0], 4) == " (met by ranks 0, 1)"
    assert met_by([1.0], 1) == ""


def test_a_class_whose_files_become_unreadable_during_the_run_is_named(tmp_path):
    """Checked readable at the start, then broken underneath the run (read in a DataLoader worker): a one-line error
    naming the class, without the worker's traceback or the exception's internal name."""
    from train.config import config_from_options
    from train.distributed import setup
    from train.trainer import Trainer

    data = folder(tmp_path / "d", {})
    cfg = config_from_options({"model": "vit_c_micro", "dataset": str(data), "out": str(tmp_path / "run"),
                               "epochs": 1, "batch_size": 4, "threads": 1, "workers": 1, "device": "cpu",
                               "progress": False, "ema": False})
    trainer = Trainer(cfg, setup("cpu"))
    for path in (data / "train" / "b").iterdir():
        path.write_bytes(b"")
    with pytest.raises(UnreadableImage) as caught:
        trainer.run()
    reason = error_reason(caught.value)
    assert reason.startswith("class 'b' of the train split has no readable image left (6 files, e.g. "), reason
    assert "UnreadableImage" not in reason and "\n" not in reason


def test_a_resume_after_the_last_epoch_says_it_writes_the_checkpoint(tmp_path, capsys, train_cli, train_tiny):
    """Killed after the last epoch's resume.pt, before the checkpoint: it said "resuming at epoch 2" of 1."""
    run = tmp_path / "run"
    code, _, err = train_cli(train_main, [*train_tiny, "--out", str(run)], capsys)
    assert code == 0, err
    (run / "checkpoint.json").unlink()
    for weights in run.glob("weights-*.safetensors"):
        weights.unlink()
    code, said, err = train_cli(train_main, ["--out", str(run), "--resume"], capsys)
    assert code == 0, err
    assert f"resuming {run} after its last epoch (1/1): writing the checkpoint" in said, said
    assert "at epoch 2" not in said and (run / "checkpoint.json").is_file()


def _subset_seed(data: Path, n: int, drawn: Callable[[list[str]], bool]) -> int:
    """The first --seed whose --train-subset n draws the train files (relative paths) `drawn` accepts."""
    images = load_dataset(data, "train")
    return next(s for s in range(2000) if drawn([p.relative_to(data / "train").as_posix()
                                                for p in images.subset(n, seed=s).paths]))


def test_a_subset_that_draws_only_broken_files_of_a_class_trains_on_the_class_s_other_files(tmp_path, capsys,
                                                                                            train_cli):
    """--train-subset drew only broken files of class b: refused as "class 'b' ... has no readable image (2 files):
    remove the directory or fix its files", though b/ held 6 readable images. They stand in for them now."""
    data = folder(tmp_path / "d", {"b": 6})
    seed = _subset_seed(data, 6, lambda rel: any(r.startswith("b/") for r in rel)
                        and all(r.startswith(("a/", "b/x")) for r in rel))
    broken = sum(1 for p in load_dataset(data, "train").subset(6, seed=seed).paths if p.name.startswith("x"))
    run = tmp_path / "run"
    code, said, err = train_cli(train_main, _args(data, run, "--batch-size", "2", "--train-subset", "6", "--seed",
                                                  str(seed)), capsys)
    assert code == 0, err
    final = said.strip().splitlines()[-1]
    assert replaced_text(broken) in final, said
    t = _training(run)
    assert t["corrupt_train_files"] == broken and t["train_images"] == 6
    # The data a resume compares is the subset as drawn: what it would have been without the broken files.
    assert t["data"]["train"] == load_dataset(data, "train").subset(6, seed=seed).fingerprint()


def test_a_subset_s_unreadable_file_is_replaced_from_its_class_s_full_listing(tmp_path):
    """The replacement was searched among the subset's own files of the class: none when it drew only broken ones."""
    data = folder(tmp_path / "d", {"b": 3})
    listing = load_dataset(data, "train")
    paths = [str(p) for p in listing.paths]
    x1, b0 = paths.index(str(data / "train" / "b" / "x1.png")), paths.index(str(data / "train" / "b" / "0.png"))
    picked = np.asarray([0, x1])  # a/0.png and b/x1.png: b/x2.png (not drawn) and then b/0.png follow x1
    spec = default_preprocessing(str(data), 32)
    train = TrainImages(listing.take(picked), spec, "none", 1.0, 0.0, seed=0, source=(listing, picked))
    whole = TrainImages(listing, spec, "none", 1.0, 0.0, seed=0)
    sample = train[(0, 1)]
    assert sample.found and sample.label == 1
    assert sample.replaced == (paths[x1],)  # b/x2.png was passed over too, but it is no image of this run
    assert np.array_equal(sample.image.numpy(), whole[(0, b0)].image.numpy())  # wrapped round to b/0.png


def test_a_class_with_no_readable_image_is_named_with_its_whole_directory_under_a_subset(tmp_path, capsys,
                                                                                          train_cli):
    """Under --train-subset the refusal counted the subset's files of the class ("1 file"), not the directory's."""
    data = folder(tmp_path / "d", {"c": 5})
    seed = _subset_seed(data, 6, lambda rel: any(r.startswith("c/") for r in rel))
    code, _, err = train_cli(train_main, _args(data, tmp_path / "run", "--batch-size", "2", "--train-subset", "6",
                                               "--seed", str(seed)), capsys)
    assert code == 2, err
    assert (f"class 'c' of the train split has no readable image (5 files, e.g. {data / 'train' / 'c' / 'x0.png'}): "
            "remove the directory or fix its files") in err, err
