"""An empty or blank path flag (or VITC_* variable) is refused with one line and exit 2, before any work: Path("")
is the current directory, so `--model-dir "$MODELS"` with MODELS unset served whatever bundles lay where the server
started, and serve.launch turned "" into its caller's directory. train.eval took an empty --dataset as "the
checkpoint's" (though " " was refused), and train.sweep blamed --train-args for it."""

from __future__ import annotations

import json
import os

import fake_runtime
import httpx
import pytest
from test_serve_fixtures import start_server

SERVE_ERROR = "python -m serve: error: "

BLANK = ("", " ")


@pytest.fixture
def serve_main(tmp_path, monkeypatch):
    """serve's main in a directory holding a servable bundle, with no VITC_* setting from outside; starting the server
    fails the test (the empty path would have served the bundle here)."""
    import serve.server
    from serve.__main__ import main

    for name in [n for n in os.environ if n.upper().startswith("VITC_")]:
        monkeypatch.delenv(name)
    fake_runtime.write_bundle(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(serve.server, "run", lambda settings: pytest.fail(f"the server started: {settings}"))
    return main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("blank", BLANK)
@pytest.mark.parametrize(("argv", "named"), [
    (["--model-dir", "{}"], "--model-dir (VITC_MODEL_DIR)"),
    (["--model-rep", "{}"], "--model-repository (VITC_MODEL_REPOSITORY)"),  # argparse's abbreviation
    (["--model={}"], "--model (VITC_MODELS): item 1"),
    (["--model", "b", "--model", "n={}"], "--model (VITC_MODELS): item 2"),
])
def test_serve_refuses_an_empty_path_flag(serve_main, capsys, argv, named, blank):
    assert serve_main([a.format(blank) for a in argv]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"{SERVE_ERROR}invalid setting {named}: the path is empty (it would be the current "
                          "directory)"), err


@pytest.mark.parametrize(("name", "value"), [
    ("VITC_MODEL_DIR", ""), ("VITC_MODEL_DIR", " "), ("VITC_MODEL_REPOSITORY", ""), ("VITC_MODELS", "b, n="),
    ("VITC_MODELS", '["b", ""]'),
])
def test_serve_refuses_an_empty_path_variable(serve_main, capsys, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert serve_main([]) == 2
    assert "the path is empty" in _one_line(capsys)


def test_a_flag_still_replaces_an_empty_model_dir_variable(serve_main, monkeypatch):
    """--model replaces VITC_MODEL_DIR (the image's /models): an empty one is then not used, so not refused."""
    from serve.__main__ import settings_args
    from serve.settings import Settings

    monkeypatch.setenv("VITC_MODEL_DIR", "")
    assert Settings(**settings_args(["--model", "b"])).model_dir is None


def test_launch_leaves_empty_paths_for_the_server_and_resolves_abbreviations(tmp_path, monkeypatch):
    from serve.launch import absolute_env, absolute_paths

    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    assert absolute_paths(["--model-dir", "", "--model", " ", "--model=", "--model", "n=", "--model-rep", "r",
                           "--model-d=md", "--model-", "x"]) == [
        "--model-dir", "", "--model", " ", "--model=", "--model", "n=", "--model-rep", f"{here}/r",
        f"--model-d={here}/md", "--model-", "x"]  # --model- is ambiguous: the server says so
    env = absolute_env({"VITC_MODEL_DIR": "md", "vitc_model_repository": "rel", "VITC_MODELS": "a, n=e/b",
                        "VITC_OTHER": "x"})
    assert env == {"VITC_MODEL_DIR": f"{here}/md", "vitc_model_repository": "rel",  # no setting: the server says so
                   "VITC_MODELS": json.dumps([f"{here}/a", f"n={here}/e/b"]), "VITC_OTHER": "x"}
    assert absolute_env({"VITC_MODEL_DIR": "", "VITC_MODELS": '["", "a"]'}) == {
        "VITC_MODEL_DIR": "", "VITC_MODELS": json.dumps(["", f"{here}/a"])}
    assert absolute_env({"VITC_MODELS": "[oops"}) == {"VITC_MODELS": "[oops"}


def test_launch_serves_a_relative_model_dir_variable_from_the_callers_directory(tmp_path, monkeypatch):
    fake_runtime.write_bundle(tmp_path / "exports" / "b")
    monkeypatch.chdir(tmp_path)
    env = {**fake_runtime.server_env(tmp_path), "VITC_MODEL_DIR": "exports"}
    with start_server(["--backend", "fake"], tmp_path / "server.log", env) as server:
        names = [m["name"] for m in httpx.post(server.url + "/v2/repository/index", timeout=10).json()]
        assert len(names) == 1 and httpx.get(f"{server.url}/v2/models/{names[0]}/ready").status_code == 200


def test_launch_reports_an_empty_model_dir_as_the_server_refuses_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"exited with code 2: invalid setting --model-dir .*the path is empty"):
        start_server(["--model-dir", ""], tmp_path / "server.log", fake_runtime.server_env(tmp_path))


@pytest.mark.parametrize("blank", BLANK)
@pytest.mark.parametrize("argv", [["--checkpoint", "{}"], ["--checkpoint", "run", "--dataset", "{}"],
                                  ["--checkpoint", "run", "--out", "{}"]])
def test_train_eval_refuses_an_empty_path(tmp_path, monkeypatch, capsys, argv, blank):
    from train import eval as train_eval

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        train_eval.main([a.format(blank) for a in argv])
    assert exc.value.code == 2
    assert _one_line(capsys).startswith(f"python -m train.eval: error: {argv[-2]} is empty: give ")


@pytest.mark.parametrize("blank", BLANK)
@pytest.mark.parametrize("flag", ["--dataset", "--out", "--runs-dir"])
def test_train_sweep_refuses_an_empty_path_naming_its_own_flag(tmp_path, monkeypatch, capsys, flag, blank):
    from train.sweep.__main__ import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "reduced", "--dry-run", flag, blank])
    assert exc.value.code == 2
    assert _one_line(capsys).startswith(f"python -m train.sweep: error: {flag} is empty: give ")
    assert not any(tmp_path.iterdir())
