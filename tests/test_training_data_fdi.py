"""Training on messy folders (hDI's findings): a file name that is not UTF-8 is trained on like any other, a resume
with another thread count or --compile says it is not bit-identical, unreadable val files are reported and a val class
with no readable image is refused, an image over the pixel limit is named as such, and image files beside the class
directories get a `note:`. Every run here is in-process with --workers 0: nothing forks (see the Makefile's
TRAIN_TESTS)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.datasets import DEFAULT_MAX_IMAGE_PIXELS, load_dataset
from train.__main__ import main as train_main
from train.eval import main as eval_main

LATIN1 = b"caf\xe9"  # "café" as Latin-1: not valid UTF-8, so Python lists it as "caf\udce9"


def folder(root: Path, n: int = 6, val: int = 2) -> Path:
    """root/{train,val}/{a,b}/ with n (train) and `val` (val) 12x12 PNGs per class; returns root."""
    for split, count in (("train", n), ("val", val)):
        for c in "ab":
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(count):
                pixels = np.random.default_rng(100 * ord(c) + i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def raw_path(directory: Path, name: bytes) -> str:
    """directory/name for a file name given as bytes (as os.listdir gives it back)."""
    return os.fsdecode(os.fsencode(directory) + b"/" + name)


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "vit_c_micro", "--dataset", str(root), "--epochs", "1", "--recipe", "small", "--threads", "1",
            "--workers", "0", "--no-ema", "--no-progress", "--out", str(out), *extra]


def training(out: Path) -> dict:
    return json.loads((out / "checkpoint.json").read_text())["training"]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------ 1. file names not UTF-8


def test_a_file_name_that_is_not_utf8_is_trained_on_resumed_and_evaluated(tmp_path, capsys, train_cli):
    """b'caf\\xe9.png' crashed train and train.eval with a UnicodeEncodeError in the fingerprint (exit 1)."""
    data = folder(tmp_path / "d")
    shutil.copy(data / "train" / "a" / "0.png", raw_path(data / "train" / "a", LATIN1 + b".png"))
    shutil.copy(data / "val" / "a" / "0.png", raw_path(data / "val" / "a", LATIN1 + b".png"))
    Path(raw_path(data / "train" / "b", b"br" + LATIN1 + b".png")).write_bytes(b"")  # unreadable, listed in resume.pt
    run = tmp_path / "run"
    # 14 train files in one batch: every file is met at the first step.
    code, _, err = train_cli(train_main, [*args(data, run, "--batch-size", "14", "--max-steps", "1"), "--epochs", "2"],
                             capsys)
    assert code == 0, err
    code, said, err = train_cli(train_main, ["--out", str(run), "--resume", "--max-steps", "0"], capsys)
    assert code == 0, err
    assert "resuming" in said
    t = training(run)
    assert t["train_images"] == 14 and t["val_images"] == 5 and t["corrupt_train_files"] == 1 and t["steps"] == 2
    code, said, err = train_cli(eval_main, ["--checkpoint", str(run), "--out", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    assert "the images the run reported on" in said
    # --corrupt fail names the file in one line, its undecodable byte escaped.
    code, _, err = train_cli(train_main, args(data, tmp_path / "fail", "--batch-size", "14", "--corrupt", "fail"),
                             capsys)
    assert code == 2
    assert "br" + "caf\\udce9.png" in one_line(err)


def test_the_fingerprint_of_utf8_names_is_what_earlier_runs_recorded(tmp_path):
    """Existing checkpoints and resume.pt files recorded prints of the strict UTF-8 encoding: they must still match."""
    data = folder(tmp_path / "d", n=2, val=1)
    shutil.copy(data / "train" / "a" / "0.png", data / "train" / "a" / "café ü.png")
    images = load_dataset(data, "train")
    h = hashlib.sha256()  # the formula of every earlier vitc
    h.update(json.dumps(images.class_names).encode())
    h.update(np.ascontiguousarray(images.labels, "<i8").tobytes())
    for path in images.paths:
        h.update(f"{path.relative_to(images.name).as_posix()}\0{path.stat().st_size}\n".encode())
    assert images.fingerprint() == h.hexdigest()


def test_a_subdirectory_name_that_is_not_utf8_is_noted_escaped(tmp_path, capsys, train_cli):
    """The nested note printed the name raw: stdout (strict UTF-8) raised on its lone surrogate."""
    data = folder(tmp_path / "d")
    os.mkdir(raw_path(data / "train" / "a", LATIN1))
    code, said, err = train_cli(train_main, args(data, tmp_path / "run", "--batch-size", "4"), capsys)
    assert code == 0, err
    assert "note: 1 class directory holds subdirectories, which are not read (e.g. train/a/caf\\udce9)" in said


# ------------------------------------------------------------------------- 2. threads and --compile on resume


def _stopped(tmp_path: Path, train_stopped) -> Path:
    run = tmp_path / "run"
    shutil.copytree(train_stopped(2), run)
    return run


def test_a_resume_with_another_thread_count_says_it_is_not_bit_identical(tmp_path, capsys, train_cli, train_stopped):
    """--threads 1 then --resume --threads 2 went on silently, while README promised bit-identical weights."""
    run = _stopped(tmp_path, train_stopped)
    assert torch.load(run / "resume.pt", weights_only=True)["threads"] == 1  # the effective count, recorded
    same = tmp_path / "same"
    shutil.copytree(run, same)
    code, said, err = train_cli(train_main, ["--out", str(same), "--resume", "--max-steps", "3"], capsys)
    assert code == 0, err
    assert "note:" not in said
    code, said, err = train_cli(train_main, ["--out", str(run), "--resume", "--max-steps", "3", "--threads", "2"],
                                capsys)
    assert code == 0, err
    notes = [line for line in said.splitlines() if line.startswith("note:")]
    assert notes == ["note: this run was trained with 1 CPU thread and goes on with 2 CPU threads: its weights will "
                     "not be bit-identical to an uninterrupted run's (float sums round differently; resume with "
                     "--threads 1 for that)"], said
    assert torch.load(run / "resume.pt", weights_only=True)["threads"] == 2  # what the run now goes on with


def test_a_resume_state_without_a_recorded_thread_count_still_resumes(tmp_path, capsys, train_cli, train_stopped):
    """A resume.pt of an earlier vitc has no "threads": its config's --threads stands in (1 here), quietly."""
    run = _stopped(tmp_path, train_stopped)
    state = torch.load(run / "resume.pt", weights_only=True)
    del state["threads"]
    torch.save(state, run / "resume.pt")
    code, said, err = train_cli(train_main, ["--out", str(run), "--resume", "--max-steps", "3", "--threads", "2"],
                                capsys)
    assert code == 0, err
    assert "note: this run was trained with 1 CPU thread" in said


