"""A resumed run moves to "the same data at a new path" only when a bounded sample of the files' bytes matches too:
the fingerprints hold names and sizes, so a dataset of the same names and sizes (fixed-size BMPs, a re-rendered
copy) was taken for the run's own. A run recorded before the sample may not move."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import load_dataset
from models.checkpoint import CheckpointError
from train.state import load_resume, save_resume

# 3 classes x 8 images at batch 4: 6 steps an epoch, 12 in all.
BASE = ["--device", "cpu", "--model", "vit_c_micro", "--recipe", "small", "--epochs", "2", "--batch-size", "4",
        "--threads", "1", "--workers", "0", "--no-progress"]


def bmp_folder(root: Path, seed: int, classes: tuple[str, ...] = ("a", "b", "c"), n: int = 8) -> Path:
    """root/{train,val}/<class>/<k>.bmp, 40x40 RGB of noise seeded by `seed` and position, each class a brightness
    of its own: a BMP's size is its dimensions', so folders of other seeds have the same names and sizes."""
    for s, split in enumerate(("train", "val")):
        for i, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                rng = np.random.default_rng([seed, s, i, k])
                arr = (rng.integers(0, 255, (40, 40, 3)) // 4 + i * 60).clip(0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{k}.bmp")
    return root


def _files(root: Path, names: list[str], size: int) -> Path:
    """root/train/a/<name> of `size` zero bytes each (the sample reads bytes, it does not decode them)."""
    d = root / "train" / "a"
    d.mkdir(parents=True)
    for name in names:
        (d / name).write_bytes(bytes(size))
    return root


def _flip(path: Path, at: int) -> None:
    """Change one byte of `path` in place, its size kept."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _sample(root: Path, split: str = "train") -> str:
    return load_dataset(str(root), split).content_sample()


def content_key(split: str) -> str:
    """Where a run's data record keeps a split's content sample (imported here: before the fix there was none)."""
    from data.datasets import content_key as key

    return key(split)


def _without_samples(run: Path) -> dict:
    """run's resume.pt rewritten as a vitc before the content sample wrote it (fingerprints only); its state."""
    state = load_resume(run)
    state["data"] = {split: state["data"][split] for split in ("train", "val")}
    save_resume(run, state)
    return state


def _run(train_cli, capsys, *args: str) -> tuple[int, str, str]:
    from train.__main__ import main

    return train_cli(main, [*BASE, *args], capsys)


def _recorded(run: Path) -> dict:
    return json.loads((run / "checkpoint.json").read_text())["training"]


# ------------------------------------------------------------------------------------------ the content sample
def test_same_names_and_sizes_with_other_pixels_differ_in_their_content_sample(tmp_path):
    e1, e2 = bmp_folder(tmp_path / "e1", 0), bmp_folder(tmp_path / "e2", 7)
    assert (e1 / "train/a/0.bmp").stat().st_size == (e2 / "train/a/0.bmp").stat().st_size
    for split in ("train", "val"):
        one, two = load_dataset(str(e1), split), load_dataset(str(e2), split)
        assert one.fingerprint() == two.fingerprint()  # the fingerprint is unchanged: names and sizes
        assert one.content_sample() != two.content_sample()


def test_a_copy_or_a_moved_folder_has_the_same_content_sample(tmp_path):
    e1 = bmp_folder(tmp_path / "e1", 0)
    before = {split: _sample(e1, split) for split in ("train", "val")}
    shutil.copytree(e1, tmp_path / "copy")
    e1.rename(tmp_path / "moved")
    for split in ("train", "val"):
        assert _sample(tmp_path / "copy", split) == before[split] == _sample(tmp_path / "moved", split)
        assert len(before[split]) == 64 and int(before[split], 16) >= 0  # a sha256 in hex


def test_one_byte_changed_at_a_files_start_or_end_changes_the_sample(tmp_path):
    e1 = bmp_folder(tmp_path / "e1", 0)
    first = e1 / "train/a/0.bmp"
    before = _sample(e1)
    _flip(first, 100)
    assert _sample(e1) != before
    _flip(first, 100)
    assert _sample(e1) == before
    _flip(first, first.stat().st_size - 1)
    assert _sample(e1) != before


