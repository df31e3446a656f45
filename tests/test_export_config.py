"""export.bundle.ExportConfig: the one frozen description of an export that `python -m export`, `build_bundle` and
the benchmarks' bundles share: its checks, its defaults, and the CLI building it from the command line."""

from __future__ import annotations

import dataclasses
import inspect
import shlex
from types import SimpleNamespace

import numpy as np
import pytest

from export import bundle as export_bundle
from export import cli
from export.bundle import ExportConfig, build_bundle
from export.parity import INT8_TOLERANCE
from runtimes import ExportError
from runtimes.registry import DEFAULT_TARGETS


def test_the_defaults_are_the_documented_ones():
    config = ExportConfig("runs/x", "exports/x")
    assert config.targets == DEFAULT_TARGETS == ("onnx", "openvino")
    # parity: the whole val split up to 5000 images (512 once, where one point was 5 images)
    assert (config.max_batch, config.parity_samples, config.calibration_samples) == (32, None, 300)
    assert (config.name, config.dataset, config.calibration_dataset, config.opset, config.tolerances,
            config.threads, config.log, config.drop_artifacts) == (None,) * 7 + (False,)


def test_it_is_frozen_and_plain_after_its_checks():
    config = ExportConfig("runs/x", "exports/x", ["onnx"], max_batch=np.int64(4), parity_samples=np.int32(8),
                          calibration_samples=np.int16(2), opset=np.int32(19), threads=np.int64(1))
    # numpy integers (a script's computed counts) become ints; a list of targets becomes a tuple
    values = (config.max_batch, config.parity_samples, config.calibration_samples, config.opset, config.threads)
    assert values == (4, 8, 2, 19, 1) and all(type(v) is int for v in values)
    assert config.targets == ("onnx",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_batch = 8  # type: ignore[misc]
    assert dataclasses.replace(config, max_batch=8).max_batch == 8


def test_only_checkpoint_out_and_targets_are_positional():
    with pytest.raises(TypeError):
        ExportConfig("runs/x", "exports/x", ["onnx"], "name")  # type: ignore[misc]


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({"max_batch": 0}, "max batch must be an integer in 1..1024, got 0"),
    ({"parity_samples": 2**31}, "parity sample counts must be positive integers"),
    ({"threads": 1025}, "threads must be an integer in 1..1024, got 1025"),
    ({"targets": "onnx"}, "targets must be a list of target names"),
    ({"out": None}, "out must be a path, got NoneType None"),
    ({"calibration_dataset": 3}, "calibration dataset must be a dataset name or folder"),
    ({"tolerances": {"int8": INT8_TOLERANCE, 8: INT8_TOLERANCE}}, "tolerances must map"),
])
def test_a_bad_field_is_one_line_when_the_config_is_made(kwargs, reason):
    args = {"checkpoint": "runs/x", "out": "exports/x", **kwargs}
    with pytest.raises(ExportError, match=reason) as err:
        ExportConfig(**args)
    assert "\n" not in str(err.value)


def test_build_bundle_is_build_of_the_config(monkeypatch):
    seen = []
    monkeypatch.setattr(export_bundle, "build", lambda config: seen.append(config) or "manifest")
    log = print
    assert build_bundle("runs/x", "exports/x", ["onnx"], name="n", max_batch=8, log=log) == "manifest"
    assert seen == [ExportConfig("runs/x", "exports/x", ("onnx",), name="n", max_batch=8, log=log)]
    assert build_bundle("runs/x", "exports/x") == "manifest" and seen[-1].targets == DEFAULT_TARGETS
    with pytest.raises(TypeError):
        build_bundle("runs/x", "exports/x", max_batches=8)  # a misspelt keyword is not silently ignored


@pytest.fixture()
def captured(monkeypatch):
    """The ExportConfig that `python -m export` hands to export.bundle.build (which then does nothing)."""
    seen: list[ExportConfig] = []

    def build(config: ExportConfig) -> SimpleNamespace:
        seen.append(config)
        return SimpleNamespace(artifacts=())

    monkeypatch.setattr(export_bundle, "build", build)
    monkeypatch.setattr(cli, "setup_problem", lambda _args, _targets: None)
    return seen


def test_the_cli_builds_the_config_from_its_flags(captured, tmp_path, capsys):
    out = str(tmp_path / "b")
    assert cli.main(["--checkpoint", "runs/x", "--out", out, "--targets", "onnx, openvino-int8", "--name", "m",
                     "--max-batch", "8", "--parity-samples", "64", "--calibration-samples", "16", "--dataset",
                     "digits", "--calibration-dataset", "animals", "--threads", "2", "--replace"]) == 0
    assert captured == [ExportConfig("runs/x", out, ("onnx", " openvino-int8"), name="m", max_batch=8,
                                     parity_samples=64, calibration_samples=16, dataset="digits",
                                     calibration_dataset="animals", threads=2, drop_artifacts=True)]
    assert capsys.readouterr().out == f"bundle written: {out} (python -m export.report {out})\n"


def test_the_closing_hint_is_a_command_that_pastes_where_the_path_holds_spaces(captured, tmp_path, capsys):
    """It printed `python -m export.report exports/My Model+v2`, which the shell split at the space."""
    out = str(tmp_path / "My Model+v2")
    assert cli.main(["--checkpoint", "runs/x", "--out", out]) == 0
    hint = capsys.readouterr().out.strip().rsplit("(", 1)[1].rstrip(")")
    assert shlex.split(hint) == ["python", "-m", "export.report", out]


def test_the_cli_defaults_are_the_configs(captured, tmp_path):
    assert cli.main(["--checkpoint", "runs/x", "--out", str(tmp_path / "b")]) == 0
    assert captured == [ExportConfig("runs/x", str(tmp_path / "b"))]


def test_a_runtime_cli_builds_the_targets_of_its_precisions(captured, tmp_path):
    assert cli.main(["--checkpoint", "runs/x", "--out", str(tmp_path / "b"), "--precision", "fp32,int8"],
                    family="onnx") == 0
    assert captured[0].targets == ("onnx-fp32", "onnx-int8")


def test_the_benchmark_bundles_use_the_export_defaults():
    from benchmarks import bundles

    params = inspect.signature(bundles.prepare_model).parameters
    defaults = ExportConfig("c", "o")
    for key in ("targets", "max_batch", "parity_samples", "calibration_samples"):
        assert params[key].default == getattr(defaults, key), key