def test_changed_numerics_names_threads_and_compile_on_the_cpu_only():
    """--compile changes the CPU's float results too (inductor's fused kernels sum in another order)."""
    from train.trainer import changed_numerics

    cpu = torch.device("cpu")
    assert changed_numerics({"threads": 4, "compile": False}, 4, False, cpu) == ""
    assert changed_numerics({"threads": None, "compile": False}, 4, False, cpu) == ""  # not known: nothing said
    both = changed_numerics({"threads": 4, "compile": False}, 2, True, cpu)
    assert both.startswith("note: ") and "4 CPU threads" in both and "--compile" in both, both
    assert "not be bit-identical" in both and "\n" not in both
    assert changed_numerics({"threads": 4, "compile": True}, 2, False, torch.device("cuda", 0)) == ""


# ------------------------------------------------------------------------------------ 3. unreadable val files


def test_unreadable_val_files_are_said_in_the_epoch_and_last_lines_and_metrics(tmp_path, capsys, train_cli):
    """Only checkpoint.json recorded corrupt_val_skipped: the console and metrics.jsonl said nothing."""
    data = folder(tmp_path / "d")
    (data / "val" / "a" / "9.png").write_bytes(b"junk")
    run = tmp_path / "run"
    code, said, err = train_cli(train_main, args(data, run, "--batch-size", "4"), capsys)
    assert code == 0, err
    lines = said.strip().splitlines()
    epoch = next(line for line in lines if line.startswith("epoch 1/1"))
    assert "1 unreadable val file skipped" in epoch, said
    assert lines[-1].startswith("checkpoint ") and "1 unreadable val file skipped" in lines[-1], said
    assert [m["corrupt_val_skipped"] for m in metrics(run)] == [1]
    assert training(run)["corrupt_val_skipped"] == 1


def test_a_val_class_with_no_readable_image_is_refused(tmp_path, capsys, train_cli):
    """val/a held only junk: it was left out of the top-1, and an untrained model scored 100 % on class b alone."""
    data = folder(tmp_path / "d")
    for f in (data / "val" / "a").iterdir():
        f.write_bytes(b"junk")
    code, _, err = train_cli(train_main, args(data, tmp_path / "run", "--batch-size", "4"), capsys)
    assert code == 2
    line = one_line(err)
    assert f"class 'a' of the val split has no readable image (2 files, e.g. {data / 'val' / 'a' / '0.png'})" in line
    assert not (tmp_path / "run").exists()


