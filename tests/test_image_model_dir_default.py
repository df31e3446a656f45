"""The image's VITC_MODEL_DIR=/models is a default: models chosen any other way, by flag or by VITC_* variable alike,
replace it. Before, only flags did: a pod's VITC_MODELS=/models/a served every bundle under /models too, and with
VITC_MODEL_REPOSITORY=/models the repository was not alone, so VITC_BACKEND and VITC_MAX_BATCH_SIZE were silently
ignored where the flags are refused (exit 2, one line)."""

from __future__ import annotations

import os
from pathlib import Path

import fake_runtime
import pytest

from serve.registry import model_sources
from serve.settings import Settings

SERVE_ERROR = "python -m serve: error: "
CONFIG = 'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'


@pytest.fixture
def image(tmp_path, monkeypatch) -> Path:
    """The image's environment: VITC_MODEL_DIR=<models>, which holds bundles a and b and a repository layout."""
    for name in [n for n in os.environ if n.upper().startswith("VITC_")]:
        monkeypatch.delenv(name)
    models = tmp_path / "models"
    for name in ("a", "b"):
        fake_runtime.write_bundle(models / name)
    (models / "repo" / "m" / "1").mkdir(parents=True)
    (models / "repo" / "m" / "config.pbtxt").write_text(CONFIG)
    monkeypatch.setenv("VITC_MODEL_DIR", str(models))
    return models


def _started(monkeypatch, argv: list[str]) -> Settings:
    """The settings `python -m serve argv` would start with (the server itself is not run)."""
    import serve.server
    from serve.__main__ import main

    started: list[Settings] = []
    monkeypatch.setattr(serve.server, "run", started.append)
    assert main(argv) == 0
    return started[0]


def _served(settings: Settings) -> list[Path]:
    return sorted(s.path for s in model_sources(settings))


def test_the_image_directory_alone_serves_every_bundle_under_it(image, monkeypatch):
    assert _served(_started(monkeypatch, [])) == [image / "a", image / "b"]


@pytest.mark.parametrize(("variable", "flag", "value"), [
    ("VITC_MODELS", "--model", "a"),
    ("VITC_MODEL_REPOSITORY", "--model-repository", "repo"),
])
def test_models_from_the_environment_replace_it_as_the_flags_do(image, monkeypatch, variable, flag, value):
    by_flag = _started(monkeypatch, [flag, str(image / value)])
    monkeypatch.setenv(variable, str(image / value))
    by_env = _started(monkeypatch, [])
    assert by_env.model_dir is None and by_flag.model_dir is None
    assert _served(by_env) == _served(by_flag) == ([image / "a"] if flag == "--model" else [image / "repo" / "m"])
    assert by_env.repository_alone == by_flag.repository_alone == (flag == "--model-repository")


def test_a_model_directory_flag_still_serves_beside_them(image, monkeypatch):
    """--model-dir given by the user is no default: it serves beside VITC_MODELS, as beside --model."""
    monkeypatch.setenv("VITC_MODELS", str(image / "a"))
    assert _served(_started(monkeypatch, ["--model-dir", str(image)])) == [image / "a", image / "b"]


def test_a_models_variable_naming_none_leaves_it(image, monkeypatch):
    monkeypatch.setenv("VITC_MODELS", " , ")
    assert _started(monkeypatch, []).model_dir == image


@pytest.mark.parametrize(("setting", "value"), [("BACKEND", "openvino"), ("MAX_BATCH_SIZE", "4"),
                                                ("PRECISION", "fp16")])
def test_a_repository_from_the_environment_gets_the_refusals_of_the_flag(image, monkeypatch, capsys, setting, value):
    from serve.__main__ import main

    repo = image / "repo"
    monkeypatch.setenv(f"VITC_{setting}", value)
    assert main(["--model-repository", str(repo)]) == 2
    by_flag = capsys.readouterr().err
    monkeypatch.setenv("VITC_MODEL_REPOSITORY", str(repo))
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{SERVE_ERROR}invalid settings: VITC_{setting}={value} does not "
                                                   f"apply to VITC_MODEL_REPOSITORY={repo}: each model's"), err
    assert err == by_flag.replace("--model-repository: each", f"VITC_MODEL_REPOSITORY={repo}: each")
