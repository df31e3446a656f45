"""A run of a custom variant (registered by the script that started the training) resumes in a process that has
not registered it, with the definition the run recorded, and says so in a note; one that recorded none is refused
as not registered, saying how to register it, never as a damaged resume.pt."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models import registry
from models.checkpoint import META_FILE, read_checkpoint_meta
from models.config import ViTConfig, conv_stem
from train.__main__ import main as train_main
from train.state import RESUME_FILE, save_resume

# As small as a conv-stem model gets: 8x8 images, one block of width 16.
CUSTOM = ViTConfig("my_c_tiny", conv_stem((3, 1), (2, 1), (8, 16)), 1, 16, 16, 2, patch_size=2, image_size=8,
                   num_classes=10)


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, train_cli, train_tiny) -> Path:
    """A two-step run of CUSTOM, registered while it trains (as a script registering it before train's main)."""
    run = tmp_path_factory.mktemp("custom") / "run"
    argv = [*train_tiny, "--model", CUSTOM.name, "--max-steps", "2", "--out", str(run)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._VARIANTS, CUSTOM.name, CUSTOM)
        code, _, err = train_cli(train_main, argv)
    assert code == 0, err
    return run


@pytest.fixture
def run(custom_run, tmp_path) -> Path:
    return Path(shutil.copytree(custom_run, tmp_path / "run"))


def _resume(train_cli, run: Path, capsys) -> tuple[int, str, str]:
    assert CUSTOM.name not in registry.list_variants()  # this process never registered it
    return train_cli(train_main, ["--out", str(run), "--resume", "--max-steps", "4"], capsys)


@pytest.mark.parametrize("recorded_in", [RESUME_FILE, META_FILE])
def test_an_unregistered_variant_resumes_with_the_definition_the_run_recorded(run, recorded_in, train_cli, capsys):
    if recorded_in == META_FILE:  # an earlier resume.pt without the record: checkpoint.json's config is the run's
        state = torch.load(run / RESUME_FILE, weights_only=True)
        for key in ("version", "model_config", "class_names"):
            state.pop(key)
        save_resume(run, state)
    code, out, err = _resume(train_cli, run, capsys)
    assert code == 0 and "damaged" not in err, err
    notes = [line for line in out.splitlines() if line.startswith("note:") and CUSTOM.name in line]
    assert notes == [f"note: {CUSTOM.name} is not a registered model in this process: the run goes on with its "
                     f"definition, recorded in {recorded_in}"], out
    meta = read_checkpoint_meta(run)
    assert meta.config == CUSTOM and meta.training.steps == 4


def test_an_unregistered_variant_the_run_did_not_record_is_refused_as_not_registered(run, train_cli, capsys):
    # resume.pt of an earlier vitc (no model config in it) and no checkpoint: nothing defines the model here.
    state = torch.load(run / RESUME_FILE, weights_only=True)
    for key in ("version", "model_config", "class_names"):
        state.pop(key)
    save_resume(run, state)
    (run / META_FILE).unlink()
    before = (run / RESUME_FILE).read_bytes()
    code, _, err = _resume(train_cli, run, capsys)
    assert code == 2 and err.count("\n") == 1 and "damaged" not in err, err
    assert err.startswith(f"python -m train: error: --resume: model '{CUSTOM.name}' is not registered in this "
                          "process, and this run recorded no definition of it"), err
    assert "register it (models.register) before the training starts" in err
    assert (run / RESUME_FILE).read_bytes() == before


def test_a_new_run_of_an_unknown_model_is_still_refused_up_front(tmp_path, train_cli, train_tiny, capsys):
    for extra in ([], ["--resume"]):  # --resume without resume.pt starts a new run
        code, _, err = train_cli(train_main, [*train_tiny, "--model", CUSTOM.name, "--out", str(tmp_path / "new"),
                                              *extra], capsys)
        assert code == 2 and f"unknown model '{CUSTOM.name}'; known: " in err and "\n" == err[-1], err
        assert err.count("\n") == 1
