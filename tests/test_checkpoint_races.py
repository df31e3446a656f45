"""What a training leaves or rewrites in a checkpoint directory, seen by the next run and by an export.

safetensors' own temporary (`.tmp` + 6 characters) has an ordinary name: a user's `.tmpbackup` in --out made the
directory count as empty and the training deleted it. And an export racing `train --overwrite` on its checkpoint
wrote a bundle without its torch-fp32 reference (the weights file gone before it was copied), exit 0.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_TINY, train_run_cli
from safetensors.torch import save

import runtimes
from export import bundle as export_bundle
from export import cli
from export.bundle import build_bundle
from models.bundle import read_manifest
from models.checkpoint import read_checkpoint_meta
from runtimes import ExportError
from train.state import clear_stale_temporaries, safetensors_temporary

SAFETENSORS = save({"x": torch.zeros(4)})  # what a killed save leaves: a safetensors file, header first
NOTES = b"my notes\n"
CHANGED = "changed while it was exported (a training is writing it?): export it again when it has finished"
EXPORT = {"max_batch": 4, "parity_samples": 8, "threads": 1}


def _train(argv: list[str]) -> int:
    from train.__main__ import main

    return train_run_cli(main, [*TRAIN_TINY, *argv])[0]


# ------------------------------------------------------------------------------------- safetensors' temporary
def test_only_a_safetensors_file_of_that_name_is_taken_for_its_temporary(tmp_path):
    cases = {".tmpA1b2C3": SAFETENSORS, ".tmpbackup": NOTES, ".tmp123456": b"", ".tmpXyZ789": b"\x10" + bytes(7),
             ".tmpbackupx": SAFETENSORS, "tmpA1b2C3": SAFETENSORS}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / ".tmpLinkd1").symlink_to(tmp_path / ".tmpA1b2C3")
    (tmp_path / ".tmpDirAb").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir() if safetensors_temporary(p)) == [".tmpA1b2C3"]


def test_a_users_tmp_file_in_a_directory_without_a_run_is_kept(tmp_path):
    (tmp_path / ".tmpbackup").write_bytes(NOTES)
    (tmp_path / ".tmpA1b2C3").write_bytes(SAFETENSORS)  # a safetensors file, but no run here: not ours to judge
    (tmp_path / ".resume.pt.ab12cd34.tmp").write_bytes(b"x")
    clear_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmpA1b2C3", ".tmpbackup"]


def test_in_a_run_directory_only_safetensors_temporary_goes(tmp_path, micro_checkpoint):
    run = micro_checkpoint(tmp_path)
    (run / ".tmpbackup").write_bytes(NOTES)
    (run / ".tmp123456").write_bytes(b"not safetensors")
    (run / ".tmpA1b2C3").write_bytes(SAFETENSORS)
    clear_stale_temporaries(run)
    names = {p.name for p in run.iterdir()}
    assert ".tmpA1b2C3" not in names and {".tmpbackup", ".tmp123456"} <= names


@pytest.mark.parametrize("data", [NOTES, SAFETENSORS], ids=["notes", "safetensors"])
def test_train_refuses_an_out_holding_only_a_tmp_file_and_keeps_it(tmp_path, data):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmpbackup").write_bytes(data)
    code = _train(["--out", str(out)])
    assert code == 2
    assert sorted(p.name for p in out.iterdir()) == [".tmpbackup"] and (out / ".tmpbackup").read_bytes() == data


def test_resume_clears_a_killed_saves_temporary_and_keeps_the_users(tmp_path, train_stopped):
    run = tmp_path / "run"
    shutil.copytree(train_stopped(2), run)
    (run / ".tmpA1b2C3").write_bytes(SAFETENSORS)
    (run / ".tmpbackup").write_bytes(NOTES)
    code = _train(["--out", str(run), "--resume"])
    assert code == 0
    names = {p.name for p in run.iterdir()}
    assert ".tmpA1b2C3" not in names and (run / ".tmpbackup").read_bytes() == NOTES


# ------------------------------------------------------------------------------------- export vs. a training
def _weights(ckpt: Path) -> Path:
    return read_checkpoint_meta(ckpt).weights_path


def _while_exporting(monkeypatch, act) -> None:  # noqa: ANN001
    """Run `act()` once the export has read the checkpoint, in the middle of its work (after the torch logits)."""
    real = export_bundle.parity_data

    def parity_data(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        data = real(*args, **kwargs)
        act()
        return data

    monkeypatch.setattr(export_bundle, "parity_data", parity_data)


def _overwrite_starts(ckpt: Path) -> None:
    """What `train --overwrite` does at its first save: the old checkpoint.json and weights are removed."""
    weights = _weights(ckpt)
    (ckpt / "checkpoint.json").unlink()
    weights.unlink()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_checkpoint_removed_during_the_export_stops_it_with_nothing_written(tmp_path, micro_checkpoint,
                                                                            monkeypatch):
    ckpt = micro_checkpoint(tmp_path)
    _while_exporting(monkeypatch, lambda: _overwrite_starts(ckpt))
    with pytest.raises(ExportError, match="changed while it was exported"):
        build_bundle(ckpt, tmp_path / "b", ["torch"], **EXPORT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "a bundle, temporary or lock left behind"


def test_a_checkpoint_replaced_during_the_export_keeps_the_previous_bundle(tmp_path, micro_checkpoint,
                                                                          monkeypatch, capsys):
    ckpt = micro_checkpoint(tmp_path)
    out = tmp_path / "b"
    build_bundle(ckpt, out, ["torch"], **EXPORT)
    before = _tree(out)
    other = micro_checkpoint(tmp_path / "other")  # the same seed: make its weights differ
    from models.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(other)
    with torch.no_grad():
        model.head.bias.add_(1.0)

    def new_run_publishes() -> None:  # a training's final save: new weights, checkpoint.json, old weights removed
        save_checkpoint(ckpt, model, class_names=list(meta.class_names), preprocessing=meta.preprocessing,
                        extra={"dataset": "animals"})

    _while_exporting(monkeypatch, new_run_publishes)
    rc = cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--targets", "torch", "--max-batch", "4",
                   "--parity-samples", "8", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and err.splitlines()[-1] == f"python -m export: error: checkpoint {ckpt} {CHANGED}"
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "ckpt", "other"]


@pytest.mark.parametrize("proc", [True, False])
def test_the_torch_artifact_is_the_verified_weights_even_if_the_file_goes_away_meanwhile(tmp_path, micro_checkpoint,
                                                                                       monkeypatch, proc):
    """The weights leave the checkpoint while the export works and come back before it ends (the checkpoint is
    unchanged at the end): the torch-fp32 artifact is copied from the bytes read, not refused. Where /proc/self/fd
    cannot reopen the open weights, they are copied into the export's scratch (removed before the bundle is
    written), still from the file it opened, not from the checkpoint directory."""
    ckpt = micro_checkpoint(tmp_path)
    weights, aside = _weights(ckpt), tmp_path / "aside"
    original = weights.read_bytes()
    if not proc:
        monkeypatch.setattr(export_bundle, "same_file", lambda a, b: False)
    _while_exporting(monkeypatch, lambda: weights.rename(aside))
    torch_rt = runtimes.get("torch")

    def build_then_put_back(ctx, precision):  # noqa: ANN001, ANN202
        try:
            return torch_rt.build(ctx, precision)
        finally:
            if aside.exists():
                aside.rename(weights)

    from runtimes import registry

    monkeypatch.setitem(registry._RUNTIMES, "torch", replace(torch_rt, build=build_then_put_back))
    manifest = build_bundle(ckpt, tmp_path / "b", ["torch"], **EXPORT)
    assert [a.id for a in manifest.servable()] == ["torch-fp32"]
    assert (tmp_path / "b" / manifest.artifacts[0].files[0].path).read_bytes() == original
    assert read_manifest(tmp_path / "b").source.sha256 == read_checkpoint_meta(ckpt).weights_sha256
    assert not (tmp_path / "b" / ".scratch").exists()


def test_weights_rewritten_in_place_during_the_export_stop_it(tmp_path, micro_checkpoint, monkeypatch):
    ckpt = micro_checkpoint(tmp_path)
    weights = _weights(ckpt)

    def rewrite() -> None:  # the same name and size, other bytes (the last one of the last tensor)
        with open(weights, "r+b") as f:
            f.seek(-1, 2)
            last = f.read(1)
            f.seek(-1, 2)
            f.write(bytes([last[0] ^ 1]))

    _while_exporting(monkeypatch, rewrite)
    with pytest.raises(ExportError, match="changed while it was exported"):
        build_bundle(ckpt, tmp_path / "b", ["torch"], **EXPORT)
    assert not (tmp_path / "b").exists()


def test_a_checkpoint_removed_while_it_is_loaded_says_it_changed(tmp_path, micro_checkpoint, monkeypatch, capsys):
    ckpt = micro_checkpoint(tmp_path)
    real = export_bundle.load_checkpoint

    def load_checkpoint(path):  # noqa: ANN001, ANN202 - the training's first save lands while the weights are read
        _overwrite_starts(ckpt)
        return real(path)

    monkeypatch.setattr(export_bundle, "load_checkpoint", load_checkpoint)
    rc = cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--targets", "torch", "--threads", "1"])
    assert rc == 2
    assert capsys.readouterr().err.strip() == f"python -m export: error: checkpoint {ckpt} {CHANGED}"
    assert not (tmp_path / "b").exists()


def test_a_checkpoint_without_its_weights_is_still_named_as_such(tmp_path, micro_checkpoint, capsys):
    ckpt = micro_checkpoint(tmp_path)
    _weights(ckpt).unlink()
    rc = cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--targets", "torch", "--threads", "1"])
    assert rc == 2 and "checkpoint weights missing" in capsys.readouterr().err
