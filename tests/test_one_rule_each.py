"""One rule, one place: the sweep and the GPU check read checkpoint.json through the checkpoint contract (and
metrics.jsonl through a bounded strict reader), both strict-JSON readers share one repeated-key hook, the server and
export.triton share one rule for Triton's version directories, and what nothing used is gone."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from models.tritonconfig import MAX_VERSION
from train.sweep import runner
from train.sweep.spec import RunSpec

SUMMARY = {"final_val_top1": 0.8, "final_val_top1_ema": 0.75, "val_images": 100, "train_images": 400,
           "train_time_s": 3.5, "device_name": "cpu", "ddp_backend": "gloo", "world_size": 1, "steps": 3}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished training's directory: its checkpoint (with the training summary) and metrics.jsonl."""
    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model
    from models.checkpoint import save_checkpoint
    from train.report import write_metrics

    out = tmp_path_factory.mktemp("sweep-run") / "run"
    save_checkpoint(out, build_model("vit_c_micro"), class_names=ANIMAL_CLASSES,
                    preprocessing=default_preprocessing("animals", 32), extra={"training": SUMMARY})
    write_metrics(out, [{"epoch": 1, "train_loss": 2.0, "val_top1": 0.5, "epoch_time_s": 1.5},
                        {"epoch": 2, "train_loss": None, "val_top1": 0.8, "val_top1_ema": 0.75}])
    return out


def _sweep_run(tmp_path: Path, run_dir: Path, monkeypatch, edit=None, metrics: str | None = None):
    """run_one of a training that exits 0 and leaves `run_dir`'s files, checkpoint.json edited by `edit` (text ->
    text) and metrics.jsonl replaced by `metrics`: the result, or the RunFailed."""
    spec = RunSpec("vit_c_micro", "animals", "adamw", 1e-3, 0.05, 1)
    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / spec.run_id)
    meta = runs / spec.run_id / "checkpoint.json"
    if edit is not None:
        meta.write_text(edit(meta.read_text()))
    if metrics is not None:
        (runs / spec.run_id / "metrics.jsonl").write_text(metrics)

    class Done:
        pid = 1

        def __init__(self, cmd, **kw):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Done)
    monkeypatch.setattr(runner, "host_facts", lambda: {"host": "h"})
    try:
        return runner.run_one(spec, tmp_path / "study", runs, runner.WorkerSlot(1)), spec
    except runner.RunFailed as exc:
        assert not runner.result_path(tmp_path / "study", spec).exists()  # nothing recorded of it
        return exc, spec


def test_a_sweep_run_reads_the_summary_and_curve_of_its_checkpoint(tmp_path, run_dir, monkeypatch):
    result, _ = _sweep_run(tmp_path, run_dir, monkeypatch)
    assert (result["final_val_error"], result["final_val_error_ema"]) == (20.0, 25.0)
    assert (result["val_images"], result["train_images"], result["train_time_s"]) == (100, 400, 3.5)
    assert result["curve"] == [
        {"epoch": 1, "train_loss": 2.0, "val_error": 50.0, "val_error_ema": None, "epoch_time_s": 1.5},
        {"epoch": 2, "train_loss": None, "val_error": 20.0, "val_error_ema": 25.0, "epoch_time_s": None}]
    assert result["training"] == SUMMARY


def _nan(text: str) -> str:
    return text.replace('"final_val_top1": 0.8', '"final_val_top1": NaN')


def _repeated(text: str) -> str:
    return '{"format_version": 1, ' + text.lstrip()[1:]


def _newer(text: str) -> str:
    return text.replace('"format_version": 1', '"format_version": 2')


def _string_number(text: str) -> str:
    return text.replace('"final_val_top1": 0.8', '"final_val_top1": "0.8"')


