"""A Ctrl-C or SIGTERM that lands inside a C extension's import (matplotlib's backend after training's last step)
comes out as `ImportError: initialization failed` raised from it: `cli.run` still ends as the signal does. Error
lines name a path given with a newline whole, escaped, not cut at the newline. And train.eval's --out, the skipped
folders note and the class-name size refusal say what is wrong."""

from __future__ import annotations

import signal

import pytest

from models import cli


@pytest.fixture
def own_signals():
    """`cli.run` in-process installs its SIGTERM handler: put the test process's back."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


@pytest.mark.parametrize(("stop", "code", "word"), [(cli.Terminated, 143, "terminated"),
                                                    (KeyboardInterrupt, 130, "interrupted")])
@pytest.mark.parametrize("chained", ["cause", "context"])
def test_an_import_failed_by_a_signal_ends_as_the_signal(stop, code, word, chained, capsys, own_signals):
    def main() -> int:
        try:
            raise stop
        except KeyboardInterrupt as exc:  # as a C extension's module init reports an exception it met
            if chained == "cause":
                raise ImportError("initialization failed") from exc
            raise ImportError("initialization failed")  # noqa: B904 - the implicit chain, __context__

    with pytest.raises(SystemExit) as done:
        cli.run(main, "python -m train")
    assert done.value.code == code
    assert capsys.readouterr().err == f"python -m train: {word}\n"


def test_an_import_failing_on_its_own_is_still_raised(capsys, own_signals):
    def main() -> int:
        raise ImportError("initialization failed")

    with pytest.raises(ImportError, match="initialization failed"):
        cli.run(main, "python -m train")
    assert capsys.readouterr().err == ""


def test_a_path_with_a_newline_is_named_whole_by_train(tmp_path, capsys, train_cli):
    from train.__main__ import main

    out = tmp_path / "f\nile"
    out.write_text("x")
    code, _, err = train_cli(main, ["--model", "vit_c_micro", "--dataset", "digits", "--epochs", "1", "--out",
                                    str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{tmp_path}/f\\nile" in err, err
    assert out.read_text() == "x"


def test_a_path_with_a_newline_is_named_whole_by_train_eval(tmp_path, capsys):
    from train import eval as train_eval

    missing = tmp_path / "nope\nline2"
    assert train_eval.main(["--checkpoint", str(missing), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m train.eval: error: checkpoint directory not found: {tmp_path}/nope\\nline2\n", err


def test_a_path_with_a_newline_is_named_whole_by_gpu_checks_parity(tmp_path, capsys, monkeypatch):
    from benchmarks import gpu_check
    from models.checkpoint import load_checkpoint
    from runtimes import BackendError

    monkeypatch.setattr(gpu_check, "parity_on_device", lambda bundle, checkpoint, *_: load_checkpoint(checkpoint))
    missing = tmp_path / "f\nile"
    argv = ["--parity-of", str(tmp_path), "--checkpoint", str(missing), "--device", "cpu"]
    assert gpu_check.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"{gpu_check.PROG}: error: checkpoint directory not found: {tmp_path}/f\\nile\n", err

    def runtime_failed(*_a: object) -> None:  # a runtime's message: its source location, then the reason
        raise BackendError("Exception from src/core.cpp:117:\nthe device cannot run it\n(details)")

    monkeypatch.setattr(gpu_check, "parity_on_device", runtime_failed)
    assert gpu_check.main(argv) == 2
    assert capsys.readouterr().err == f"{gpu_check.PROG}: error: the device cannot run it\n"


def test_error_reason_keeps_a_workers_last_line_and_anything_else_whole():
    assert cli.error_reason(ValueError("not found: /a/b\nc")) == "not found: /a/b\nc"
    assert cli.error_reason(ValueError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback "
                                       "(most recent call last):\n  File x\nDatasetError: bad file\n")) == \
        "DatasetError: bad file"
    assert cli.error_reason(ValueError(" ")) == "ValueError"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained vit_c_micro checkpoint on digits (train.eval refuses --out before evaluating it)."""
    import torch

    from data.datasets import default_preprocessing, load_dataset
    from models import build_model
    from models.checkpoint import save_checkpoint

    names = list(load_dataset("digits", "val").class_names)
    torch.manual_seed(0)
    model = build_model("vit_c_micro", num_classes=len(names))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", model, class_names=names,
                           preprocessing=default_preprocessing("digits", 32), extra={"dataset": "digits"})


def _eval(argv: list[str], capsys) -> tuple[int, str]:
    from train import eval as train_eval

    try:
        code = train_eval.main([*argv, "--device", "cpu", "--threads", "1", "--limit", "4"])
    except SystemExit as exc:
        code = int(exc.code)
    return code, capsys.readouterr().err


def test_train_eval_refuses_a_hidden_file_named_json(checkpoint, tmp_path, capsys):
    out = tmp_path / ".json"
    code, err = _eval(["--checkpoint", str(checkpoint), "--out", str(out)], capsys)
    assert code == 2
    assert err == (f"python -m train.eval: error: --out {str(out)!r} is a hidden file named '.json': give a file name "
                   "such as eval.json\n"), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tail", ["/", "/."])
def test_train_eval_refuses_an_out_naming_a_directory(checkpoint, tmp_path, tail, capsys):
    given = f"{tmp_path / 'evdir.json'}{tail}"
    code, err = _eval(["--checkpoint", str(checkpoint), "--out", given], capsys)
    assert code == 2
    assert err == (f"python -m train.eval: error: --out {given!r} ends in '/', so it names a directory: give a file "
                   f"path such as {str(tmp_path / 'evdir.json' / 'eval.json')!r}\n"), err
    assert list(tmp_path.iterdir()) == []  # no file evdir.json written in its place


def test_the_skipped_note_words_what_was_skipped():
    from data.datasets import _skipped_text

    system = _skipped_text([("train", "__MACOSX", 3)])
    assert system.startswith("1 directory skipped as system ones, not classes: '__MACOSX' (in train/, 3 images)")
    assert "start with '.'" not in system and "@eaDir and __MACOSX are folders tools write, never classes" in system
    hidden = _skipped_text([("train", ".NET", 2), ("val", "@eaDir", 0)])
    assert hidden.startswith("2 directories skipped as hidden or system ones, not classes: ")
    assert hidden.endswith("; a class directory must not start with '.'")  # @eaDir held no image: no advice for it
    only = _skipped_text([("train", ".git", 0)])
    assert only == "1 directory skipped as hidden ones, not classes: '.git' (in train/)"


def test_the_class_name_size_refusal_says_it_comes_before_training():
    import dataclasses

    from models.checkpoint import CheckpointError, check_metadata
    from models.preprocessing import Preprocessing
    from models.registry import get_config

    cfg = dataclasses.replace(get_config("vit_c_micro"), num_classes=2)
    with pytest.raises(CheckpointError) as refused:
        check_metadata("run", cfg, class_names=["a" * (17 << 20), "b"], preprocessing=Preprocessing.imagenet(32))
    message = str(refused.value)
    assert message.startswith("run/checkpoint.json would be larger than 16 MiB, the most it may hold: 2 class names "
                              "take 17.0 MiB of it"), message
    assert "refused before training" in message and "could not be saved" not in message
