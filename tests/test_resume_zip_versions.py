"""resume.pt's zip directory and end records: every flipped bit is the one corrupt refusal or loads the same state.

A "version needed to extract" above 6.3 (bits 6 and 7 of a directory entry's byte +6) made zipfile raise
NotImplementedError while the archive was opened, which check_archive did not catch: `python -m train --resume` ended
in a traceback, exit 1. Sweeping every bit also found the MS-DOS directory attribute (bit 4 of the entry's external
attributes): zipfile reads such a member and its CRC-32 passes, but torch's reader (miniz) reads it as empty, so the
tensor loaded as whatever memory held, without a word."""

from __future__ import annotations

import shutil
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from models.checkpoint import CheckpointError
from train.state import RESUME_FILE, capture_rng, load_resume, save_resume

ADVICE = "(changed since it was written: a disk, memory or copy error); nothing was changed: restore resume.pt"
ENTRY = b"PK\x01\x02"  # a central directory entry's signature
VERSION_NEEDED = 6  # offset of "version needed to extract" in a central directory entry
EXTERNAL_ATTRIBUTES = 38  # offset of the external attributes in a central directory entry


def _tiny_state() -> dict:
    """A resume state check_resume accepts, as small as one can be (a few members: the sweep loads it thousands of
    times)."""
    progress = {"epoch": 0, "step_in_epoch": 1, "global_step": 1, "history": [], "train_time_s": 0.1,
                "wall_time_s": 0.2, "cpu_time_s": 0.2, "samples_seen": 16, "segments": 0, "epoch_acc": None,
                "last_eval": None, "started": "2026-01-01T00:00:00Z"}
    return {"config": {"model": "vit_c_micro"}, "steps_per_epoch": 10, "model": {"w": torch.arange(4.0)},
            "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}, "scheduler": {},
            "ema": None, "rng": capture_rng(), "progress": progress}


def _same(a: object, b: object) -> bool:
    """Whether two loaded states are identical (tensors by dtype, shape and value)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and any(isinstance(x, torch.Tensor | dict | list) for x in a):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _entries(data: bytes, start: int) -> list[int]:
    """The offsets of the central directory's entries, from `start` (zipfile's start_dir)."""
    found, at = [], start
    while data.startswith(ENTRY, at):
        found.append(at)
        name, extra, comment = struct.unpack("<HHH", data[at + 28:at + 34])
        at += 46 + name + extra + comment
    return found


def _load(run: Path) -> tuple[str, object]:
    """("loaded", state) or ("refused", its message) for the resume.pt in `run`; anything else escapes the test."""
    try:
        with warnings.catch_warnings():  # a flip torch reads past may warn (an odd pickle protocol): not the point
            warnings.simplefilter("ignore")
            return "loaded", load_resume(run)
    except CheckpointError as exc:
        return "refused", str(exc)


def _assert_corrupt_line(message: str, path: Path) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"cannot read resume state {path}: it is corrupt: "), message
    assert ADVICE in message, message


def test_every_bit_of_the_zip_directory_and_end_records_is_refused_in_one_line_or_loads_the_same(tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    save_resume(original, _tiny_state())
    data = (original / RESUME_FILE).read_bytes()
    with zipfile.ZipFile(original / RESUME_FILE) as z:
        start = z.start_dir
    reference = load_resume(original)
    run = tmp_path / "run"
    run.mkdir()
    path = run / RESUME_FILE
    outcomes = {"loaded": 0, "refused": 0}
    said = set()
    for at in range(start, len(data)):  # the central directory, then the zip64 and end records
        for bit in (at % 8, (at + 4) % 8):  # two bits a byte, every bit position over the bytes (a quarter the time)
            flipped = bytearray(data)
            flipped[at] ^= 1 << bit
            path.write_bytes(flipped)
            outcome, result = _load(run)
            outcomes[outcome] += 1
            if outcome == "loaded":
                assert _same(result, reference), f"byte {at} bit {bit} loaded a different state"
            else:
                _assert_corrupt_line(result, path)
                said.add(result.split(": it is corrupt: ", 1)[1].split(" (", 1)[0])
    assert outcomes["refused"] > 250 and outcomes["loaded"] > 25, outcomes  # both kinds were met
    # Where each showed: the directory as zipfile opened it, a member's entry, its header or CRC, and torch.load.
    assert {"its zip directory cannot be read", "it cannot be read by torch.load"} <= said, said
    assert any(s.endswith("fails its CRC-32 check") for s in said), said
    assert any(s.endswith("has a damaged directory entry") for s in said), said


@pytest.fixture
def stopped(train_stopped, tmp_path) -> Path:
    """A copy of a real TRAIN_TINY run stopped at step 2: checkpoint.json, weights and resume.pt."""
    return Path(shutil.copytree(train_stopped(2), tmp_path / "run"))


def _flip_entries(path: Path, field: int, bit: int) -> list[tuple[str, bytes]]:
    """Each of resume.pt's central entries with `bit` of byte `field` flipped, one at a time: (member, file bytes)."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        start, names = z.start_dir, [m.filename for m in z.infolist()]
    flips = []
    for name, entry in zip(names, _entries(data, start), strict=True):
        flipped = bytearray(data)
        flipped[entry + field] ^= 1 << bit
        flips.append((name, bytes(flipped)))
    return flips