def test_only_the_ends_of_a_big_file_are_read(tmp_path):
    """A file of 1 MiB: a byte in its middle (beyond the first and last CONTENT_SAMPLE_BYTES) is not read, one in
    either end is."""
    from data.datasets import CONTENT_SAMPLE_BYTES

    size = 1 << 20
    assert size > 4 * CONTENT_SAMPLE_BYTES
    root = _files(tmp_path / "big", ["0.png"], size)
    big = root / "train/a/0.png"
    before = _sample(root)
    _flip(big, size // 2)
    assert _sample(root) == before
    _flip(big, CONTENT_SAMPLE_BYTES - 1)
    assert _sample(root) != before
    _flip(big, CONTENT_SAMPLE_BYTES - 1)
    _flip(big, size - CONTENT_SAMPLE_BYTES)
    assert _sample(root) != before


def test_the_sample_is_at_most_64_files_spread_over_the_list_first_and_last_included():
    from data.datasets import CONTENT_SAMPLE_FILES, content_sample_indices

    assert CONTENT_SAMPLE_FILES == 64
    assert content_sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    for n in (64, 65, 100, 1000, 1_281_167):
        idx = content_sample_indices(n)
        assert len(idx) == min(n, 64) and idx[0] == 0 and idx[-1] == n - 1
        assert (np.diff(idx) > 0).all()  # sorted, no file twice
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1  # evenly strided
    assert content_sample_indices(0).tolist() == []


def test_a_file_outside_the_sample_is_not_read_and_the_last_one_is(tmp_path):
    from data.datasets import content_sample_indices

    names = [f"{k:03d}.png" for k in range(200)]
    root = _files(tmp_path / "many", names, 100)
    unsampled = sorted(set(range(200)) - set(content_sample_indices(200).tolist()))[0]
    before = _sample(root)
    _flip(root / "train/a" / names[unsampled], 0)
    assert _sample(root) == before
    _flip(root / "train/a" / names[-1], 0)
    assert _sample(root) != before


def test_an_unreadable_file_is_recorded_as_such_not_raised(tmp_path):
    """A link that leads nowhere is listed (counted as unreadable when decoded): its sample says so, the same
    wherever the folder lies, and differs from a readable file of that name."""
    roots = []
    for name in ("one", "two"):
        root = _files(tmp_path / name, ["0.png"], 100)
        (root / "train/a/1.png").symlink_to(tmp_path / "nowhere.png")
        roots.append(root)
    dangling = _sample(roots[0])
    assert dangling == _sample(roots[1]) == _sample(roots[0])
    (tmp_path / "nowhere.png").write_bytes(bytes(100))  # the link leads to a file now
    assert _sample(roots[0]) != dangling


def test_an_embedded_set_has_no_content_sample_its_fingerprint_hashes_its_pixels():
    for split in ("train", "val"):
        assert load_dataset("digits", split).content_sample() is None


# ------------------------------------------------------------------------------------------------- resumes
@pytest.fixture
def stopped(tmp_path, train_cli, capsys) -> tuple[Path, Path]:
    """A run stopped at step 3 of 12 on the BMP folder tmp_path/e1 (seed 0): (run, e1)."""
    e1, run = bmp_folder(tmp_path / "e1", 0), tmp_path / "run"
    code, _, err = _run(train_cli, capsys, "--dataset", str(e1), "--out", str(run), "--max-steps", "3")
    assert code == 0, err
    return run, e1


def test_a_folder_run_records_the_content_samples_beside_its_fingerprints(stopped, tmp_path, train_cli, capsys,
                                                                          train_tiny):
    run, e1 = stopped
    data = load_resume(run)["data"]
    assert data[content_key("train")] == _sample(e1, "train") and data[content_key("val")] == _sample(e1, "val")
    assert data["train"] == load_dataset(str(e1), "train").fingerprint()  # the fingerprint itself is unchanged
    assert _recorded(run)["data"] == data  # checkpoint.json's training data: the same record
    # An embedded set records its fingerprints alone (they hash its pixels), as before.
    from train.__main__ import main

    code, _, err = train_cli(main, [*train_tiny, "--out", str(tmp_path / "tiny"), "--max-steps", "1"], capsys)
    assert code == 0, err
    assert sorted(load_resume(tmp_path / "tiny")["data"]) == sorted(_recorded(tmp_path / "tiny")["data"]) == [
        "train", "val"]


def test_resume_on_other_pixels_of_the_same_names_and_sizes_at_a_new_path_is_refused(stopped, tmp_path, train_cli,
                                                                                    capsys):
    """The review's repro: two BMP sets of the same layout and other pixels. The move was accepted as "the same
    files", and the other set became the run's recorded dataset."""
    run, e1 = stopped
    e2 = bmp_folder(tmp_path / "e2", 7)
    code, out, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "4", "--dataset", str(e2))
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m train: error: --resume: the data at {e2} are not the data this run "
                               f"started with at {e1} (the same file names and sizes, but the sampled contents of "
                               "the train and val data differ: "), err
    assert lines[0].endswith("): pass --dataset with the run's own data, or train into a new --out"), err
    state = load_resume(run)
    assert state["config"]["dataset"] == str(e1) and state["progress"]["global_step"] == 3  # nothing changed
    assert _recorded(run)["dataset"] == str(e1)