def test_an_empty_val_class_still_trains(tmp_path, capsys, train_cli):
    """A val class without files is not measured, as before: only one whose files all fail to decode is refused."""
    data = folder(tmp_path / "d")
    for f in (data / "val" / "a").iterdir():
        f.unlink()
    code, _, err = train_cli(train_main, args(data, tmp_path / "run", "--batch-size", "4"), capsys)
    assert code == 0, err


# ---------------------------------------------------------------------------------- 4. over the pixel limit


def _big(path: Path) -> None:
    """A valid PNG of 8000 x 5001 grey pixels: 40,008,000, just over the default limit (a 40 kB file)."""
    Image.new("L", (8000, DEFAULT_MAX_IMAGE_PIXELS // 8000 + 1)).save(path)


def test_an_image_over_the_pixel_limit_is_not_called_corrupt(tmp_path, capsys, train_cli):
    """A 48 MP phone photo was "corrupt or unreadable ... fix its files"; the decoder's reason was dropped."""
    data = folder(tmp_path / "d")
    _big(data / "train" / "b" / "IMG_0001.png")
    code, _, err = train_cli(train_main, args(data, tmp_path / "r1", "--batch-size", "13", "--corrupt", "fail"),
                             capsys)
    assert code == 2
    line = one_line(err)
    assert line.startswith("python -m train: error: image over the pixel limit (not a corrupt or unreadable image): ")
    assert "IMG_0001.png" in line and "pixels, more than the limit of 40000000" in line, line
    assert "downscale" in line, line
    # A class holding only such photos: the reason, and what to do about it.
    for f in (data / "train" / "b").glob("[0-9].png"):
        f.unlink()
    _big(data / "train" / "b" / "IMG_0002.png")
    code, _, err = train_cli(train_main, args(data, tmp_path / "r2", "--batch-size", "4"), capsys)
    assert code == 2
    line = one_line(err)
    assert "class 'b' of the train split has no readable image (2 files" in line, line
    assert "more than the limit of 40000000" in line and "downscale" in line and "fix its files" not in line, line


def test_train_eval_names_the_reason_of_an_unreadable_file(tmp_path, capsys, train_cli):
    data = folder(tmp_path / "d")
    run = tmp_path / "run"
    code, _, err = train_cli(train_main, args(data, run, "--batch-size", "4"), capsys)
    assert code == 0, err
    _big(data / "val" / "b" / "big.png")
    (data / "val" / "a" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, _, err = train_cli(eval_main, ["--checkpoint", str(run), "--corrupt", "fail", "--out",
                                         str(tmp_path / "e.json")], capsys)
    assert code == 2
    line = one_line(err)
    assert "corrupt or unreadable image: " in line and "9.png" in line and "(corrupt PNG" in line, line
    (data / "val" / "a" / "9.png").unlink()
    code, _, err = train_cli(eval_main, ["--checkpoint", str(run), "--corrupt", "fail", "--out",
                                         str(tmp_path / "e.json")], capsys)
    assert code == 2
    line = one_line(err)
    assert "big.png" in line and "more than the limit of 40000000" in line and "downscale" in line, line


# ------------------------------------------------------------------------------- 5. images beside the classes


def test_image_files_directly_under_train_or_val_are_noted(tmp_path, capsys, train_cli):
    """train/stray.jpg and val/stray.jpg were dropped without a word."""
    data = folder(tmp_path / "d")
    shutil.copy(data / "train" / "a" / "0.png", data / "train" / "stray.png")
    shutil.copy(data / "val" / "a" / "0.png", data / "val" / "stray.png")
    shutil.copy(data / "val" / "a" / "0.png", raw_path(data / "val", LATIN1 + b".png"))
    (data / "train" / "notes.txt").write_text("not an image")
    (data / "train" / "._stray.png").write_bytes(b"")  # macOS metadata: hidden, not an image
    code, said, err = train_cli(train_main, args(data, tmp_path / "run", "--batch-size", "4"), capsys)
    assert code == 0, err
    notes = [line for line in said.splitlines() if line.startswith("note:") and "outside" in line]
    assert notes == ["note: 3 image files lie directly in train/ or val/, outside any class directory, and are not "
                     "read (e.g. train/stray.png, val/caf\\udce9.png, val/stray.png): move each into its class's "
                     "directory"], said
    clean = folder(tmp_path / "clean")
    code, said, err = train_cli(train_main, args(clean, tmp_path / "run2", "--batch-size", "4"), capsys)
    assert code == 0, err
    assert "note:" not in said