@pytest.mark.parametrize(("edit", "metrics", "said"), [
    (_nan, None, "non-finite number NaN (the file must be strict JSON)"),
    (_repeated, None, "the key 'format_version' appears twice in one object"),
    (_newer, None, "format_version 2 is newer than this vitc reads (1)"),
    (_string_number, None, "field 'training.final_val_top1' must be a number, got"),
    (None, '{"epoch": 1, "val_top1": NaN}\n', "metrics.jsonl line 1: ValueError: non-finite number NaN"),
    (None, '{"epoch": 1, "epoch": 2, "val_top1": 0.5}\n', "metrics.jsonl line 1: the key 'epoch' appears twice"),
    (None, '{"epoch": 1}\n[1]\n', "metrics.jsonl line 2: expected a JSON object, got list"),
    (None, '{"epoch": "1", "val_top1": 0.5}\n', "metrics.jsonl line 1: field 'epoch' must be an integer"),
], ids=["nan", "repeated-key", "newer-format", "string-number", "metrics-nan", "metrics-repeated-key",
        "metrics-not-object", "metrics-epoch-string"])
def test_a_damaged_checkpoint_json_in_a_sweep_run_is_a_one_line_refusal(tmp_path, run_dir, monkeypatch, edit,
                                                                       metrics, said):
    """It was read with json.loads: NaN, a repeated key or a format_version no vitc writes went into the result."""
    failed, spec = _sweep_run(tmp_path, run_dir, monkeypatch, edit, metrics)
    assert isinstance(failed, runner.RunFailed), failed
    text = str(failed)
    assert failed.code == 2 and "\n" not in text and said in text, text
    assert text.startswith(f"{spec.run_id}: `python -m train` exited 0, but its output is refused: ")
    assert text.endswith(f"delete {tmp_path / 'runs' / spec.run_id} to train the run again")


def test_metrics_jsonl_is_read_bounded(tmp_path, monkeypatch):
    from train import report

    path = tmp_path / "metrics.jsonl"
    assert report.read_metrics(path) == []  # none yet: no curve
    path.write_text('{"epoch": 1}\n' * 4)
    monkeypatch.setattr(report, "MAX_METRICS_BYTES", 40)
    with pytest.raises(ValueError, match=r"metrics\.jsonl is larger than 0 MiB$"):
        report.read_metrics(path)
    os.mkfifo(fifo := tmp_path / "fifo")
    with pytest.raises(ValueError, match=r"is not a regular file \(a FIFO\)"):  # never opened: it would block
        report.read_metrics(fifo)


def test_the_gpu_check_reads_training_facts_through_the_checkpoint_contract(tmp_path, run_dir):
    from benchmarks.gpu_check import _training_facts

    step = {"status": "passed", "rc": 0, "reason": None, "facts": {}}
    _training_facts(step, run_dir)
    assert step["status"] == "passed" and step["facts"]["ddp_backend"] == "gloo" and step["facts"]["steps"] == 3
    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    (bad / "checkpoint.json").write_text(_repeated((bad / "checkpoint.json").read_text()))
    step = {"status": "passed", "rc": 0, "reason": None, "facts": {}}
    _training_facts(step, bad)  # the step fails with the contract's reason; the check goes on
    assert step["status"] == "failed" and step["rc"] == 1 and step["facts"] == {}
    assert step["reason"].startswith("its checkpoint is refused: corrupt checkpoint metadata ")
    assert "the key 'format_version' appears twice" in step["reason"]


# ---------------------------------------------------------------- one repeated-key hook


def test_both_strict_json_readers_share_one_repeated_key_hook_in_their_own_words():
    import models.io
    import serve.protocol
    from models.io import parse_strict_json, unique_keys_hook
    from serve.protocol import ProtocolError, parse_request

    assert serve.protocol.unique_keys_hook is unique_keys_hook
    for hook in (models.io._unique_keys, serve.protocol.unique_keys):  # made by the factory, not written out again
        assert hook.__qualname__ == "unique_keys_hook.<locals>.unique"
    with pytest.raises(ValueError) as info:
        parse_strict_json(b'{"k": 1, "j": 2, "k": 3}', 100)
    assert str(info.value) == ("the key 'k' appears twice in one object (readers differ on which value counts: "
                               "keep one)")
    with pytest.raises(ProtocolError) as request:
        parse_request(b'{"inputs": [{"name": "x", "x": 1, "x": 2}]}', None)
    assert (str(request.value), request.value.status) == ("request JSON repeats the key 'x' in one object", 400)
    assert unique_keys_hook(KeyError)([("a", 1), ("b", 2)]) == {"a": 1, "b": 2}