@pytest.mark.parametrize("bit", [6, 7])
def test_a_version_needed_zipfile_does_not_know_is_the_corrupt_refusal_not_a_traceback(stopped, bit):
    """Version 0.0 becomes 6.4 or 12.8: zipfile raised NotImplementedError ("zip file version 12.8") opening it."""
    path = stopped / RESUME_FILE
    for name, flipped in _flip_entries(path, VERSION_NEEDED, bit):
        path.write_bytes(flipped)
        with pytest.raises(CheckpointError) as info:
            load_resume(stopped)
        message = str(info.value)
        _assert_corrupt_line(message, path)
        assert "its zip directory cannot be read (zip file version" in message, (name, message)
        assert "--overwrite trains it again from step 0" in message  # a checkpoint sits beside it


def test_the_train_command_refuses_it_in_one_line_exit_2_touching_nothing(stopped, capsys, train_cli):
    from train.__main__ import main

    path = stopped / RESUME_FILE
    path.write_bytes(_flip_entries(path, VERSION_NEEDED, 7)[0][1])
    before = {p.name: p.read_bytes() for p in stopped.iterdir()}
    code, _, err = train_cli(main, ["--out", str(stopped), "--resume", "--max-steps", "0"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"python -m train: error: cannot read resume state {path}: it is corrupt: its zip "
                               f"directory cannot be read (zip file version 12.8)"), err
    assert {p.name: p.read_bytes() for p in stopped.iterdir()} == before


def test_a_member_marked_a_directory_is_refused_not_loaded_as_uninitialised_memory(stopped):
    """miniz reads a member with the MS-DOS directory attribute as empty: torch.load then returned a tensor of
    whatever memory held, and every CRC-32 passed (zipfile reads the member's bytes whatever its attributes)."""
    path = stopped / RESUME_FILE
    flips = _flip_entries(path, EXTERNAL_ATTRIBUTES, 4)
    tensors = [(name, flipped) for name, flipped in flips if "/data/" in name]
    assert tensors
    for name, flipped in tensors[:3]:
        path.write_bytes(flipped)
        with pytest.raises(CheckpointError) as info:
            load_resume(stopped)
        message = str(info.value)
        _assert_corrupt_line(message, path)
        assert f"member {name!r} has a damaged directory entry (marked a directory)" in message, message


def test_an_io_error_and_a_newer_torch_are_not_called_corrupt(tmp_path, monkeypatch):
    """Only the bytes are corruption: the disk failing says what it said, and a file a newer torch wrote (its
    version record passed its CRC-32) says torch's words."""
    save_resume(tmp_path, _tiny_state())
    path = tmp_path / RESUME_FILE

    def eio(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "open", eio)
        with pytest.raises(CheckpointError, match=rf"^cannot read resume state {path}: Input/output error$"):
            load_resume(tmp_path)
    newer = "Attempted to read a PyTorch file with version 99, but the maximum supported version for reading is 3. " \
            "Your PyTorch installation may be too old."
    with monkeypatch.context() as m:
        m.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(newer)))
        with pytest.raises(CheckpointError) as info:
            load_resume(tmp_path)
        assert str(info.value) == f"cannot read resume state {path}: {newer}"