def test_one_file_changed_in_a_copy_of_the_same_size_is_refused(stopped, tmp_path, train_cli, capsys):
    run, e1 = stopped
    copy = tmp_path / "copy"
    shutil.copytree(e1, copy)
    _flip(copy / "val/c/7.bmp", 200)  # the last val file: always in the sample
    code, _, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "4", "--dataset", str(copy))
    assert code == 2
    assert "(the same file names and sizes, but the sampled contents of the val data differ: " in err, err


def test_resume_on_a_copy_at_a_new_path_goes_on_and_says_what_was_compared(stopped, tmp_path, train_cli, capsys):
    run, e1 = stopped
    new = tmp_path / "new"
    e1.rename(new)
    code, out, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "4", "--dataset", str(new))
    assert code == 0, err
    notes = [line for line in out.splitlines() if line.startswith("note:")]
    assert notes == [f"note: the run's data moved from {e1} to {new} (the same file names, sizes and sampled "
                     f"contents): the run goes on with the data at {new}"], out
    state = load_resume(run)
    assert state["config"]["dataset"] == str(new) and state["progress"]["global_step"] == 4
    assert state["data"][content_key("train")] == _sample(new, "train")


def test_a_resume_state_without_content_samples_cannot_move_and_still_resumes_in_place(stopped, tmp_path, train_cli,
                                                                                       capsys):
    """A resume.pt written before the sample (fingerprints only): loaded and resumed where its data lie, but not
    moved, since names and sizes alone cannot show the files there are the run's."""
    run, e1 = stopped
    _without_samples(run)
    new = tmp_path / "new"
    shutil.copytree(e1, new)
    code, out, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "4", "--dataset", str(new))
    assert code == 2, out + err
    assert err.strip().splitlines() == [
        f"python -m train: error: --resume cannot move this run to {new}: its resume.pt predates the sampled file "
        f"contents that, with the file names and sizes, would show the files are the ones at {e1}; put them back "
        "there (or a link to them)"], err
    assert load_resume(run)["config"]["dataset"] == str(e1)
    code, out, err = _run(train_cli, capsys, "--out", str(run), "--resume", "--max-steps", "4")
    assert code == 0, err
    assert "resuming" in out and "note:" not in out
    assert load_resume(run)["data"][content_key("train")] == _sample(e1, "train")  # recorded from now on


def test_the_trainer_itself_refuses_a_move_without_content_samples(stopped, tmp_path):
    """The check of the run's data (`Trainer._check_same_data`), also for a config built without the CLI's."""
    import torch

    from train.config import ConfigError, resolve_config
    from train.distributed import DistInfo
    from train.trainer import Trainer

    run, e1 = stopped
    state = _without_samples(run)
    new = tmp_path / "new"
    shutil.copytree(e1, new)
    cfg = resolve_config({"out": str(run), "resume": True, "dataset": str(new), "max_steps": 4, "device": "cpu",
                          "threads": 1, "workers": 0, "progress": False}, state["config"], movable_data=True)
    threads = torch.get_num_threads()  # the trainer sets the process's: restored for the other tests
    try:
        trainer = Trainer(cfg, DistInfo(0, 1, 0, 1, torch.device("cpu")))
        with pytest.raises(ConfigError, match=r"predates the sampled file contents .* put them back there"):
            trainer.restore()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("value", [5, None, b"ab", ["x"]])
def test_a_malformed_content_sample_in_resume_pt_is_refused_as_damaged(stopped, value):
    run, _ = stopped
    state = load_resume(run)
    state["data"][content_key("val")] = value
    save_resume(run, state)
    with pytest.raises(CheckpointError, match=r"resume.pt is damaged or from another run: data.val_content: "):
        load_resume(run)