# ---------------------------------------------------------------- one version-directory rule


def _model_dir(tmp_path: Path) -> Path:
    """A model directory: versions 1 and 3 (3 a symbolic link to a directory), and entries that are no version."""
    model = tmp_path / "repo" / "m"
    (model / "1").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (model / "3").symlink_to(tmp_path / "elsewhere")
    for odd in ("007", "0", "²", str(MAX_VERSION + 1), "9" * 20, "abc"):
        (model / odd).mkdir()
    (model / "5").write_text("a file")
    return model


def test_the_server_and_export_triton_read_version_directories_by_one_rule(tmp_path):
    from export import triton
    from models.triton_layout import version_dirs
    from serve.registry import ModelSource

    model = _model_dir(tmp_path)
    assert version_dirs(model) == [1, 3] and version_dirs(tmp_path / "none") == []
    assert ModelSource(model, "m", repository=True).versions() == ["1", "3"]
    # Triton follows the link: the linked version is the latest it serves (it used to be skipped here, not there).
    assert triton._served_versions(model, None, generated=True) == [3]
    assert triton._served_versions(model, 4, generated=True) == [4]
    assert triton._next_version(model) == 4  # the directory beyond int64 is no version: never counted
    assert triton._next_version(tmp_path / "new") == 1


def test_the_next_version_never_passes_triton_s_int64(tmp_path):
    from export import triton
    from export.triton import RepositoryError

    model = _model_dir(tmp_path)
    (model / str(MAX_VERSION)).mkdir()
    with pytest.raises(RepositoryError) as info:  # it proposed 2**63, which no version directory may be
        triton._next_version(model)
    assert "\n" not in str(info.value) and str(info.value) == (
        f"{model}: there is no next version: version {MAX_VERSION} is the highest Triton reads (int64): no version "
        f"can follow it, and one below it is never served; remove {model / str(MAX_VERSION)} to write another")


def test_the_server_takes_the_model_name_rule_from_the_bundle_contract():
    import models.bundle
    import serve.registry

    assert serve.registry.NAME_RE is models.bundle.NAME_RE
    assert serve.registry.NAME_RULE == f"a model name is {models.bundle.NAME_RULE}"
    assert not hasattr(serve.registry, "VERSION_DIR")


# ---------------------------------------------------------------- what nothing used is gone


def test_what_only_tests_used_is_gone():
    import serve.__main__
    import train.report
    from models.checkpoint import check_metadata
    from serve.batching import DynamicBatcher
    from train.sweep import claims

    assert not hasattr(train.report, "plot_curves")  # the trainer draws with draw_curves and puts the bytes in place
    assert not hasattr(claims, "VERDICTS") and not hasattr(serve.__main__, "CLI_ONLY")
    assert not hasattr(DynamicBatcher, "stalled")
    assert list(inspect.signature(DynamicBatcher._next_batch).parameters) == ["self"]
    assert "reserve" not in inspect.signature(check_metadata).parameters


def test_the_export_cli_comments_name_the_function_it_calls():
    source = (Path(__file__).resolve().parents[1] / "export" / "cli.py").read_text()
    assert "build_bundle" not in source and source.count("export.bundle.build says") == 2


def test_a_linked_version_is_named_when_export_triton_will_not_write_beside_it(tmp_path):
    """A `2 -> 1` link the user added was refused as 'it holds '2'', as if 2 were no version at all."""
    from export.triton_publish import _foreign_model_dir

    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "manifest.json").write_text("{}")
    assert _foreign_model_dir(model) is None
    (model / "2").symlink_to("1")
    assert _foreign_model_dir(model) == "version 2 is a symbolic link (Triton loads it; this tool writes every " \
                                        "version itself)"
