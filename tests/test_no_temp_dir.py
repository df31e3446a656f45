"""No writable temporary directory (a read-only root file system without TMPDIR): torch asks tempfile for one when
it is first imported. Every command says so in one line (exit 2), naming TMPDIR; export no longer blames the
checkpoint's weights for it."""

from __future__ import annotations

import errno

import pytest

from models import checkpoint
from models.cli import run
from models.io import NO_TEMP_DIR

NO_DIR = FileNotFoundError(errno.ENOENT, "No usable temporary directory found in ['/nonexistent', '/tmp', '/var/tmp']")


def test_a_command_meeting_no_temp_dir_says_it_in_one_line(capsys):
    def main() -> int:
        raise NO_DIR

    with pytest.raises(SystemExit) as info:
        run(main, "python -m export")
    assert info.value.code == 2
    assert capsys.readouterr().err == f"python -m export: error: {NO_TEMP_DIR}\n"


def test_the_checkpoint_reader_does_not_call_it_a_weights_problem(tmp_path, monkeypatch):
    from models.preprocessing import Preprocessing
    from models.registry import build_model

    model = build_model("vit_c_micro", num_classes=3)
    checkpoint.save_checkpoint(tmp_path, model, class_names=["a", "b", "c"],
                               preprocessing=Preprocessing.imagenet(model.cfg.image_size))

    def no_dir(*_args, **_kwargs):
        raise NO_DIR

    monkeypatch.setattr(checkpoint, "check_weights", no_dir)
    with pytest.raises(FileNotFoundError, match="No usable temporary directory"):
        checkpoint.load_checkpoint(tmp_path)
