"""`python -m train.eval --out` follows the rule serve.sample and serve.tensor follow: the file name says its format
(.json), so `--out -` (stdout by convention) and `--out noext` are refused in one line, exit 2, before the
evaluation, and no file named '-' appears."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train.evaluate
from train import eval as train_eval


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained vit_c_micro checkpoint on the embedded digits set (evaluating it takes a moment)."""
    import torch

    from data.datasets import default_preprocessing, load_dataset
    from models import build_model
    from models.checkpoint import save_checkpoint

    names = list(load_dataset("digits", "val").class_names)
    torch.manual_seed(0)
    model = build_model("vit_c_micro", num_classes=len(names))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "run", model, class_names=names,
                           preprocessing=default_preprocessing("digits", 32), extra={"dataset": "digits"})


def _run(argv: list[str]) -> int:
    try:
        return train_eval.main([*argv, "--device", "cpu", "--threads", "1"])
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize("out", ["-", "noext", "result.txt", "e.json.bak"])
def test_an_out_without_the_json_suffix_is_refused_before_the_work(checkpoint, out, tmp_path, monkeypatch, capsys):
    def slow(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the evaluation started before --out was checked")

    monkeypatch.setattr(train.evaluate, "evaluate_checkpoint", slow)
    monkeypatch.chdir(tmp_path)
    assert _run(["--checkpoint", str(checkpoint), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m train.eval: error: --out {out!r} must end in .json (the result is a JSON file; the " \
                  "scores are printed too)\n", err
    assert list(tmp_path.iterdir()) == []  # no file named '-' (nor any other)


def test_a_json_out_is_written(checkpoint, tmp_path, capsys):
    out = tmp_path / "Result.JSON"  # the suffix in any case, as serve.sample takes .PNG
    assert _run(["--checkpoint", str(checkpoint), "--limit", "8", "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["format"] == "vitc-eval"
    assert capsys.readouterr().out.rstrip().endswith(f"-> {out}")


def test_a_directory_is_still_named_as_one(checkpoint, tmp_path, capsys):
    # The suffix comes after out_file_problem's checks: a folder gets "give a file path such as DIR/eval.json".
    assert _run(["--checkpoint", str(checkpoint), "--out", str(tmp_path)]) == 2
    assert "is a directory; give a file path such as" in capsys.readouterr().err
